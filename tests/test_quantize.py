"""Quantization: packing, grids, RTN/GPTQ/AWQ on known answers, kernels, save/load, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import pocketlm
from pocketlm.compress import qlinear, quantize
from pocketlm.compress.awq import search_scales
from pocketlm.compress.gptq import gptq_quantize, output_error
from pocketlm.compress.quantize import Grid, rtn, to_module
from pocketlm.errors import InvalidArgument, UnsupportedModel

IDS = list(range(10, 60))


# -- packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3])
def test_pack_unpack_is_exact_and_as_small_as_promised(bits):
    codes = torch.randint(0, 1 << bits, (7, 96), dtype=torch.uint8)
    packed = qlinear.pack(codes, bits)
    assert packed.shape == (7, 96 * bits // 8)  # int4: 2 codes a byte; int3: 8 codes in 3 bytes
    assert torch.equal(qlinear.unpack(packed, bits), codes)


def test_int4_layout_is_blocks_of_32_low_then_high_nibbles():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    codes[0, 16:] = 15 - codes[0, 16:]
    packed = qlinear.pack(codes, 4)
    assert packed[0, 0].item() == 0 | (15 << 4)  # column 0 low nibble, column 16 high nibble
    assert packed[0, 15].item() == 15 | (0 << 4)


def test_int3_packs_eight_codes_into_three_little_endian_bytes():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] * 4], dtype=torch.uint8)
    word = sum(v << (3 * j) for j, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert qlinear.pack(codes, 3)[0, :3].tolist() == [word & 255, (word >> 8) & 255, word >> 16]


# -- round to nearest --------------------------------------------------------------------------
def test_rtn_symmetric_grid_on_a_hand_computed_row():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0] + [0.0] * 28])
    q = rtn(w, Grid(4, 32, True))
    assert q.scales[0, 0].item() == pytest.approx(0.1, rel=1e-3)  # max|w| / 7, as fp16
    assert q.codes[0, :4].tolist() == [15, 4, 9, 8]  # round(w / s) + 8 (-3.5 rounds to even -4)
    assert q.zeros[0, 0].item() == 8


@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False), (3, True), (3, False)])
def test_rtn_error_within_half_a_step(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 100)  # 100 columns: the padded last group is partial
    q = rtn(w, Grid(bits, 32, sym))
    step = q.scales.float().repeat_interleave(32, 1)[:, :100]
    err = (q.dequantize() - w).abs()
    # Symmetric: nothing is clipped, so rounding costs at most half a step. Asymmetric: the
    # zero point is rounded to an integer, which shifts the grid by up to half a step more.
    bound = step / 2 if sym else step
    assert (err <= bound + 1e-6).all()


def test_asymmetric_zero_point_is_exact():
    w = torch.linspace(-0.2, 1.3, 32).reshape(1, 32)  # lopsided: asym spends no codes below -0.2
    q = rtn(w, Grid(4, 32, False))
    assert (q.dequantize() - w).abs().max() < (rtn(w, Grid(4, 32, True)).dequantize() - w).abs().max()


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True), (3, False)])
def test_clip_search_never_rounds_a_group_worse_than_min_max(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    w[::4, 7] = 4 * w[::4].abs().amax(1)  # every fourth row has one outlier: clipping pays
    plain = ((rtn(w, Grid(bits, 128, sym)).dequantize() - w) ** 2).sum(1)
    clipped = ((rtn(w, Grid(bits, 128, sym, clip=True)).dequantize() - w) ** 2).sum(1)
    assert (clipped <= plain).all()
    if sym:  # min/max spends half of a symmetric grid's codes on the outlier's unused side
        assert (clipped[::4] < 0.9 * plain[::4]).all()
    else:
        assert (clipped[::4] < plain[::4]).any()


# -- GPTQ and AWQ against RTN ------------------------------------------------------------------
def _correlated_inputs(n, k, seed=0):
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(123)) / k**0.5
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ mix + 0.3 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("grid", [Grid(4, 64, True), Grid(4, 64, False), Grid(3, 32, True),
                                  Grid(3, 32, False), Grid(4, 64, False, clip=True),
                                  Grid(8, 0, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_layer_outputs_better_than_rtn(grid, act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 160) * 0.05
    x = _correlated_inputs(1024, 160)
    h = 2 * x.T @ x / x.shape[0]
    held_out = _correlated_inputs(1024, 160, seed=1)  # same distribution, other samples
    e_rtn = output_error(w, rtn(w, grid).dequantize(), held_out)
    e_gptq = output_error(w, gptq_quantize(w, h, grid, act_order).dequantize(), held_out)
    assert e_gptq < 0.8 * e_rtn


def test_gptq_with_an_identity_hessian_is_rtn():
    # With uncorrelated unit inputs, no column can compensate another: GPTQ rounds plainly.
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = gptq_quantize(w, torch.eye(64) * 2, Grid(4, 32, True), damp=0.0)
    assert torch.equal(q.codes, rtn(w, Grid(4, 32, True)).codes)


def test_awq_beats_rtn_on_a_layer_with_outlier_input_channels():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    x = torch.randn(4096, 256)
    x[:, :8] *= 30  # a few channels carry large activations, as in real LLMs
    grid = Grid(4, 128, True)
    s, _ = search_scales([w], x[:2048], grid)
    held = x[2048:]
    e_rtn = output_error(w, rtn(w, grid).dequantize(), held)
    e_awq = output_error(w, rtn(w * s, grid).dequantize() / s, held)
    assert e_awq < 0.7 * e_rtn
    assert s[:8].min() > s[8:].max()  # the outlier channels are the ones scaled up


# -- kernels -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("n,k,gs", [(1, 32, 32), (37, 100, 32), (96, 576, 128), (13, 200, 64),
                                    (64, 1536, 0)])
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_kernel_matches_the_fallback(bits, n, k, gs, rows):
    if qlinear.kernel() is None:
        pytest.skip("no compiled kernel on this machine (AVX2/FMA/F16C or a compiler missing)")
    torch.manual_seed(n * k + rows)
    lin = to_module(rtn(torch.randn(n, k), Grid(bits, gs, bits != 3)))
    x = torch.randn(2, rows, k)
    w = lin.dequantize().double()
    exact = torch.nn.functional.linear(x.double(), w)
    # Up to GEMV_MAX_ROWS rows the 4/3-bit kernel rounds activations to int8 per block of 32.
    kernel_input = act_round(x, lin.kp) if 2 * rows <= qlinear.GEMV_MAX_ROWS and bits < 8 else x
    expected = torch.nn.functional.linear(kernel_input.double(), w)
    got = lin(x)
    assert got.shape == (2, rows, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * k**0.5)
    assert (got.double() - exact).abs().max() <= 0.02 * exact.abs().max()  # rounding costs ~0.5%


def act_round(x: torch.Tensor, kp: int) -> torch.Tensor:
    """The kernel's activation rounding: int8, one scale (max |x| / 127) per block of 32 columns."""
    k = x.shape[-1]
    xb = torch.nn.functional.pad(x, (0, kp - k)).reshape(*x.shape[:-1], kp // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(*x.shape[:-1], kp)[..., :k]


def test_vnni_is_compiled_in_only_where_the_cpu_has_it(monkeypatch):
    from pocketlm.kernels import BASE_FLAGS, compile_flags

    avx2 = {"avx2", "fma", "f16c"}
    monkeypatch.delenv("POCKETLM_NO_VNNI", raising=False)
    assert compile_flags(avx2) == BASE_FLAGS
    assert compile_flags(avx2 | {"avx512_vnni"}) == BASE_FLAGS  # VNNI on 256 bits needs VL
    assert compile_flags(avx2 | {"avx512_vnni", "avx512vl"})[-2:] == ["-mavx512vnni",
                                                                      "-mavx512vl"]
    assert compile_flags(avx2 | {"avx_vnni"})[-1] == "-mavxvnni"
    monkeypatch.setenv("POCKETLM_NO_VNNI", "1")
    assert compile_flags(avx2 | {"avx512_vnni", "avx512vl"}) == BASE_FLAGS


VNNI_CHECK = """
import torch
from pocketlm.compress import qlinear
from pocketlm.compress.quantize import Grid, rtn, to_module
torch.manual_seed(0)
out = {}
for bits in (4, 3):
    lin = to_module(rtn(torch.randn(70, 600), Grid(bits, 128, False)))
    out[bits] = lin(torch.randn(3, 600))
print(qlinear.backend())
torch.save(out, "OUT")
"""


def test_vnni_and_plain_avx2_builds_give_identical_products(tmp_path):
    """Where the CPU has VNNI, the kernel built without it (POCKETLM_NO_VNNI=1) gives the
    same int4/int3 products bit for bit: the integer sums are the same numbers."""
    import os
    import subprocess
    import sys

    from pocketlm.kernels import isa

    if qlinear.kernel() is None or isa() == "avx2":
        pytest.skip("no VNNI on this CPU (or no compiled kernel): only one path to test")
    got = {}
    for name, env in (("vnni", {}), ("avx2", {"POCKETLM_NO_VNNI": "1"})):
        out = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, "-c", VNNI_CHECK.replace("OUT", str(out))],
                           env={**os.environ, **env}, capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        built = r.stdout.split()[-1]  # "avx2+vnni" or "avx512" where VNNI is in; plain "avx2" not
        assert (built != "avx2") if name == "vnni" else (built == "avx2")
        got[name] = torch.load(out)
    for bits in (4, 3):
        assert torch.equal(got["vnni"][bits], got["avx2"][bits])


def test_fallback_is_used_and_named_when_the_kernel_is_off(monkeypatch):
    torch.manual_seed(0)
    lin = to_module(rtn(torch.randn(24, 96), Grid(4, 32, True)))
    x = torch.randn(1, 96)
    monkeypatch.setattr(qlinear, "_EXT", None)
    monkeypatch.setattr(qlinear, "_EXT_TRIED", True)
    assert qlinear.backend() == "fallback"
    torch.testing.assert_close(lin(x), x @ lin.dequantize().T, rtol=1e-5, atol=1e-5)


# -- whole models: quantize, save, load ----------------------------------------------------------
@pytest.mark.parametrize("method,bits,sym", [("rtn", 8, True), ("rtn", 4, False),
                                             ("rtn", 3, True), ("gptq", 4, True),
                                             ("awq", 3, False)])
def test_saved_quantized_model_loads_with_bit_identical_logits(tiny_model, tmp_path, calib_file,
                                                                method, bits, sym):
    q = quantize(tiny_model, method, bits, group_size=32 if bits != 8 else None, sym=sym,
                 calibration=calib_file, samples=4, seq_len=32, progress=False)
    before = q.logits(IDS)
    q.save(tmp_path / "q")
    loaded = pocketlm.load(tmp_path / "q")
    assert torch.equal(loaded.logits(IDS), before)
    assert isinstance(loaded.network.layers[1].mlp.down_proj, qlinear.QLinear)
    assert isinstance(loaded.network.lm_head, qlinear.TiedQLinear)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (cfg["method"], cfg["bits"], cfg["sym"]) == (method, bits, sym)
    step = loaded.card.steps[-1]
    assert step["step"] == "quantize" and step["settings"]["method"] == method
    if method != "rtn":
        assert len(step["settings"]["calibration"]["sha256"]) == 64
    # decoding (the kernel path) agrees with the full pass
    greedy = loaded.generate("the cat", temperature=0, max_tokens=5)
    assert greedy == q.generate("the cat", temperature=0, max_tokens=5)


def test_packed_file_size_is_bits_over_8_plus_scales(tmp_path):
    from tiny import make_tiny_model

    m = make_tiny_model(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2)
    n_lin = sum(m.network.get_submodule(n).weight.numel()
                for n in __import__("pocketlm.compress.quantize", fromlist=["x"]).linear_names(
                    m.network))
    emb = m.network.embed_tokens.weight.numel()
    q = quantize(m, "rtn", 4, group_size=128, keep=("embeddings", "lm_head"))
    q.save(tmp_path / "q4")
    size = (tmp_path / "q4" / "model.safetensors").stat().st_size
    expected = n_lin // 2 + n_lin // 128 * 2 + emb * 4 + m.config.dim * 4 * 5  # + norms
    assert expected <= size < expected + 16_000  # + the safetensors JSON header


def test_kept_embeddings_stay_float_and_tied(tiny_model, tmp_path):
    q = quantize(tiny_model, "rtn", 8, keep=["embeddings", "lm_head"])
    assert isinstance(q.network.embed_tokens, torch.nn.Embedding)
    q.save(tmp_path / "k")
    loaded = pocketlm.load(tmp_path / "k")
    assert loaded.network.lm_head.weight is loaded.network.embed_tokens.weight
    assert torch.equal(loaded.logits(IDS), q.logits(IDS))


def test_quantized_folder_loads_in_bfloat16(tiny_model, tmp_path):
    q = quantize(tiny_model, "rtn", 4, group_size=32)
    q.save(tmp_path / "q")
    b = pocketlm.load(tmp_path / "q", dtype=torch.bfloat16)
    got = b.logits(IDS)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), q.logits(IDS), atol=0.1, rtol=0.05)


def test_int8_rtn_barely_changes_the_tiny_model(tiny_model):
    ref = tiny_model.logits(IDS)
    got = quantize(tiny_model, "rtn", 8).logits(IDS)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("extra", [{}, {"int8": ["layers.0.mlp.*"]}, {"sequential": False}])
def test_gptq_resumes_from_its_last_finished_layer(tiny_model, tmp_path, calib_file, monkeypatch,
                                                   extra):
    from pocketlm.compress import gptq

    ckpt = tmp_path / "out.partial"
    kw = {"method": "gptq", "bits": 4, "group_size": 32, "calibration": calib_file,
          "samples": 4, "seq_len": 32, "progress": False, "checkpoint_dir": str(ckpt), **extra}
    full = quantize(tiny_model, **kw).logits(IDS)
    real, calls = gptq.Layerwise.save, []

    def save_then_die(self, i, block):
        real(self, i, block)
        calls.append(i)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(gptq.Layerwise, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model, **kw)
    assert json.loads((ckpt / "progress.json").read_text())["blocks_done"] == 1
    resumed = quantize(tiny_model, **kw)
    assert calls == [0, 1]  # the second run did only block 1
    assert torch.equal(resumed.logits(IDS), full)
    assert not ckpt.exists()


def test_int8_patterns_make_a_mixed_precision_model_that_loads_bit_identical(
        tiny_model, tmp_path, calib_file):
    kw = {"group_size": 32, "calibration": calib_file, "samples": 4, "seq_len": 32,
          "progress": False}
    plain = quantize(tiny_model, "gptq", 4, **kw)
    mixed = quantize(tiny_model, "gptq", 4, int8=["layers.0.mlp.*"], **kw)
    net = mixed.network
    assert [net.layers[0].mlp.get_submodule(n).bits for n in ("gate_proj", "up_proj",
                                                                "down_proj")] == [8, 8, 8]
    assert net.layers[0].mlp.down_proj.scales.shape[1] == 1  # int8: one scale per channel
    assert net.layers[0].self_attn.q_proj.bits == 4 and net.layers[1].mlp.up_proj.bits == 4
    cfg = net.quantization_config
    assert cfg["int8"] == ["layers.0.mlp.*"]
    assert cfg["modules"]["layers.0.mlp.up_proj"]["bits"] == 8
    assert cfg["modules"]["layers.1.mlp.up_proj"]["bits"] == 4
    ref = tiny_model.logits(IDS)
    assert (mixed.logits(IDS) - ref).abs().mean() < (plain.logits(IDS) - ref).abs().mean()
    mixed.save(tmp_path / "m")
    loaded = pocketlm.load(tmp_path / "m")
    assert torch.equal(loaded.logits(IDS), mixed.logits(IDS))
    assert loaded.network.layers[0].mlp.up_proj.bits == 8
    assert (loaded.generate("the cat", temperature=0, max_tokens=5)
            == mixed.generate("the cat", temperature=0, max_tokens=5))
    assert mixed.card.steps[-1]["settings"]["weight_bytes"] > plain.card.steps[-1]["settings"][
        "weight_bytes"]


def test_an_int8_pattern_that_matches_nothing_says_what_names_look_like(tiny_model):
    with pytest.raises(InvalidArgument, match="matches no Linear; names look like 'layers.0"):
        quantize(tiny_model, "rtn", 4, group_size=32, int8=["mlp.*"])
    with pytest.raises(InvalidArgument, match="awq"):
        quantize(tiny_model, "awq", 4, group_size=32, int8=["layers.0.mlp.*"])


# -- bad input -----------------------------------------------------------------------------------
def test_unsupported_combinations_say_what_is_supported(tiny_model):
    with pytest.raises(InvalidArgument, match="awq does not support 8 bits.*gptq: 8, 4, 3"):
        quantize(tiny_model, "awq", 8)
    with pytest.raises(InvalidArgument, match="group size 100"):
        quantize(tiny_model, "rtn", 4, group_size=100)
    with pytest.raises(InvalidArgument, match="unknown method 'nf4'"):
        quantize(tiny_model, "nf4", 4)


def test_calibration_errors(tiny_model, tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        quantize(tiny_model, "gptq", 4, calibration=str(tmp_path / "nope.txt"))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(InvalidArgument, match="fewer than one window"):
        quantize(tiny_model, "gptq", 4, calibration=str(short), seq_len=64)


def test_quantizing_a_quantized_model_is_refused(tiny_model):
    q = quantize(tiny_model, "rtn", 8)
    with pytest.raises(UnsupportedModel, match="already quantized"):
        quantize(q, "rtn", 4)


def test_calibration_windows_are_seeded(tiny_model, calib_file):
    from pocketlm.compress.calibration import calibration_samples

    a, info = calibration_samples(tiny_model.tokenizer, calib_file, 4, 16, seed=3)
    b, _ = calibration_samples(tiny_model.tokenizer, calib_file, 4, 16, seed=3)
    c, _ = calibration_samples(tiny_model.tokenizer, calib_file, 4, 16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert info["tokens"] == 64


def test_cli_quantize_writes_a_loadable_folder(tiny_model, tmp_path, capsys):
    from pocketlm.cli import main

    tiny_model.save(tmp_path / "float")
    rc = main(["quantize", str(tmp_path / "float"), "--method", "rtn", "--bits", "4",
               "--group-size", "32", "-o", str(tmp_path / "int4")])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "% of fp32" in out
    assert isinstance(pocketlm.load(tmp_path / "int4").network.layers[0].mlp.up_proj,
                      qlinear.QLinear)
    rc = main(["quantize", str(tmp_path / "float"), "--method", "awq", "--bits", "8", "-o",
               str(tmp_path / "x")])
    assert rc not in (0, None)
    assert "awq does not support 8 bits" in capsys.readouterr().err


@pytest.fixture
def calib_file(tmp_path):
    """A small English text file for calibration."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "cat", "sleeps", "in", "the", "warm", "sun", "and", "birds", "sing", "songs", "of", "spring", "across", "green", "fields"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path / "calib.txt"
    path.write_text(text)
    return str(path)


# -- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_rtn_keeps_the_default_model_and_shrinks_its_file(default_model, tmp_path):
    ids = default_model.encode("The capital of France is Paris. The capital of Italy is")
    q = quantize(default_model, "rtn", 8)
    ref, got = default_model.logits(ids), q.logits(ids)
    assert torch.equal(got[-1].topk(5).indices, ref[-1].topk(5).indices)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    prompt = "Name the largest planet in the solar system."
    msgs = [{"role": "user", "content": prompt}]
    assert q.chat(msgs, temperature=0, max_tokens=12) == default_model.chat(
        msgs, temperature=0, max_tokens=12)
    q.save(tmp_path / "int8")
    size = (tmp_path / "int8" / "model.safetensors").stat().st_size
    assert size < 0.27 * 4 * default_model.config.n_params  # int8 + per-row scales + norms
    assert torch.equal(pocketlm.load(tmp_path / "int8").logits(ids), got)
