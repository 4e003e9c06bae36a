"""Sampling settings and the choice of the next token from logits.

``SamplingParams`` is the one description of "how to generate" shared by the Python API, the
CLI and the server (the names follow the OpenAI API and llama.cpp where they differ little).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pocketlm.errors import InvalidArgument


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off          (defaults as llama.cpp's)
    top_p: float = 0.95  # nucleus; 1 = off
    min_p: float = 0.05  # drop tokens below min_p * p(best); 0 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    ignore_eos: bool = False
    top_logprobs: int = 0  # how many alternatives to report with each token's log-prob

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument naming the first value out of range."""
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 0,
             f"max_tokens must be a whole number >= 0, got {self.max_tokens!r}"),
            (_finite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}"),
            (_finite(self.top_p) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_finite(self.min_p) and 0 <= self.min_p < 1,
             f"min_p must be in [0, 1), got {self.min_p!r}"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"),
            (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
             f"top_logprobs must be between 0 and 20, got {self.top_logprobs!r}"),
            (all(isinstance(s, str) and s for s in self.stop),
             f"stop must be non-empty strings, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers and llama.cpp): divide positive logits, multiply
    negative ones, for every token id in ``seen``. logits (V,), seen (N,) ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """One token id from logits (V,) after temperature, top-k, top-p and min-p."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(filtered_probs(logits, params), 1, generator=generator))


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The (V,) weights a non-greedy ``sample`` draws from: temperature, top-k, softmax, min-p,
    then top-p. Not renormalised after the filters (multinomial does not need it); speculative
    decoding's accept/reject rule divides by the sum."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return top_p_filter(probs, params.top_p)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter of probabilities (..., V) along the last axis: keep the most likely
    tokens until their mass reaches ``top_p``, zero the rest (not renormalised; multinomial
    does not need it). ``top_p`` >= 1 returns ``probs`` as they are."""
    if top_p >= 1.0:
        return probs
    # The nucleus is usually a few hundred tokens: sort only the top 1024 (a full sort of a
    # 49k vocabulary costs more than the model's decode step), and all of a row's tokens only
    # where those do not reach top_p.
    flat = probs.reshape(-1, probs.shape[-1])
    k = min(1024, flat.shape[-1])
    top, order = flat.topk(k, dim=-1)
    out = torch.zeros_like(flat).scatter_(-1, order, _nucleus(top, top_p))
    short = (top.sum(-1) < top_p).nonzero()[:, 0] if k < flat.shape[-1] else []
    if len(short):
        top, order = flat[short].sort(dim=-1, descending=True)
        out[short] = torch.zeros_like(top).scatter_(-1, order, _nucleus(top, top_p))
    return out.reshape(probs.shape)


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly better tokens
    return sorted_probs.masked_fill(before >= top_p, 0.0)
