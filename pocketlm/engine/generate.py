"""The one decode loop: prefill, decode step, and the per-sequence bookkeeping around them.

Everything that generates text — ``Model.generate``/``chat``, the CLI, the server's scheduler,
the evaluator — goes through ``prefill``/``decode_step`` and ``SequenceState``; ``generate``
is the static-batch loop over them. Non-streaming output is a fold over the stream.

Speculative decoding (later) reuses ``forward_at``: several tokens verified in one pass at
explicit positions, and a rejected suffix is "rolled back" simply by moving ``pos`` back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from pocketlm.engine import fused
from pocketlm.engine.sampling import SamplingParams, apply_repetition_penalty, sample
from pocketlm.errors import ContextOverflow, InvalidArgument
from pocketlm.model.tokenizer import Tokenizer
from pocketlm.model.transformer import KVCache, Transformer


@dataclass
class Token:
    """One generated token of one sequence, as the stream reports it."""

    index: int  # which sequence of the batch
    id: int
    logprob: float  # log p(id) under the model's own distribution (before sampling tweaks)
    text: str  # text this token releases; "" while held back (partial UTF-8 or stop string)
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


# -- the two forward passes ---------------------------------------------------------------
def forward_at(
    model: Transformer, cache: KVCache, row: int, ids: list[int], start: int
) -> torch.Tensor:
    """Run ``ids`` for cache row ``row`` at positions start.. ; logits (T, V) for each."""
    tokens = torch.tensor([ids], dtype=torch.long)
    positions = torch.arange(start, start + len(ids))[None]
    return model(tokens, positions, cache, rows=slice(row, row + 1))[0]


def prefill(model: Transformer, cache: KVCache, row: int, ids: list[int], start: int = 0) -> torch.Tensor:
    """Fill the cache with a prompt in one pass; logits (V,) for the next token."""
    tokens = torch.tensor([ids], dtype=torch.long)
    positions = torch.arange(start, start + len(ids))[None]
    h = model.hidden(tokens, positions, cache, rows=slice(row, row + 1))
    return model.lm_head(h[0, -1])  # only the last position needs the 49k-wide projection


def decode_step(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """One new token for each of the first B cache rows: tokens, positions (B,) -> logits (B, V).

    The fused C++ step (``engine/fused.py``) when it covers this model, else the PyTorch path.
    """
    logits = fused.decode(model, cache, tokens, positions)
    if logits is not None:
        return logits
    return model(tokens[:, None], positions[:, None], cache, rows=slice(0, tokens.shape[0]))[:, 0]


# -- per-sequence state -------------------------------------------------------------------
class SequenceState:
    """A prompt being continued: its sampler, stop rules and incremental detokenizer."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_len: int,
    ):
        self.index, self.prompt, self.params, self.tokenizer = index, prompt, params, tokenizer
        self.out: list[int] = []
        self.pos = len(prompt)  # position the next fed token is written at
        self.limit = min(params.max_tokens, max_len - len(prompt))
        self.finish_reason: str | None = None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.stop_ids = set() if params.ignore_eos else tokenizer.stop_ids
        self._text = ""  # all text decoded so far
        self._released = 0  # characters of _text already reported

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._text[: self._released]

    def accept(self, logits: torch.Tensor) -> Token:
        """Choose the next token from logits (V,) and update the state."""
        p = self.params
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt) | set(self.out)), dtype=torch.long)
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        return self.push(sample(logits, p, self.generator), logprobs)

    def push(self, tok: int, logprobs: torch.Tensor) -> Token:
        """Append a token chosen elsewhere (speculative decoding's accept/reject) and apply
        the stop rules; ``logprobs`` (V,) is the model's own log-softmax at that position."""
        p = self.params
        top = []
        if p.top_logprobs:
            vals, ids = logprobs.topk(p.top_logprobs)
            top = list(zip(ids.tolist(), vals.tolist()))
        self.out.append(tok)
        text = ""
        if tok in self.stop_ids:
            self.finish_reason = "stop"
        else:
            text = self._release_text()
        if not self.done and len(self.out) >= self.limit:
            self.finish_reason = "length"
            text += self._flush()
        return Token(self.index, tok, float(logprobs[tok]), text, self.finish_reason, top)

    def _release_text(self) -> str:
        self._text = self.tokenizer.decode(self.out)
        end = len(self._text)
        if self._text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            end = len(self._text.rstrip("\ufffd"))
        for s in self.params.stop:
            hit = self._text.find(s, max(0, self._released - len(s) + 1))
            if hit != -1:
                self._text = self._text[:hit]
                self.finish_reason = "stop"
                return self._take(hit)
        for s in self.params.stop:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(s) - 1, end - self._released), 0, -1):
                if self._text[:end].endswith(s[:k]):
                    end -= k
                    break
        return self._take(end)

    def _flush(self) -> str:
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        end = max(end, self._released)
        piece = self._text[self._released : end]
        self._released = end
        return piece


# -- the static-batch loop ----------------------------------------------------------------
def check_prompt(prompt: list[int], max_len: int) -> None:
    if not prompt:
        raise InvalidArgument("the prompt is empty; give at least one token of text")
    if len(prompt) >= max_len:
        raise ContextOverflow(
            f"the prompt is {len(prompt)} tokens but the context window is {max_len}; "
            "shorten it, or truncate from the left (truncate='left' / --truncate left)"
        )


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    max_len: int | None = None,
) -> Iterator[list[Token]]:
    """Continue several prompts at once; yields, per step, one Token per unfinished sequence.

    Each sequence runs at its own position in a shared, preallocated KV cache. Raises
    ContextOverflow if a prompt does not fit the context window (``max_len``, default the
    model's); generation stops with finish_reason "length" when the window is full.
    """
    max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    for p in prompts:
        check_prompt(p, max_len)
    seqs = [SequenceState(i, p, sp, tokenizer, max_len) for i, (p, sp) in enumerate(zip(prompts, params))]
    need = max(min(len(s.prompt) + s.limit, max_len) for s in seqs)
    cache = KVCache.allocate(model.config, len(seqs), need, dtype=model.lm_head.weight.dtype)

    first = []
    for s in seqs:
        if s.limit <= 0:
            s.finish_reason = "length"
            first.append(Token(s.index, -1, 0.0, "", "length"))
            continue
        first.append(s.accept(prefill(model, cache, s.index, s.prompt)))
    yield first
    while not all(s.done for s in seqs):
        # Finished sequences keep re-feeding their last token at a frozen position: their rows
        # cost a little compute but keep the batch a plain slice of the cache.
        tokens = torch.tensor([s.out[-1] if s.out else 0 for s in seqs])
        positions = torch.tensor([min(s.pos, need - 1) for s in seqs])
        logits = decode_step(model, cache, tokens, positions)
        step = []
        for s, row in zip(seqs, logits):
            if s.done:
                continue
            s.pos += 1
            step.append(s.accept(row))
        yield step
