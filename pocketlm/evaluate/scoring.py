"""Log-likelihood of token continuations: the arithmetic every quality metric rests on.

Two entry points, both batched and both exact (no approximation beyond float rounding):

- ``score_choices``: several items, each a context with one or more continuations (the
  answer choices). Each item's context runs **once**: the contexts of a batch are prefilled
  together into a KV cache, each context's cache row is copied to one row per choice, and
  all continuations of the batch then run together from there. The log-likelihood equals
  that of a plain causal pass over ``context + continuation`` (tests pin this).
- ``score_windows``: plain causal passes over token windows, scoring the last ``n`` tokens of
  each; the rolling-window perplexity of WikiText is built on it.

Only the positions that are scored go through the 49k-wide output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pocketlm.model.transformer import KVCache, Transformer


@dataclass
class Scored:
    """Log-likelihood of one continuation and whether greedy decoding reproduces it."""

    logprob: float  # sum of log p(token) over the continuation's tokens, natural log
    greedy: bool  # every continuation token is the argmax of its distribution
    n_tokens: int


def _target_logprobs(
    network: Transformer, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (M, D), targets (M,) -> log p(target) (M,) float64 and is-argmax (M,) bool."""
    logps, greedy = [], []
    for s in range(0, hidden.shape[0], chunk):
        logits = network.lm_head(hidden[s : s + chunk]).float()  # (m, V)
        lp = torch.log_softmax(logits, dim=-1)
        t = targets[s : s + chunk]
        logps.append(lp.gather(1, t[:, None])[:, 0].double())
        greedy.append(lp.argmax(-1) == t)
    if not logps:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logps), torch.cat(greedy)


@torch.inference_mode()
def score_choices(
    network: Transformer, items: list[tuple[list[int], list[list[int]]]]
) -> list[list[Scored]]:
    """Score each item's continuations given its context; one list of ``Scored`` per item.

    ``items`` is a list of (context_ids, [continuation_ids, ...]). Every context and
    continuation must be non-empty, and context + continuation must fit the model's window
    (callers truncate the context on the left first, as lm-evaluation-harness does).
    Raises ValueError otherwise.
    """
    if not items:
        return []
    cfg = network.config
    dtype = network.lm_head.weight.dtype
    ctx_lens = [len(c) for c, _ in items]
    rows = [(i, cont) for i, (_, conts) in enumerate(items) for cont in conts]  # one per choice
    if min(ctx_lens) == 0 or any(len(cont) == 0 for _, cont in rows):
        raise ValueError("contexts and continuations must be non-empty")
    Tc = max(ctx_lens)
    Tk = max(len(cont) for _, cont in rows) - 1  # the last token is only predicted, never fed
    # Cache length: every fed position, plus one spare slot that padding is clamped onto so a
    # pad token never overwrites a real token's key/value.
    S = max(ctx_lens[i] + len(cont) for i, cont in rows)  # >= Tc + 1
    if S > cfg.max_seq_len:
        raise ValueError(f"a context + continuation of {S - 1} tokens exceeds the window "
                         f"{cfg.max_seq_len - 1}")

    # 1) all contexts at once, right-padded: padding sits after each real context, so it is
    #    never attended to by real tokens (causal mask), and pass 2 overwrites its cache slots.
    B = len(items)
    tokens = torch.zeros(B, Tc, dtype=torch.long)
    for i, (c, _) in enumerate(items):
        tokens[i, : len(c)] = torch.tensor(c)
    positions = torch.arange(Tc).expand(B, Tc)
    ctx_cache = KVCache.allocate(cfg, B, S, dtype)
    h = network.hidden(tokens, positions, ctx_cache)  # (B, Tc, D)
    last = h[torch.arange(B), torch.tensor(ctx_lens) - 1]  # (B, D): predicts each first token

    owner = torch.tensor([i for i, _ in rows])  # (N,) which item each choice row belongs to
    first_targets = torch.tensor([cont[0] for _, cont in rows])
    first_lp, first_greedy = _target_logprobs(network, last[owner], first_targets)
    logprob = first_lp.clone()
    greedy = first_greedy.clone()

    # 2) every continuation (minus its last token) from a copy of its item's context cache.
    if Tk > 0:
        N = len(rows)
        cache = KVCache(
            k=[k.index_select(0, owner) for k in ctx_cache.k],  # (N, K, S, E)
            v=[v.index_select(0, owner) for v in ctx_cache.v],
        )
        del ctx_cache
        tokens = torch.zeros(N, Tk, dtype=torch.long)
        positions = torch.zeros(N, Tk, dtype=torch.long)
        for r, (i, cont) in enumerate(rows):
            fed = cont[:-1]
            tokens[r, : len(fed)] = torch.tensor(fed, dtype=torch.long)
            positions[r] = ctx_lens[i] + torch.arange(Tk)  # padding keeps counting up
        positions = positions.clamp(max=S - 1)
        h = network.hidden(tokens, positions, cache)  # (N, Tk, D)
        sel_r = [r for r, (_, cont) in enumerate(rows) for _ in range(len(cont) - 1)]
        sel_t = [t for _, cont in rows for t in range(len(cont) - 1)]
        targets = torch.tensor([cont[t + 1] for _, cont in rows for t in range(len(cont) - 1)])
        if sel_r:
            lp, gr = _target_logprobs(network, h[torch.tensor(sel_r), torch.tensor(sel_t)], targets)
            logprob.index_add_(0, torch.tensor(sel_r), lp)
            bad = torch.zeros(N, dtype=torch.long).index_add_(0, torch.tensor(sel_r), (~gr).long())
            greedy &= bad == 0

    out: list[list[Scored]] = [[] for _ in items]
    for r, (i, cont) in enumerate(rows):
        out[i].append(Scored(float(logprob[r]), bool(greedy[r]), len(cont)))
    return out


@torch.inference_mode()
def score_windows(
    network: Transformer, windows: list[tuple[list[int], int]]
) -> list[Scored]:
    """For each (input_ids, n): log-likelihood of the last ``n`` targets of a causal pass.

    The targets are ``input_ids[1:]`` plus one extra token the caller appends: a window is
    given as the ``len(input_ids) + 1`` tokens it covers, and its last ``n`` are scored.
    Raises ValueError for a window longer than the model's context.
    """
    if not windows:
        return []
    lens = [len(w) - 1 for w, _ in windows]  # tokens fed
    T = max(lens)
    if T > network.config.max_seq_len:
        raise ValueError(f"a window of {T} tokens exceeds the model's {network.config.max_seq_len}")
    B = len(windows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, (w, _) in enumerate(windows):
        tokens[b, : lens[b]] = torch.tensor(w[:-1], dtype=torch.long)
    h = network.hidden(tokens)  # (B, T, D) plain causal pass; right padding is never attended
    out = []
    for b, (w, n) in enumerate(windows):
        L = lens[b]
        targets = torch.tensor(w[L + 1 - n : L + 1], dtype=torch.long)
        lp, gr = _target_logprobs(network, h[b, L - n : L], targets)
        out.append(Scored(float(lp.sum()), bool(gr.all()), n))
    return out
