"""bf16 prefill on packed weights (GGUF blocks, our int codes): inputs of more than 8 rows
multiply the dequantized tile and the activations in bf16 (fp32 accumulation and output).

torch runs bf16 matmuls on every CPU (emulated without AVX512-BF16/AMX: slower, same maths),
so the numerics are tested everywhere by letting the switch believe the CPU has bf16 GEMMs;
only the test of this machine's real default needs one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import make_hf_model, make_tiny_model, write_hf_as_gguf

import pocketlm
from pocketlm import kernels
from pocketlm.compress import qlinear
from pocketlm.compress.qlinear import GEMV_MAX_ROWS
from pocketlm.compress.quantize import quantize
from pocketlm.model import ggml

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.fixture
def bf16_cpu(monkeypatch):
    """The switch as on a CPU with bf16 GEMMs and no AMX (AVX512-BF16), wherever we run."""
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(kernels, "PACKED_BF16_DEFAULT", True)  # as where it is the default
    monkeypatch.delenv("POCKETLM_BF16_PREFILL", raising=False)


@pytest.fixture
def bf16_products(monkeypatch):
    """Records, per F.linear call, whether it ran in bf16 (its weight's dtype)."""
    calls: list[bool] = []
    linear = F.linear

    def spy(x, w, b=None):
        calls.append(w.dtype == torch.bfloat16)
        assert x.dtype == w.dtype  # never a mixed product
        return linear(x, w, b)

    monkeypatch.setattr(F, "linear", spy)
    return calls


@pytest.fixture(scope="module", params=[("qwen2", "Q4_0"), ("llama", "Q8_0")])
def packed_gguf(request, tmp_path_factory):
    arch, qtype = request.param
    path = tmp_path_factory.mktemp("bf16") / f"tiny-{arch}-{qtype}.gguf"
    write_hf_as_gguf(make_hf_model(arch), path, Q[qtype])
    return pocketlm.load(path).network


def prompt_logits(net, n: int, seed: int = 0) -> torch.Tensor:
    """Logits (n, V) of a random n-token prompt in one forward (every product has n rows)."""
    ids = torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return net(ids)[0]


def assert_bf16_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 keeps 8 significant bits: each product is off by ~0.4% of its size; through two
    layers the logits stay within 2% of their spread and pick the same top token."""
    assert not torch.equal(got, ref)  # the bf16 products did run
    spread = float(ref.max() - ref.min())
    assert float((got - ref).abs().max()) < 0.02 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_forced_bf16_matches_the_fp32_path_on_a_gguf_model(packed_gguf, bf16_cpu,
                                                          bf16_products, monkeypatch):
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
    ref = prompt_logits(packed_gguf, 40)
    assert bf16_products and not any(bf16_products)
    bf16_products.clear()
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    got = prompt_logits(packed_gguf, 40)
    assert got.dtype == torch.float32
    # every product of the layers and the tied output head: 7 a layer + 1
    n_layers = packed_gguf.config.n_layers
    assert bf16_products == [True] * (7 * n_layers + 1)
    assert_bf16_close(got, ref)


@pytest.mark.parametrize("bits", [8, 4])
def test_forced_bf16_matches_the_fp32_path_on_our_packed_codes(bits, bf16_cpu, bf16_products,
                                                               monkeypatch):
    model = make_tiny_model(dim=128, hidden_dim=384, n_heads=4, n_kv_heads=2)
    net = quantize(model, "rtn", bits, group_size=32 if bits == 4 else None,
                   progress=False).network
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
    ref = prompt_logits(net, 48)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    bf16_products.clear()
    got = prompt_logits(net, 48)
    assert bf16_products and all(bf16_products)
    assert_bf16_close(got, ref)


def test_tiled_bf16_product_covers_every_row(bf16_cpu, monkeypatch):
    monkeypatch.setattr(ggml, "TILE_BYTES", 4 * 96 * 20)  # 20 rows a tile: 301 = 15 tiles + 1
    blocks = gguf.quants.quantize(torch.randn(301, 96).numpy(), Q.Q8_0)
    m = ggml.GGMLLinear(int(Q.Q8_0), 301, 96, torch.from_numpy(blocks))
    w = m.dequantize()
    x = torch.randn(2, 11, 96)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    with torch.inference_mode():
        got = m(x)
    assert got.shape == (2, 11, 301) and got.dtype == torch.float32
    # exactly the product of the bf16-rounded operands, accumulated in fp32
    want = x.bfloat16().double() @ w.bfloat16().double().T
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    fp32 = x @ w.T
    assert float((got - fp32).abs().max()) < 0.02 * float(fp32.abs().max())


def test_decode_rows_gradients_and_16_bit_weights_stay_fp32(packed_gguf, bf16_cpu,
                                                            bf16_products, monkeypatch):
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    prompt_logits(packed_gguf, GEMV_MAX_ROWS)  # decode-sized: the fp32 kernels, no GEMM at all
    assert not any(bf16_products)
    w = torch.randn(64, 96)
    f16 = ggml.GGMLLinear(int(Q.F16), 64, 96, w.half().view(torch.uint8).reshape(64, -1))
    q8 = ggml.GGMLLinear(int(Q.Q8_0), 64, 96,
                         torch.from_numpy(gguf.quants.quantize(w.numpy(), Q.Q8_0)))
    x = torch.randn(40, 96, requires_grad=True)
    bf16_products.clear()
    q8(x).sum().backward()  # gradients: fp32
    with torch.inference_mode():
        f16(x)  # 16-bit weights: what their model loaded as, the fp32 GEMM as before
    assert bf16_products == [False, False]
    with torch.inference_mode():
        q8(x)
    assert bf16_products[-1] is True
    # without the compiled kernels decode-sized inputs dequantize too, and stay fp32
    monkeypatch.setattr(ggml, "_lib", lambda: None)
    monkeypatch.setattr(qlinear, "kernel", lambda: None)
    codes = quantize(make_tiny_model(), "rtn", 4, group_size=32, progress=False).network
    bf16_products.clear()
    with torch.inference_mode():
        q8(x[:GEMV_MAX_ROWS])
        codes.layers[0].mlp.up_proj(torch.randn(GEMV_MAX_ROWS, 64))
    assert bf16_products == [False, False]


def test_fp32_models_keep_fp32_prefill_without_amx(bf16_cpu, bf16_products):
    net = make_tiny_model().network  # dense fp32 weights: bf16 by default only with AMX
    prompt_logits(net, 40)
    assert not any(bf16_products)


def test_the_switch(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(kernels, "PACKED_BF16_DEFAULT", True)
    for amx in (False, True):
        monkeypatch.setattr(kernels, "cpu_has_amx", lambda amx=amx: amx)
        monkeypatch.delenv("POCKETLM_BF16_PREFILL", raising=False)
        assert kernels.bf16_prefill(packed=True)  # packed: on wherever bf16 GEMMs are
        assert kernels.bf16_prefill() == amx  # dense fp32: on with AMX only
        monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
        assert not kernels.bf16_prefill(packed=True) and not kernels.bf16_prefill()
        monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
        assert kernels.bf16_prefill(packed=True) and kernels.bf16_prefill()
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)  # emulated bf16: never
    assert not kernels.bf16_prefill(packed=True) and not kernels.bf16_prefill()
    monkeypatch.delenv("POCKETLM_BF16_PREFILL")
    assert not kernels.bf16_prefill(packed=True)
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(kernels, "PACKED_BF16_DEFAULT", False)  # opt-in: only when asked
    assert not kernels.bf16_prefill(packed=True)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    assert kernels.bf16_prefill(packed=True)


@pytest.mark.skipif(not kernels.cpu_has_bf16(),
                    reason="this CPU has no bf16 GEMMs (AVX512-BF16 or AMX)")
def test_packed_prefill_on_this_cpu_follows_the_default_and_the_switch(packed_gguf, bf16_products,
                                                                       monkeypatch):
    monkeypatch.delenv("POCKETLM_BF16_PREFILL", raising=False)
    prompt_logits(packed_gguf, 40)
    assert bf16_products and all(p == kernels.PACKED_BF16_DEFAULT for p in bf16_products)
    bf16_products.clear()
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    prompt_logits(packed_gguf, 40)
    assert bf16_products and all(bf16_products)


def test_the_evaluator_scores_in_fp32_so_it_agrees_with_lm_eval(bf16_cpu, monkeypatch, tmp_path):
    """Where bf16 prefill is the default for generation, evaluate() still scores in fp32: lm-eval's
    transformers backend is fp32, and a 0.1% move in perplexity breaks item-for-item agreement."""
    from pocketlm.evaluate import run

    seen = []

    def spy(*args, **kwargs):
        seen.append(kernels.bf16_prefill(packed=True))
        return {"tasks": {}}

    monkeypatch.setattr(run, "_evaluate", spy)
    assert kernels.bf16_prefill(packed=True)  # the default outside
    run.evaluate(None, "wikitext2")
    assert seen == [False] and kernels.bf16_prefill(packed=True)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")  # the user may still ask for bf16
    run.evaluate(None, "wikitext2")
    assert seen == [False, True]
