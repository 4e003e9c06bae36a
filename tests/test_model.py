"""The network and tokenizer against independent references, and the KV cache's bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_tiny_model

from pocketlm.engine.generate import decode_step, forward_at, prefill
from pocketlm.model.transformer import KVCache

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "Q: What is 17 * 23?\nA:",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "Les enfants jouent dans le jardin et",
    "The mitochondria is the powerhouse of",
    "import numpy as np\nx = np.",
    "1, 1, 2, 3, 5, 8,",
    "Здравствуйте! Как",
    "In 1969, Neil Armstrong",
    '{"name": "Alice", "age":',
]


# -- the real model against llama.cpp's tokenizer and transformers' network -----------------
@pytest.mark.slow
def test_tokenizer_matches_llama_cpp_on_every_golden_text(default_model, golden):
    cases = json.loads((golden / "smollm2-135m-instruct.tokens.json").read_text())
    assert len(cases) == 34
    mismatched = [c["text"] for c in cases if default_model.encode(c["text"]) != c["ids"]]
    assert mismatched == []
    for c in cases:  # and decoding gives the text back
        assert default_model.tokenizer.decode(c["ids"]) == c["text"]


@pytest.fixture(scope="module")
def hf_reference(default_model):
    """transformers' own GGUF loader on the same file: an independent dequantizer and network."""
    transformers = pytest.importorskip("transformers")
    from pocketlm.api import resolve

    path = resolve("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return hf.eval()


@pytest.mark.slow
def test_logits_and_greedy_continuations_match_transformers(default_model, hf_reference):
    worst = 0.0
    for text in PROMPTS:
        ids = default_model.encode(text)
        with torch.inference_mode():
            ours = default_model.logits(ids)
            theirs = hf_reference(torch.tensor([ids])).logits[0]
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst < 1e-3

    for text in PROMPTS:
        ids = default_model.encode(text)
        steps = default_model.stream_tokens([ids], max_tokens=32, temperature=0, ignore_eos=True)
        ours = [t.id for step in steps for t in step]
        # Teacher forcing: transformers' greedy choice after every prefix of our continuation.
        # It equals our next token at each position iff its own greedy run is the same sequence.
        with torch.inference_mode():
            theirs = hf_reference(torch.tensor([ids + ours])).logits[0, len(ids) - 1 : -1].argmax(-1)
        assert ours == theirs.tolist(), text


@pytest.mark.slow
def test_chat_template_renders_like_transformers(default_model):
    transformers = pytest.importorskip("transformers")
    tok = default_model.tokenizer
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, chat_template=tok.chat_template,
        bos_token=tok.bos_token, eos_token=tok.eos_token,
    )
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs


# -- cache bookkeeping, exact on a tiny model -----------------------------------------------
def test_cached_decoding_equals_one_full_pass(tiny_model):
    net = tiny_model.network
    ids = torch.randint(0, 260, (1, 24)).tolist()[0]
    full = tiny_model.logits(ids)
    cache = KVCache.allocate(net.config, 1, 32)
    with torch.inference_mode():
        first = prefill(net, cache, 0, ids[:10])
        steps = [decode_step(net, cache, torch.tensor([t]), torch.tensor([10 + i]))[0]
                 for i, t in enumerate(ids[10:])]
    torch.testing.assert_close(first, full[9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps), full[10:], atol=1e-5, rtol=1e-5)


def test_several_draft_tokens_verified_in_one_pass_and_rolled_back(tiny_model):
    """What speculative decoding needs: score K tokens at once, then rewind and take another path."""
    net = tiny_model.network
    ids = list(range(5, 25))
    full = tiny_model.logits(ids)
    cache = KVCache.allocate(net.config, 1, 32)
    with torch.inference_mode():
        prefill(net, cache, 0, ids[:8])
        wrong = forward_at(net, cache, 0, [1, 2, 3, 4], start=8)  # a rejected draft
        assert wrong.shape == (4, net.config.vocab_size)
        right = forward_at(net, cache, 0, ids[8:], start=8)  # rewind: same positions again
    torch.testing.assert_close(right, full[8:], atol=1e-5, rtol=1e-5)


def test_batched_sequences_at_their_own_positions_match_single_runs(tiny_model):
    prompts = [[7, 8, 9], list(range(30, 47)), [100, 101, 102, 103, 104, 105]]
    alone = []
    for p in prompts:
        steps = tiny_model.stream_tokens([p], max_tokens=12, temperature=0, ignore_eos=True)
        alone.append([t.id for step in steps for t in step])
    together = [[] for _ in prompts]
    for step in tiny_model.stream_tokens(prompts, max_tokens=12, temperature=0, ignore_eos=True):
        for t in step:
            together[t.index].append(t.id)
    assert together == alone


def test_logprobs_are_the_model_distribution(tiny_model):
    ids = [10, 20, 30]
    steps = list(tiny_model.stream_tokens([ids], max_tokens=1, temperature=0, top_logprobs=3))
    tok = steps[0][0]
    expected = torch.log_softmax(tiny_model.logits(ids)[-1], -1)
    assert tok.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert tok.top_logprobs[0][0] == tok.id
    assert [i for i, _ in tok.top_logprobs] == expected.topk(3).indices.tolist()


def test_hidden_states_feed_the_output_projection(tiny_model):
    net = tiny_model.network
    tokens = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        h = net.hidden(tokens)
        assert h.shape == (1, 4, net.config.dim)
        torch.testing.assert_close(net.lm_head(h), net(tokens))


def test_untied_model_without_gqa_runs(tmp_path):
    m = make_tiny_model(tie_embeddings=False, n_kv_heads=4)
    assert m.network.lm_head.weight is not m.network.embed_tokens.weight
    out = m.generate("hello", max_tokens=5, temperature=0)
    assert isinstance(out, str)
