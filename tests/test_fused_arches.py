"""The fused decode step on every architecture and weight format: the PyTorch path's logits.

Tiny random models of each family (tests/tiny.py: LLaMA with Llama 3 RoPE scaling and an untied
head, Qwen2 with q/k/v biases, Qwen3 with QK-norm, Gemma 3 with local layers of window 5, and a
Gemma with another attention scale, a logit soft-cap and linear RoPE scaling), loaded as a
Hugging Face folder (fp32), as GGUF files in llama.cpp's layout (F32, Q4_0 kept packed), with
every layer's weights in a different GGML type (Q4_0 ... Q6_K, F16, BF16), and quantized by
our RTN (int4 codes with Qwen2's biases). Each decodes ~20 steps past a PyTorch prefill, at
batch 1 and at batch 3 with rows at different positions, fused and through the PyTorch path
from the same cache; the two must agree at every step. Both sides call the same GGML block
products, so this holds whatever those kernels' numerics are.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from tiny import _COMMON, HF_ARCHS, make_hf_model, save_hf_folder, write_hf_as_gguf

import pocketlm
from pocketlm import kernels
from pocketlm.engine import fused
from pocketlm.engine.generate import forward_at
from pocketlm.model import ggml
from pocketlm.model.transformer import KVCache

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
pytestmark = pytest.mark.skipif(not hasattr(kernels.get() or object(), "DecodePlan"),
                                reason="the C++ kernels cannot be built on this machine")
GGUF_ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
STEPS = 20  # past the tiny Gemma's window of 5 from every prompt length below
# every GGML type the kernels compute, one after another over a model's linear layers
MIXED = ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "Q4_0", "Q4_1", "Q5_1", "Q5_K", "F16", "BF16"]


def _wide_hf(arch: str, seed: int = 0):
    """make_hf_model with widths that are whole K-quant blocks (256 columns) everywhere."""
    import transformers

    cls, cfg_cls, extra = HF_ARCHS[arch]
    wide = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    config = getattr(transformers, cfg_cls)(**{**_COMMON, **extra, **wide},
                                            attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05)
            if name.endswith("norm.weight") and not arch.startswith("gemma"):
                p.add_(1.0)
    return model


def _kquant_blocks(name: str, n: int, k: int, rng) -> np.ndarray:
    """Random valid K-quant blocks (gguf-py cannot quantize to them) with small scales, so the
    weights are ~0.1 like the rest of the model."""
    _, qk, nbytes = ggml.TYPES[int(Q[name])]
    raw = rng.integers(0, 256, size=(n * k // qk, nbytes), dtype=np.uint8)
    if name == "Q6_K":
        raw[:, 208:210] = rng.uniform(2e-4, 6e-4, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    else:  # d, dmin
        raw[:, 0:4] = rng.uniform(1e-4, 4e-4, size=(len(raw), 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def _retype(linear: ggml.GGMLLinear, name: str, rng) -> ggml.GGMLLinear:
    """The same layer (shape, bias) with its weight in GGML type ``name``."""
    n, k = linear.n, linear.k
    if name in ("Q4_K", "Q5_K", "Q6_K"):
        blocks = _kquant_blocks(name, n, k, rng)
    else:
        w = linear.dequantize().numpy()
        if name == "BF16":
            blocks = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        else:
            blocks = np.ascontiguousarray(gguf.quants.quantize(w, Q[name])).view(np.uint8)
    bias = None if linear.bias is None else linear.bias.detach()
    return ggml.GGMLLinear(int(Q[name]), n, k, torch.from_numpy(blocks.reshape(n, -1).copy()), bias)


def _mixed(model):
    """Every linear layer of every block in its own GGML type (the embedding and tied head stay
    the file's Q8_0; an untied head takes the next type)."""
    rng = np.random.default_rng(0)
    names = [f"layers.{i}.{m}" for i in range(len(model.network.layers)) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if isinstance(model.network.lm_head, ggml.GGMLLinear):
        names.append("lm_head")
    for i, name in enumerate(names):
        old = model.network.get_submodule(name)
        ggml.set_module(model.network, name, _retype(old, MIXED[i % len(MIXED)], rng))
    return model


CASES = ([("hf", a) for a in HF_ARCHS] + [("gguf-f32", a) for a in GGUF_ARCHS]
         + [("gguf-q4_0", a) for a in GGUF_ARCHS] + [("mixed", a) for a in GGUF_ARCHS]
         + [("rtn4", "qwen2")])


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{a}" for f, a in CASES])
def model(request, tmp_path_factory):
    fmt, arch = request.param
    tmp = tmp_path_factory.mktemp(f"{fmt}-{arch}")
    if fmt == "hf":
        m = pocketlm.load(save_hf_folder(make_hf_model(arch), tmp))
    elif fmt == "gguf-f32":
        m = pocketlm.load(write_hf_as_gguf(make_hf_model(arch), tmp / "m.gguf"))
    elif fmt == "gguf-q4_0":
        m = pocketlm.load(write_hf_as_gguf(make_hf_model(arch), tmp / "m.gguf", Q.Q4_0))
        assert ggml.packed_modules(m.network)
    elif fmt == "mixed":
        m = _mixed(pocketlm.load(write_hf_as_gguf(_wide_hf(arch), tmp / "m.gguf", Q.Q8_0)))
        assert {x.type_name for x in ggml.packed_modules(m.network)} >= set(MIXED)
    else:
        from pocketlm.compress.quantize import quantize

        m = quantize(pocketlm.load(save_hf_folder(make_hf_model(arch), tmp)), method="rtn",
                     bits=4, group_size=32, progress=False)
        assert m.network.layers[0].self_attn.q_proj.bias is not None
    assert fused.plan_for(m.network) is not None, "the fused step must cover this model"
    return m


@pytest.fixture
def fp32_ggml_act():
    """GGML products with fp32 activations while the test runs. By default they round each
    input row to int8 (as llama.cpp does); that rounding is a step function, so a last-bit
    difference in an input (the fused step's norms and attention sum in another order than
    PyTorch's ops) now and then moves one value to the next int8 step, and the keys written
    then carry it into every later step. With fp32 activations both paths are continuous and
    must agree to rounding; the default int8 path is held to identical greedy output below."""
    lib = ggml._lib()
    setter = getattr(lib, "pocketlm_ggml_set_int8_act", None) if lib is not None else None
    if setter is None:
        yield
        return
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    before = setter(0)
    yield
    setter(before)


def _prefilled(net, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache.allocate(net.config, len(lengths), 64)
    for row, n in enumerate(lengths):
        ids = torch.randint(0, net.config.vocab_size, (1, n), generator=g)
        net(ids, torch.arange(n)[None], cache, rows=slice(row, row + 1))
    return cache


def _twin(cache):
    return KVCache(k=[t.clone() for t in cache.k], v=[t.clone() for t in cache.v])


def _close(got, want, what):
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= 2e-5 * scale, f"{what}: fused differs by {err:.2e} (logits up to {scale:.1f})"


@pytest.mark.parametrize("lengths", [[7], [3, 9, 6]], ids=["batch1", "batch3"])
def test_multi_step_decode_matches_the_pytorch_path(model, lengths, fp32_ggml_act):
    """Prefill in PyTorch, then STEPS steps fused and through PyTorch on twin caches (and a
    third cache alternating between the two paths), feeding both the PyTorch path's argmax."""
    net = model.network
    B = len(lengths)
    with torch.inference_mode():
        cache = _prefilled(net, lengths)
        twin, mixed = _twin(cache), _twin(cache)
        tokens = torch.tensor([5, 77, 140][:B])
        positions = torch.tensor(lengths)
        for step in range(STEPS):
            want = net(tokens[:, None], positions[:, None], twin, rows=slice(0, B))[:, 0]
            got = fused.decode(net, cache, tokens, positions)
            assert got is not None
            _close(got, want, f"step {step}")
            if step % 2:  # the paths share one cache layout: switch at any step
                alt = fused.decode(net, mixed, tokens, positions)
            else:
                alt = net(tokens[:, None], positions[:, None], mixed, rows=slice(0, B))[:, 0]
            _close(alt, want, f"alternating, step {step}")
            tokens, positions = want.argmax(-1), positions + 1
        for a, b in zip(cache.k + cache.v, twin.k + twin.v):  # the same keys and values written
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_greedy_generation_is_unchanged(model, monkeypatch):
    prompts = ["the cat", "in a house the", "x"]
    with_fused = model.generate(prompts, max_tokens=24, temperature=0)
    monkeypatch.setenv("POCKETLM_FUSED", "0")
    without = model.generate(prompts, max_tokens=24, temperature=0)
    assert with_fused == without and all(len(s) > 0 for s in with_fused)


@pytest.mark.parametrize("n", [5, 11])
def test_verification_pass_matches_forward_at(model, n, fp32_ggml_act):
    """Several new tokens of one sequence (cache row 1 of 2) in one fused call: the logits after
    each, as the PyTorch pass gives them; over 8 tokens it runs 8 at a time."""
    net = model.network
    ids = [int(t) for t in torch.randint(3, net.config.vocab_size, (n,),
                                         generator=torch.Generator().manual_seed(n))]
    with torch.inference_mode():
        cache = _prefilled(net, [4, 6])
        twin = _twin(cache)
        got = fused.verify(net, cache, 1, ids, 6)
        # the PyTorch pass 8 tokens at a time too: over 8 rows a GGML layer dequantizes and
        # multiplies in fp32 (prefill's path), which rounds activations otherwise than its gemv
        want = torch.cat([forward_at(net, twin, 1, ids[i:i + 8], 6 + i) for i in range(0, n, 8)])
        assert got is not None and got.shape == want.shape == (n, net.config.vocab_size)
        _close(got, want, "verification")
        for a, b in zip(cache.k + cache.v, twin.k + twin.v):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# -- the real models (slow): fused against the PyTorch path over 16 greedy steps ------------------
REAL = ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]


@pytest.fixture(scope="module", params=REAL)
def real(request):
    from pocketlm.formats import registry

    path = registry.stored_path(request.param)
    if path is None:
        pytest.skip(f"{request.param} is not pulled (pocketlm pull {request.param})")
    m = pocketlm.load(path)
    assert ggml.packed_modules(m.network) and fused.plan_for(m.network) is not None
    return m


@pytest.mark.slow
def test_real_model_fused_steps_match_the_pytorch_path(real, fp32_ggml_act):
    net = real.network
    ids = real.encode("def fibonacci(n):\n    ")
    with torch.inference_mode():
        cache = KVCache.allocate(net.config, 1, len(ids) + 20)
        net(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], cache)  # the prompt but
        twin = _twin(cache)  # its last token, which the first step feeds
        token, pos = torch.tensor([ids[-1]]), torch.tensor([len(ids) - 1])
        for step in range(16):
            want = net(token[:, None], pos[:, None], twin)[:, 0]
            got = fused.decode(net, cache, token, pos)
            assert got is not None
            _close(got, want, f"step {step}")
            token, pos = want.argmax(-1), pos + 1


@pytest.mark.parametrize("draft", ["self:3", "lookup"])
def test_speculative_decoding_verifies_fused_and_keeps_the_targets_greedy_output(
        tmp_path, monkeypatch, draft):
    """A packed Gemma (local layers, GGML blocks) speculating: the verification passes run
    fused, and greedy output is the target's own, token for token."""
    from pocketlm.engine.speculative import Speculative

    m = pocketlm.load(write_hf_as_gguf(make_hf_model("gemma3"), tmp_path / "g.gguf", Q.Q4_0))
    prompt = "the cat sat on the mat, the cat sat on the"
    alone = m.generate(prompt, max_tokens=24, temperature=0)
    passes, real_verify = [], fused.verify
    monkeypatch.setattr(fused, "verify", lambda *a: passes.append(real_verify(*a)) or passes[-1])
    spec = Speculative(m, draft=draft, draft_tokens=4)
    assert spec.generate(prompt, max_tokens=24, temperature=0) == alone and alone
    assert passes and all(p is not None for p in passes)
    assert spec.stats.drafted > 0
