"""The cascade: small answers unless unsure; the threshold sweep and plot on labelled data."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import make_tiny_model

from pocketlm.engine.generate import Token
from pocketlm.errors import InvalidArgument
from pocketlm.evaluate.tasks import Choice
from pocketlm.hybrid import cascade as C


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tok(lp, top=()):
    return Token(0, 5, lp, "x", None, list(top))


def test_confidences_of_a_generated_answer():
    toks = [tok(-0.1), tok(-2.0), tok(-0.3)]
    assert C.confidence_of(toks, "mean_logprob") == pytest.approx(-0.8)
    assert C.confidence_of(toks, "min_logprob") == -2.0
    flat = [tok(-1, [(1, math.log(0.5)), (2, math.log(0.5))])]
    assert C.confidence_of(flat, "entropy") == pytest.approx(-math.log(2))
    assert C.confidence_of([Token(0, -1, 0.0, "", "length")]) == -math.inf
    with pytest.raises(InvalidArgument, match="confidence must be"):
        C.confidence_of(toks, "vibes")


def test_sweep_is_exact():
    conf = [0.9, 0.2, 0.5, 0.5, 0.1]
    small = [1, 0, 1, 0, 0]
    large = [1, 1, 1, 1, 0]
    pts = C.sweep(conf, small, large)
    assert [(p.large_share, p.quality) for p in pts] == [
        (0.0, 0.4), (0.2, 0.4), (0.4, 0.6), (0.8, 0.8), (1.0, 0.8)]
    assert [p.threshold for p in pts] == [-math.inf, 0.2, 0.5, 0.9, math.inf]
    best = C.pick_threshold(pts, 0.97 * 0.8)
    assert (best.threshold, best.large_share) == (0.9, 0.8)  # the cheapest point reaching 0.776
    assert C.pick_threshold(pts, 0.6).large_share == 0.4
    assert C.pick_threshold(pts, 2.0).quality == 0.8  # unreachable: the best quality


def test_cascade_escalates_below_the_threshold():
    small, large = make_tiny_model(seed=0), make_tiny_model(seed=1)
    msgs = [{"role": "user", "content": "hi"}]
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    keep = C.Cascade(small, large, threshold=-1e9).chat(msgs, **params)
    assert keep.by == "small" and keep.text == small.chat(msgs, **params)
    up = C.Cascade(small, large, threshold=0.0).chat(msgs, **params)  # log-probs are < 0
    assert up.by == "large" and up.text == large.chat(msgs, **params)
    assert up.small_text == keep.text and up.confidence == pytest.approx(keep.confidence)
    ent = C.Cascade(small, large, threshold=-1e9, confidence="entropy").generate("the", **params)
    assert ent.by == "small" and ent.confidence < 0


def test_calibrate_choices_and_plot(tmp_path):
    small, large = make_tiny_model(seed=0), make_tiny_model(seed=1)
    items = [Choice("Question: what is it?\nAnswer:", ["a cat", "the dog", "in a box"], g % 3)
             for g in range(6)]
    r = C.calibrate_choices(small, large, items, target=0.97)
    assert r["n"] == 6 and r["points"][0].large_share == 0 and r["points"][-1].large_share == 1
    assert r["points"][-1].quality == pytest.approx(r["large_accuracy"])
    assert r["points"][0].quality == pytest.approx(r["small_accuracy"])
    assert r["small_s"] > 0 and r["large_s"] > 0  # what each model's scoring cost, for the saving
    # scoring items eight at a time gives each item what scoring it alone gives
    many = C.choice_scores_many(small, [(it.context, it.choices) for it in items], batch=4)
    for it, (pick, margin) in zip(items, many):
        one = C.choice_scores(small, it.context, it.choices)
        assert pick == one[0] and margin == pytest.approx(one[1], abs=1e-4)
    path = C.plot({"toy": r["points"]}, str(tmp_path / "c.png"), {"toy": r["large_accuracy"]},
                  {"toy": r["chosen"]})
    from pathlib import Path

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pick, by, margin = C.Cascade(small, large, 2.0).choose(items[0].context, items[0].choices)
    assert by == "large" and 0 <= margin <= 1 and pick == C.choice_scores(large, items[0].context, items[0].choices)[0]
