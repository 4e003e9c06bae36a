"""Generation as a user sees it: sampling settings, stop rules, streaming, batches, limits."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from pocketlm.engine.generate import SequenceState
from pocketlm.engine.sampling import SamplingParams, apply_repetition_penalty, sample
from pocketlm.errors import ContextOverflow, InvalidArgument


def test_greedy_is_deterministic_and_streaming_is_the_same_text(tiny_model):
    a = tiny_model.generate("the cat", max_tokens=20, temperature=0)
    b = "".join(tiny_model.generate("the cat", max_tokens=20, temperature=0, stream=True))
    assert a == b and len(a) > 0


def test_seeded_sampling_is_reproducible(tiny_model):
    runs = [tiny_model.generate("in the", max_tokens=20, temperature=1.0, seed=42) for _ in range(2)]
    assert runs[0] == runs[1]


def test_batch_returns_one_answer_per_prompt_in_order(tiny_model):
    prompts = ["a", "the other one", "in"]
    batch = tiny_model.generate(prompts, max_tokens=8, temperature=0)
    assert batch == [tiny_model.generate(p, max_tokens=8, temperature=0) for p in prompts]


def test_chat_uses_the_template(tiny_model):
    msgs = [{"role": "user", "content": "hi"}]
    prompt = tiny_model.tokenizer.apply_chat_template(msgs)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_model.chat(msgs, max_tokens=6, temperature=0) == tiny_model.generate(
        prompt, max_tokens=6, temperature=0)


def test_max_tokens_and_finish_reasons(tiny_model):
    steps = list(tiny_model.stream_tokens([[5, 6, 7]], max_tokens=5, temperature=0, ignore_eos=True))
    tokens = [t for step in steps for t in step]
    assert len(tokens) == 5
    assert [t.finish_reason for t in tokens] == [None] * 4 + ["length"]


def test_generation_stops_at_the_context_window(tiny_model):
    limit = tiny_model.config.max_seq_len  # 256
    prompt = list(range(3, 3 + limit - 4))
    steps = list(tiny_model.stream_tokens([prompt], max_tokens=100, temperature=0, ignore_eos=True))
    tokens = [t for step in steps for t in step]
    assert len(tokens) == 4 and tokens[-1].finish_reason == "length"


class _FakeTokenizer:
    """Token i decodes to PIECES[i]: lets a test drive SequenceState with known text."""

    PIECES: ClassVar[list[str]] = ["Hel", "lo", " wor", "ld", "!", "\n", "END", "é"[0]]
    stop_ids: ClassVar[set[int]] = {6}
    eos_id = 6

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def _drive(ids, **params):
    s = SequenceState(0, [0], SamplingParams(temperature=0, **params), _FakeTokenizer(), 1000)
    out = []
    for i in ids:
        logits = torch.full((8,), -10.0)
        logits[i] = 10.0
        out.append(s.accept(logits))
        if s.done:
            break
    return s, out


def test_stop_string_split_across_tokens_is_cut_and_never_shown():
    s, out = _drive([0, 1, 2, 3, 4], stop=["o wo"])
    assert s.finish_reason == "stop"
    assert "".join(t.text for t in out) == "Hell"
    assert s.text == "Hell"


def test_text_that_might_start_a_stop_string_is_held_back_then_released():
    s, out = _drive([0, 1, 4], stop=["lo!!"], max_tokens=3)
    # "l" and then "lo" could each be the start of "lo!!", so they wait until they cannot be
    assert [t.text for t in out] == ["He", "l", "lo!"]
    assert s.finish_reason == "length"


def test_eos_token_ends_and_is_not_shown():
    s, out = _drive([0, 1, 6, 2])
    assert s.finish_reason == "stop" and "".join(t.text for t in out) == "Hello"


def test_top_k_1_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1)) == 1
    # p = softmax: [0.09, 0.64, 0.24, 0.03]; top_p=0.6 keeps only the best token
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.6, min_p=0)
    assert {sample(logits, params, g) for _ in range(50)} == {1}
    # top_p=0.8 keeps the two best (0.64 < 0.8 so the second is needed)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0)
    assert {sample(logits, params, g) for _ in range(200)} == {1, 2}
    # min_p=0.2 drops tokens below 0.2 * 0.64 = 0.128
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert {sample(logits, params, g) for _ in range(200)} == {1, 2}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 1.0},
    {"max_tokens": -5}, {"repetition_penalty": 0}, {"temperature": float("nan")},
])
def test_invalid_sampling_values_are_refused_by_name(tiny_model, bad):
    with pytest.raises(InvalidArgument, match=next(iter(bad))):
        tiny_model.generate("x", **bad)


def test_unknown_option_is_refused(tiny_model):
    with pytest.raises(InvalidArgument, match="unknown generation option"):
        tiny_model.generate("x", temprature=0.5)


def test_prompt_longer_than_context_is_refused_or_truncated_on_request(tiny_model):
    long = "the " * 400  # > 256 tokens
    with pytest.raises(ContextOverflow, match="context window is 256"):
        tiny_model.generate(long, max_tokens=4)
    out = tiny_model.generate(long, max_tokens=4, temperature=0, truncate="left")
    assert isinstance(out, str)


def test_empty_prompt_is_refused(tiny_model):
    with pytest.raises(InvalidArgument, match="empty"):
        tiny_model.generate("", max_tokens=4)


def test_top_p_filter_on_a_batch_equals_filtering_each_row():
    from pocketlm.engine.sampling import top_p_filter

    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3, -1)
    both = top_p_filter(probs, 0.8)
    for row, out in zip(probs, both):
        assert torch.equal(top_p_filter(row, 0.8), out)
        kept = out > 0
        # the kept tokens are the most likely ones, and the fewest that reach 0.8 of the mass
        assert row[kept].min() >= row[~kept].max()
        assert row[kept].sum() >= 0.8 and row[kept].sum() - row[kept].min() < 0.8
    assert top_p_filter(probs, 1.0) is probs
    # A vocabulary past the 1024 tokens it sorts first: sharp rows are decided from those,
    # flat rows (nucleus > 1024 tokens) from a full sort; both as a full sort decides.
    g = torch.Generator().manual_seed(1)
    wide = torch.softmax(torch.randn(6, 5000, generator=g) * torch.tensor([[0.5], [6], [1],
                                                                          [8], [0.1], [4]]), -1)
    sorted_probs, order = wide.sort(dim=-1, descending=True)
    expect = torch.zeros_like(wide).scatter_(
        -1, order, sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= 0.9, 0))
    got = top_p_filter(wide, 0.9)
    assert torch.equal(got, expect)
    sizes = (got > 0).sum(-1)
    assert sizes.max() > 1024 and sizes.min() < 1024
