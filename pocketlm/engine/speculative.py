"""Speculative decoding: a cheap draft proposes K tokens, the target checks them in one pass.

    spec = Speculative(pocketlm.load("qwen2.5-coder-1.5b-instruct"), draft="qwen2.5-coder-0.5b-instruct")
    spec.chat([{"role": "user", "content": "Reverse a list in Python"}], temperature=0)
    spec.stats.acceptance_rate, spec.stats.tokens_per_pass

One round, for a sequence whose last token ``t`` is not yet in the target's cache at ``pos``:
the draft proposes d1..dk; the target runs ``[t, d1..dk]`` at positions pos..pos+k in one
pass (``verify``: the fused C++ step with every token as an entry of one cache row, each weight
read once for all of them, else ``forward_at``), giving its distribution after each prefix;
d_i is kept while the accept/reject rule keeps it, the first rejection is replaced by a token
drawn from the residual, and when all k survive the target's distribution after dk gives one
more token.
Rejected entries in the target's cache need no undoing: the next pass overwrites those
positions before anything reads them (see ``model/transformer.py``).

- Greedy: d_i is kept iff it is the target's argmax there, and the replacement is that
  argmax, so the output is the target's own greedy output token for token (up to float
  differences between the verification pass and the one-token step, which may flip an exact
  tie; where both are fused they run the same kernels).
- Sampling (Leviathan et al. 2023, Chen et al. 2023): d_i ~ q is kept with probability
  min(1, p(d_i)/q(d_i)); on rejection the token is drawn from max(p - q, 0) renormalised.
  p and q are the *processed* distributions (temperature, top-k, min-p, top-p, repetition
  penalty), exactly what ``sample`` draws from, so the output follows the target's sampler.
  A deterministic draft (prompt lookup) is a point mass q.

Draft kinds (``make_draft``): another model with the same tokenizer (refused otherwise),
``self[:L]`` — the target's own first L layers with its final norm and head (no new weights;
its cache is its own), and ``lookup[:N]`` — prompt-lookup decoding: the tokens that followed
the most recent earlier occurrence of the last N (..1) tokens, from the prompt or the output.

Every token still goes through ``SequenceState`` (stop strings, EOS, max_tokens,
detokenisation), so speculative output is cut and streamed exactly as the plain loop's.
A round without a proposal runs the plain ``decode_step``. K is fixed, or ``"auto"``: +2
after a round where every draft was kept, -1 after one with a rejection (as HF's assisted
generation), between 1 and ``K_MAX``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pocketlm.engine import fused
from pocketlm.engine.generate import (
    SequenceState,
    Token,
    check_prompt,
    decode_step,
    forward_at,
    prefill,
)
from pocketlm.engine.sampling import SamplingParams, apply_repetition_penalty, filtered_probs
from pocketlm.errors import InvalidArgument
from pocketlm.model.transformer import KVCache, Transformer

K_MAX = 16
K_START = 4


# -- the distributions the sampler draws from ---------------------------------------------------
def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The normalised distribution (V,) that ``sampling.sample`` draws from for these logits
    (after temperature, top-k, min-p and top-p; repetition penalty is applied by the caller).
    Greedy: a point mass on the argmax."""
    if params.greedy:
        out = torch.zeros(logits.shape[-1])
        out[int(logits.argmax())] = 1.0
        return out
    probs = filtered_probs(logits, params)  # the very weights sampling.sample draws from
    return probs / probs.sum()


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor | None, d: int, generator: torch.Generator | None
) -> tuple[int, bool]:
    """The accept/reject rule for one drafted token ``d`` drawn from q (V,) (None: a point
    mass on d). Returns (token, kept): d itself if kept, else a draw from max(p - q, 0).
    If d was drawn from q, the returned token is distributed as p."""
    qd = 1.0 if q is None else float(q[d])
    u = float(torch.rand((), generator=generator))
    if qd > 0 and u < min(1.0, float(p[d]) / qd):
        return d, True
    residual = p.clone()
    if q is None:
        residual[d] = 0.0
    else:
        residual = (p - q[: p.shape[0]]).clamp_(min=0.0)
    if float(residual.sum()) <= 0:  # p == q (up to rounding): the residual is empty; p itself
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator)), False


# -- drafts --------------------------------------------------------------------------------------
class Draft(Protocol):
    """Proposes tokens to continue ``ctx`` (the prompt and every token output so far)."""

    kind: str

    def reset(self, max_len: int) -> None:
        """A new sequence of at most ``max_len`` tokens begins."""
        ...

    def propose(
        self, ctx: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Up to k tokens, and for each the distribution it was drawn from (None: chosen
        deterministically, a point mass)."""
        ...

    def keep(self, n: int) -> None:
        """The first ``n`` tokens of the last ``ctx`` plus proposals are final."""
        ...


class LookupDraft:
    """Prompt-lookup decoding: no model. Find the most recent earlier occurrence of the last
    ``max_ngram`` tokens (then shorter n-grams, down to ``min_ngram``) and propose what
    followed it. Costs a scan of the context; wins on code edits and repetitive text."""

    kind = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgument(f"lookup n-grams need 1 <= min <= max, got {min_ngram}..{max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def reset(self, max_len: int) -> None:
        pass

    def propose(self, ctx, k, params, generator):
        L = len(ctx)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ctx[L - n :]
            first = tail[0]
            for j in range(L - n - 1, -1, -1):  # most recent match first; j + n < L
                if ctx[j] == first and ctx[j : j + n] == tail:
                    got = ctx[j + n : j + n + k]
                    return got, [None] * len(got)
        return [], []

    def keep(self, n: int) -> None:
        pass


class ModelDraft:
    """A smaller network (or the target's own first layers) drafting with its own KV cache.

    ``valid`` counts the tokens of the context whose keys/values in the draft's cache are
    final; each proposal first feeds the ones it has not seen (the target's last token, and
    the last draft when every draft was kept), then one fused decode step per draft token.
    """

    def __init__(self, network: Transformer, kind: str = "model", max_len: int | None = None):
        self.network, self.kind = network, kind
        self.max_len = min(max_len or network.config.max_seq_len, network.config.max_seq_len)
        self.cache: KVCache | None = None
        self.valid = 0
        self._fed = 0

    def reset(self, max_len: int) -> None:
        self.valid = 0
        n = min(max_len, self.max_len)  # a cache as long as this sequence needs, kept if longer
        if self.cache is None or self.cache.max_seq_len < n:
            self.cache = KVCache.allocate(self.network.config, 1, n,
                                          dtype=self.network.lm_head.weight.dtype)

    def propose(self, ctx, k, params, generator):
        if self.cache is None:
            self.reset(len(ctx) + k)
        k = min(k, self.cache.max_seq_len - len(ctx))
        if k <= 0:
            return [], []
        new = ctx[self.valid :]
        if len(new) == 1:
            logits = decode_step(self.network, self.cache, torch.tensor(new), torch.tensor([self.valid]))[0]
        elif len(new) <= fused.MAX_ROWS and (
                got := fused.verify(self.network, self.cache, 0, new, self.valid)) is not None:
            logits = got[-1]  # a few tokens to catch up on: one fused pass
        else:
            logits = prefill(self.network, self.cache, 0, new, start=self.valid)
        tokens, dists = [], []
        pos = len(ctx)
        for i in range(k):
            if params.greedy:
                d, q = int(logits.argmax()), None
            else:
                q = processed_probs(logits, params)
                d = int(torch.multinomial(q, 1, generator=generator))
            tokens.append(d)
            dists.append(q)
            if i + 1 < k:
                logits = decode_step(self.network, self.cache, torch.tensor([d]), torch.tensor([pos]))[0]
                pos += 1
        self._fed = len(ctx) + k - 1  # entries written: ctx and all drafts but the last
        self.valid = self._fed
        return tokens, dists

    def keep(self, n: int) -> None:
        self.valid = min(self._fed, n)


def self_draft(target: Transformer, layers: int | None = None) -> Transformer:
    """The target's first ``layers`` blocks (default half) with its final norm and head, as
    a network of its own that shares every weight (no copy)."""
    cfg = target.config
    layers = layers or max(1, cfg.n_layers // 2)
    if not 1 <= layers < cfg.n_layers:
        raise InvalidArgument(
            f"self-speculation needs 1 <= layers < {cfg.n_layers} (the target's depth), got {layers}")
    from dataclasses import replace

    with torch.device("meta"):
        net = Transformer(replace(cfg, n_layers=layers))
    net.embed_tokens, net.norm, net.lm_head = target.embed_tokens, target.norm, target.lm_head
    net.layers = nn.ModuleList(target.layers[:layers])
    for name in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
        setattr(net, name, getattr(target, name))
    return net.eval()


def check_same_tokenizer(target, draft, target_name: str = "target", draft_name: str = "draft") -> None:
    """Raise InvalidArgument unless the two models' tokenizers map text to the same ids."""
    a, b = target.tokenizer.backend, draft.tokenizer.backend
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True) or (
        target.tokenizer.stop_ids != draft.tokenizer.stop_ids
    ):
        raise InvalidArgument(
            f"the draft {draft_name!r} does not share the target {target_name!r}'s tokenizer "
            f"(vocabularies of {a.get_vocab_size(with_added_tokens=True)} and "
            f"{b.get_vocab_size(with_added_tokens=True)} tokens differ); pick a draft from the "
            "same family (e.g. Qwen2.5-Coder 0.5B for 1.5B), or --draft lookup / --draft self")


def make_draft(target, spec, max_len: int | None = None) -> Draft:
    """A draft for the Model ``target`` from ``spec``: a Draft, a loaded Model, ``"lookup"``
    / ``"lookup:N"`` (n-grams N..1), ``"self"`` / ``"self:L"`` (first L layers), or a model
    name/path to load. Raises InvalidArgument for a draft with another tokenizer, and what
    ``pocketlm.load`` raises for a name it cannot load."""
    if hasattr(spec, "propose"):
        return spec
    if isinstance(spec, str):
        head, _, arg = spec.partition(":")
        if head in ("lookup", "prompt-lookup"):
            return LookupDraft(max_ngram=_int_arg(spec, arg, 3))
        if head == "self":
            net = self_draft(target.network, _int_arg(spec, arg, None))
            return ModelDraft(net, kind="self", max_len=max_len)
        from pocketlm.api import load  # a name or path: load it like any model

        name = spec
        spec = load(spec)
        spec.card.name = spec.card.name or name
    check_same_tokenizer(target, spec, target.card.name or "target", spec.card.name or "draft")
    return ModelDraft(spec.network, kind="model", max_len=max_len)


def _int_arg(spec: str, arg: str, default):
    if not arg:
        return default
    if not arg.isdigit() or int(arg) < 1:
        raise InvalidArgument(f"--draft {spec!r}: the number after ':' must be a whole number >= 1")
    return int(arg)


# -- the loop --------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    """What speculation did: target passes, draft tokens proposed and kept, time spent."""

    kind: str = ""
    passes: int = 0  # target forward passes after the prompt (verifications and plain steps)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens output after the first
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.passes if self.passes else 0.0

    def as_dict(self) -> dict:
        return {"draft": self.kind, "passes": self.passes, "drafted": self.drafted,
                "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_pass": self.tokens_per_pass,
                "draft_s": self.draft_s, "verify_s": self.verify_s}


class KControl:
    """K fixed, or adapted to acceptance ("auto")."""

    def __init__(self, setting: int | str | None = "auto"):
        self.auto = setting in (None, "auto")
        if not self.auto and (not isinstance(setting, int) or not 1 <= setting <= 64):
            raise InvalidArgument(f"draft tokens must be 'auto' or a whole number 1..64, got {setting!r}")
        self.k = K_START if self.auto else setting

    def update(self, drafted: int, kept: int) -> None:
        if self.auto and drafted:
            self.k = min(self.k + 2, K_MAX) if kept == drafted else max(1, self.k - 1)


@torch.inference_mode()
def generate(
    target: Transformer,
    tokenizer,
    prompt: list[int],
    params: SamplingParams,
    draft: Draft,
    draft_tokens: int | str = "auto",
    max_len: int | None = None,
    stats: SpecStats | None = None,
) -> Iterator[list[Token]]:
    """Continue one prompt with speculation; yields the Tokens of each round (index 0).

    The same contract as ``engine.generate.generate`` for one sequence (ContextOverflow,
    InvalidArgument, finish reasons); ``stats`` is filled in as it goes.
    """
    stats = stats if stats is not None else SpecStats()
    stats.kind = draft.kind
    ctl = KControl(draft_tokens)
    max_len = min(max_len or target.config.max_seq_len, target.config.max_seq_len)
    check_prompt(prompt, max_len)
    seq = SequenceState(0, prompt, params, tokenizer, max_len)
    if seq.limit <= 0:
        yield [Token(0, -1, 0.0, "", "length")]
        return
    need = min(len(prompt) + seq.limit, max_len)
    cache = KVCache.allocate(target.config, 1, need, dtype=target.lm_head.weight.dtype)
    draft.reset(need)
    yield [seq.accept(prefill(target, cache, 0, prompt))]
    ctx = list(prompt) + seq.out
    while not seq.done:
        yield speculate_round(target, cache, 0, seq, ctx, draft, ctl, stats)


def verify(target: Transformer, cache: KVCache, row: int, ids: list[int], pos: int) -> torch.Tensor:
    """Logits (T, V) after each of ``ids`` fed at positions pos.. of cache row ``row``: the fused
    verification pass (about one decode step's cost for up to 8 tokens) where it covers the
    target, else the PyTorch pass."""
    logits = fused.verify(target, cache, row, ids, pos)
    return logits if logits is not None else forward_at(target, cache, row, ids, pos)


def speculate_round(
    target: Transformer,
    cache: KVCache,
    row: int,
    seq: SequenceState,
    ctx: list[int],
    draft: Draft,
    ctl: KControl,
    stats: SpecStats,
    plain: Callable[[int, int], torch.Tensor] | None = None,
) -> list[Token]:
    """One draft-and-verify round for ``seq`` in cache row ``row`` (its last token, ``ctx[-1]``,
    not yet in the cache, at ``seq.pos``); returns the Tokens it emits (1..k+1) and appends
    their ids to ``ctx`` (the prompt and every output so far). When the draft proposes
    nothing, ``plain(token, pos)`` gives the logits (V,) of the one-token step (default: the
    fused ``decode_step`` on row 0). The batching scheduler calls this for a lone sequence in
    its shared cache; ``generate`` for its own."""
    params, prompt = seq.params, seq.prompt
    # verification writes positions pos..pos+k; more than the tokens left is waste
    k = min(ctl.k, seq.limit - len(seq.out) - 1, cache.max_seq_len - 1 - seq.pos)
    t0 = time.perf_counter()
    drafts, dists = draft.propose(ctx, k, params, seq.generator) if k > 0 else ([], [])
    drafts, dists = drafts[:k], dists[:k]
    t1 = time.perf_counter()
    stats.draft_s += t1 - t0
    stats.passes += 1
    if not drafts:  # nothing to check: the plain one-token step
        if plain is None:
            logits = decode_step(target, cache, torch.tensor([ctx[-1]]), torch.tensor([seq.pos]))[0]
        else:
            logits = plain(ctx[-1], seq.pos)
        stats.verify_s += time.perf_counter() - t1
        seq.pos += 1
        tok = seq.accept(logits)
        ctx.append(tok.id)
        stats.emitted += 1
        return [tok]
    logits = verify(target, cache, row, [ctx[-1]] + drafts, seq.pos)  # (k+1, V)
    stats.verify_s += time.perf_counter() - t1
    start = len(ctx)
    round_tokens, kept = [], 0
    for i, d in enumerate(drafts):
        row_logits = logits[i].float()
        lp = torch.log_softmax(row_logits, dim=-1)
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt) | set(seq.out)), dtype=torch.long)
            row_logits = apply_repetition_penalty(row_logits, seen, params.repetition_penalty)
        if params.greedy:
            tok_id = int(row_logits.argmax())
            ok = tok_id == d
        else:
            tok_id, ok = accept_or_resample(processed_probs(row_logits, params), dists[i], d,
                                            seq.generator)
        seq.pos += 1
        round_tokens.append(seq.push(tok_id, lp))
        ctx.append(tok_id)
        if not ok or seq.done:
            break
        kept += 1
    else:  # every draft kept: the target's distribution after the last one gives a bonus
        seq.pos += 1
        round_tokens.append(seq.accept(logits[len(drafts)]))
        ctx.append(round_tokens[-1].id)
    draft.keep(start + kept)
    stats.drafted += len(drafts)
    stats.accepted += kept
    stats.emitted += len(round_tokens)
    ctl.update(len(drafts), kept)
    return round_tokens


# -- the Python API ----------------------------------------------------------------------------------
class Speculative:
    """A Model that generates with a draft: ``generate``/``chat``/``stream_tokens`` as
    ``Model``'s (one prompt at a time), everything else is the target's. ``stats`` holds the
    last generation's figures."""

    def __init__(self, model, draft="lookup", draft_tokens: int | str = "auto"):
        self.model = model
        self.draft = make_draft(model, draft)
        KControl(draft_tokens)  # validate now, not at the first request
        self.draft_tokens = draft_tokens
        self.stats = SpecStats()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_tokens(self, prompts: list[list[int]], **sampling) -> Iterator[list[Token]]:
        if len(prompts) != 1:
            raise InvalidArgument("speculative decoding generates one prompt at a time")
        self.stats = SpecStats()
        return generate(self.model.network, self.model.tokenizer, prompts[0],
                        self.model._params(sampling), self.draft, self.draft_tokens,
                        stats=self.stats)

    def generate(self, prompt, stream: bool = False, truncate: str | None = None, **sampling):
        if not isinstance(prompt, str):
            return [self.generate(p, truncate=truncate, **sampling) for p in prompt]
        ids = self.model._fit(self.model.encode(prompt), truncate, sampling)
        return self._run(ids, stream, sampling)

    def chat(self, messages: list[dict], stream: bool = False, truncate: str | None = None, **sampling):
        if not isinstance(messages, list) or not messages:
            raise InvalidArgument("messages must be a non-empty list of {'role', 'content'} dicts")
        ids = self.model._fit(self.model.chat_prompt(messages), truncate, sampling)
        return self._run(ids, stream, sampling)

    def _run(self, ids: list[int], stream: bool, sampling: dict):
        events = self.stream_tokens([ids], **sampling)
        pieces = (t.text for step in events for t in step if t.text)
        return pieces if stream else "".join(pieces)


# -- measuring it ------------------------------------------------------------------------------------
def bench(model, draft, prompts: list[list[int]], new_tokens: int = 128,
          draft_tokens: int | str = "auto") -> dict:
    """The target alone and with ``draft``, greedy, side by side on the same prompts (batch 1):
    decode tokens/s of each, the speed-up, acceptance, tokens per target pass, and whether
    every output was identical. Prefill is timed apart (both pay it alike)."""
    from pocketlm.engine.generate import generate as plain

    d = make_draft(model, draft)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    net, tok = model.network, model.tokenizer
    base_s = spec_s = 0.0
    total = SpecStats()
    identical, n_tokens = True, 0
    for i, ids in enumerate(prompts):
        for run in (["warm-up", "timed"] if i == 0 else ["timed"]):
            events = plain(net, tok, [ids], params)
            want = [t.id for t in next(events)]
            t1 = time.perf_counter()
            want += [t.id for step in events for t in step]
            t2 = time.perf_counter()
            stats = SpecStats()
            events = generate(net, tok, ids, params, d, draft_tokens, stats=stats)
            got = [t.id for t in next(events)]
            t3 = time.perf_counter()
            got += [t.id for step in events for t in step]
            t4 = time.perf_counter()
            if run == "warm-up":  # kernels built, plans made, caches touched
                continue
            base_s += t2 - t1
            spec_s += t4 - t3
            identical &= got == want
            n_tokens += len(want) - 1
            for f in ("passes", "drafted", "accepted", "emitted", "draft_s", "verify_s"):
                setattr(total, f, getattr(total, f) + getattr(stats, f))
            break
    total.kind = d.kind
    out = {"draft": d.kind, "new_tokens": new_tokens, "prompts": len(prompts),
           "target_tokens_per_s": n_tokens / base_s, "speculative_tokens_per_s": n_tokens / spec_s,
           "speed_up": base_s / spec_s, "identical": identical, **total.as_dict()}
    out["draft"] = d.kind
    return out
