"""The cascade: a small model answers first; when it is unsure, a larger one answers instead.

    c = Cascade(pocketlm.load("smollm2-135m-instruct"), pocketlm.load("qwen2.5-coder-1.5b-instruct"),
                threshold=-0.8, confidence="mean_logprob")
    a = c.chat([{"role": "user", "content": "What is 2 + 2?"}], temperature=0)
    a.text, a.by, a.confidence        # by: "small" or "large"

Confidence of a generated answer (higher = surer), from the small model's own token
log-probabilities (``Token.logprob``, the one decode loop's):
- ``mean_logprob``: mean log p of the answer's tokens;
- ``min_logprob``: the least likely token's log p;
- ``entropy``: minus the mean entropy of the next-token distribution, over the top 20
  alternatives at each step (renormalised; a bound from below on the full entropy's size).
For multiple choice (``choose``): ``margin`` = p(best) - p(second) over the choices'
softmaxed length-normalised log-likelihoods (lm-eval's acc_norm scores).

``sweep`` and ``calibrate`` pick the threshold on labelled data: every distinct confidence is
a candidate, quality and the share sent to the large model are computed for each, and the
threshold chosen is the one with the smallest share whose quality reaches the target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from pocketlm.errors import InvalidArgument

CONFIDENCES = ("mean_logprob", "min_logprob", "entropy", "margin")


def confidence_of(tokens, kind: str = "mean_logprob") -> float:
    """A generated answer's confidence from its Tokens (see the module docstring)."""
    toks = [t for t in tokens if t.id >= 0]
    if not toks:
        return -math.inf
    if kind == "mean_logprob":
        return sum(t.logprob for t in toks) / len(toks)
    if kind == "min_logprob":
        return min(t.logprob for t in toks)
    if kind == "entropy":
        ents = []
        for t in toks:
            lps = torch.tensor([lp for _, lp in t.top_logprobs] or [t.logprob])
            p = torch.softmax(lps, 0)
            ents.append(float(-(p * p.clamp(min=1e-12).log()).sum()))
        return -sum(ents) / len(ents)
    raise InvalidArgument(f"confidence must be one of {CONFIDENCES[:3]} for generation, got {kind!r}")


@dataclass
class CascadeAnswer:
    text: str
    by: str  # "small" or "large"
    confidence: float  # the small model's
    small_text: str = ""


class Cascade:
    """Small answers, large answers when the small one's confidence is below ``threshold``."""

    def __init__(self, small, large, threshold: float, confidence: str = "mean_logprob"):
        if confidence not in CONFIDENCES:
            raise InvalidArgument(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        self.small, self.large, self.threshold, self.kind = small, large, float(threshold), confidence
        self.counts = {"small": 0, "large": 0}

    def _small(self, ids: list[int], sampling: dict) -> tuple[str, float]:
        if self.kind == "entropy":
            sampling = {**sampling, "top_logprobs": 20}
        toks = [t for step in self.small.stream_tokens([ids], **sampling) for t in step]
        return "".join(t.text for t in toks), confidence_of(toks, self.kind)

    def chat(self, messages: list[dict], **sampling) -> CascadeAnswer:
        text, conf = self._small(self.small.chat_prompt(messages), sampling)
        if conf >= self.threshold:
            self.counts["small"] += 1
            return CascadeAnswer(text, "small", conf, text)
        self.counts["large"] += 1
        return CascadeAnswer(self.large.chat(messages, **sampling), "large", conf, text)

    def generate(self, prompt: str, **sampling) -> CascadeAnswer:
        text, conf = self._small(self.small.encode(prompt), sampling)
        if conf >= self.threshold:
            self.counts["small"] += 1
            return CascadeAnswer(text, "small", conf, text)
        self.counts["large"] += 1
        return CascadeAnswer(self.large.generate(prompt, **sampling), "large", conf, text)

    def choose(self, context: str, choices: list[str]) -> tuple[int, str, float]:
        """A multiple-choice answer: (index, "small"/"large", the small model's margin)."""
        pick, margin = choice_scores(self.small, context, choices)
        if margin >= self.threshold:
            return pick, "small", margin
        return choice_scores(self.large, context, choices)[0], "large", margin


def choice_scores(model, context: str, choices: list[str]) -> tuple[int, float]:
    """(argmax of length-normalised log-likelihood, margin p1 - p2 of their softmax)."""
    return choice_scores_many(model, [(context, choices)])[0]


def choice_scores_many(model, items: list[tuple[str, list[str]]], batch: int = 8) -> list[tuple[int, float]]:
    """``choice_scores`` for many (context, choices) items, ``batch`` items a forward pass: a
    pass over packed weights costs about the same for one item or eight, so calibration
    scores them together as the evaluator does."""
    from pocketlm.evaluate import scoring
    from pocketlm.evaluate.run import _request

    window = model.config.max_seq_len - 1
    out = []
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        reqs = [_request(model.tokenizer, ctx, [" " + c for c in choices], window) for ctx, choices in part]
        for (_, choices), scored in zip(part, scoring.score_choices(model.network, reqs)):
            norm = torch.tensor([s.logprob / max(1, len(c)) for s, c in zip(scored, choices)])
            p = torch.softmax(norm, 0).sort(descending=True).values
            out.append((int(norm.argmax()), float(p[0] - (p[1] if len(p) > 1 else 0.0))))
    return out


# -- choosing the threshold ------------------------------------------------------------------------
@dataclass
class Point:
    threshold: float
    large_share: float  # fraction of items sent to the large model
    quality: float  # mean score of the cascade's answers


def sweep(confidence: list[float], small_ok: list[float], large_ok: list[float]) -> list[Point]:
    """Every operating point: for each candidate T (each distinct confidence, and +inf), items
    with confidence < T go to the large model. Sorted by increasing share."""
    n = len(confidence)
    if not n or not len(small_ok) == len(large_ok) == n:
        raise InvalidArgument("sweep needs as many small/large scores as confidences, at least one")
    order = sorted(range(n), key=lambda i: confidence[i])
    base = sum(small_ok)
    points = [Point(-math.inf, 0.0, base / n)]
    gain = 0.0
    for j, i in enumerate(order):  # T just above confidence[i]: items order[:j+1] go large
        gain += large_ok[i] - small_ok[i]
        last_of_tie = j + 1 == n or confidence[order[j + 1]] != confidence[i]
        if last_of_tie:
            t = confidence[order[j + 1]] if j + 1 < n else math.inf
            points.append(Point(t, (j + 1) / n, (base + gain) / n))
    return points


def pick_threshold(points: list[Point], target_quality: float) -> Point:
    """The point with the smallest large-model share whose quality reaches ``target_quality``
    (if none does, the best-quality point)."""
    good = [p for p in points if p.quality >= target_quality - 1e-12]
    if not good:
        return max(points, key=lambda p: (p.quality, -p.large_share))
    return min(good, key=lambda p: (p.large_share, -p.quality))


def plot(curves: dict[str, list[Point]], path: str, large_quality: dict[str, float] | None = None,
         chosen: dict[str, Point] | None = None) -> str:
    """Quality against the share sent to the large model, one line per task, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in curves.items():
        line = ax.plot([p.large_share for p in pts], [p.quality for p in pts], label=name)[0]
        if large_quality and name in large_quality:
            ax.axhline(large_quality[name], color=line.get_color(), ls=":", lw=1)
        if chosen and name in chosen:
            c = chosen[name]
            ax.plot([c.large_share], [c.quality], "o", color=line.get_color())
    ax.set_xlabel("share of items sent to the large model")
    ax.set_ylabel("quality (accuracy)")
    ax.set_title("cascade: quality vs cost (dotted: large model alone)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def calibrate_choices(small, large, items, target: float = 0.97) -> dict:
    """Score multiple-choice ``items`` (``evaluate.tasks.Choice``) with both models; returns
    the curve, the large model's accuracy, the threshold reaching ``target`` x it, and the
    seconds each model spent scoring (``small_s``, ``large_s``): the cascade at the chosen
    point costs ``small_s + large_share * large_s`` against ``large_s`` for the large alone."""
    pairs = [(it.context, it.choices) for it in items]
    t0 = time.perf_counter()
    small_scores = choice_scores_many(small, pairs)
    t1 = time.perf_counter()
    large_scores = choice_scores_many(large, pairs)
    small_s, large_s = t1 - t0, time.perf_counter() - t1
    conf = [margin for _, margin in small_scores]
    s_ok = [float(pick == it.gold) for (pick, _), it in zip(small_scores, items)]
    l_ok = [float(pick == it.gold) for (pick, _), it in zip(large_scores, items)]
    points = sweep(conf, s_ok, l_ok)
    large_acc = sum(l_ok) / len(l_ok)
    chosen = pick_threshold(points, target * large_acc)
    return {"points": points, "small_accuracy": sum(s_ok) / len(s_ok), "large_accuracy": large_acc,
            "chosen": chosen, "target": target, "n": len(items), "small_s": small_s,
            "large_s": large_s}
