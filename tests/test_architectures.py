"""Every architecture pocketlm runs, against transformers' own implementation of it.

A tiny random model of each family is built with transformers' classes, saved as a Hugging
Face folder and written as a GGUF file the way llama.cpp's converter lays it out; pocketlm
loads both and must give transformers' logits (fp32) and its greedy continuation, decoding
token by token through the KV cache exactly as a full forward pass would.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import HF_ARCHS, make_hf_model, save_hf_folder, write_hf_as_gguf

import pocketlm
from pocketlm.errors import UnsupportedModel
from pocketlm.model.config import ModelConfig
from pocketlm.model.transformer import KVCache

gguf = pytest.importorskip("gguf")
PROMPT = [5, 77, 101, 9, 200, 31, 64, 140, 12, 250, 3, 99, 180, 45]  # 14 > the window of 5
GGUF_ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module", params=list(HF_ARCHS))
def pair(request, tmp_path_factory):
    """(arch, transformers model, pocketlm model loaded from its saved folder)."""
    hf = make_hf_model(request.param)
    folder = save_hf_folder(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, pocketlm.load(folder)


def hf_logits(hf, ids) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def hf_greedy(hf, ids, n) -> list[int]:
    """transformers' greedy continuation, each step a full forward pass (no cache)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    return ids[-n:]


def test_folder_logits_match_transformers(pair):
    arch, hf, m = pair
    assert m.config.arch == arch.split("-")[0]
    torch.testing.assert_close(m.logits(PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_cached_decode_equals_full_forward_and_greedy_matches(pair):
    _, hf, m = pair
    net, n = m.network, 12
    cache = KVCache.allocate(m.config, 1, 64)
    with torch.no_grad():
        logits = net(torch.tensor([PROMPT[:3]]), torch.arange(3)[None], cache)[0]
        ids = list(PROMPT[:3])
        for t in range(3, len(PROMPT) + n):  # prompt fed one token at a time, then greedy
            nxt = PROMPT[t] if t < len(PROMPT) else int(logits[-1].argmax())
            ids.append(nxt)
            logits = net(torch.tensor([[nxt]]), torch.tensor([[t]]), cache)[0]
            full = net(torch.tensor([ids]))[0, -1]
            torch.testing.assert_close(logits[-1], full, atol=1e-4, rtol=0)
    ours = ids[len(PROMPT):] + [int(logits[-1].argmax())]
    assert ours[:n] == hf_greedy(hf, PROMPT, n)
    steps = list(m.stream_tokens([PROMPT], max_tokens=n, temperature=0))  # the engine's loop
    engine = [t.id for step in steps for t in step]
    assert engine == ours[: len(engine)] and engine


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_gguf_in_llama_cpp_layout_gives_transformers_logits(tmp_path, arch):
    hf = make_hf_model(arch)
    m = pocketlm.load(write_hf_as_gguf(hf, tmp_path / f"{arch}.gguf"))
    assert m.config.arch == arch
    torch.testing.assert_close(m.logits(PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_config_round_trips_through_hugging_face_keys(pair):
    arch, hf, m = pair
    hf_cfg = m.config.to_hf()
    assert ModelConfig.from_hf(json.loads(json.dumps(hf_cfg))) == m.config
    import transformers

    rebuilt = getattr(transformers, HF_ARCHS[arch][0]).from_pretrained(
        None, config=transformers.AutoConfig.for_model(**hf_cfg), state_dict=hf.state_dict())
    torch.testing.assert_close(hf_logits(rebuilt.eval(), PROMPT), hf_logits(hf, PROMPT))


def test_saved_folder_loads_back_here_and_in_transformers(pair, tmp_path):
    import transformers

    _, hf, m = pair
    m.save(tmp_path / "saved")
    again = pocketlm.load(tmp_path / "saved")
    torch.testing.assert_close(again.logits(PROMPT), m.logits(PROMPT), atol=1e-5, rtol=0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(hf_logits(theirs, PROMPT), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedModel, match="llama, qwen2, qwen3 and gemma3_text"):
        ModelConfig.from_hf({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})


# -- the real models (slow): the dequantized GGUF weights in transformers vs ours, at fp32 -------
REAL = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,", "import numpy as np\nx = np.", "The quick brown fox",
    "Translate to French: good morning ->", "SELECT name FROM users WHERE",
    "Water boils at a temperature of", "<html>\n<head>\n<title>", "The three primary colors are",
    "In 1969, Neil Armstrong",
]


@pytest.fixture(scope="module", params=REAL)
def real(request):
    """(our model from the GGUF, dequantized to fp32; transformers' on the same weights)."""
    import transformers

    from pocketlm.formats import registry

    path = registry.stored_path(request.param)
    if path is None:
        pytest.skip(f"{request.param} is not pulled (pocketlm pull {request.param})")
    m = pocketlm.load(path, dtype=torch.float32)
    cfg = transformers.AutoConfig.for_model(**m.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    state = {}  # the same tensors (no copy), under HF's names; Gemma's norms back to w
    for name, t in m.network.state_dict().items():
        if m.config.norm_offset and name.endswith("norm.weight"):
            t = t - m.config.norm_offset
        state[name if name.startswith("lm_head") else f"model.{name}"] = t
    hf.load_state_dict(state, assign=True)
    if m.config.tie_embeddings:
        hf.tie_weights()
    return m, hf


@pytest.mark.slow
def test_real_model_logits_match_transformers(real):
    m, hf = real
    for prompt in PROMPTS:
        ids = m.encode(prompt)
        torch.testing.assert_close(m.logits(ids), hf_logits(hf, ids), atol=1e-3, rtol=0, msg=prompt)


@pytest.mark.slow
def test_real_model_greedy_continuation_matches_transformers(real):
    m, hf = real
    for prompt in PROMPTS[:4]:
        ids = m.encode(prompt)
        ours = [t.id for step in m.stream_tokens([ids], max_tokens=32, temperature=0) for t in step]
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        assert len(ours) == 32 or ours[-1] in m.tokenizer.stop_ids, prompt
        assert ours == theirs[: len(ours)], prompt
