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
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
