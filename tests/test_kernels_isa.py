"""The int8-activation kernels (kernels.h, pair_gemv) against the reference maths, in every
build this CPU runs (POCKETLM_ISA=avx2 | avx2+vnni | avx512, one cached build each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_model

from pocketlm import kernels
from pocketlm.compress import qlinear
from pocketlm.compress.quantize import Grid, quantize, rtn, to_module
from pocketlm.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[1]
kx = qlinear.kernel()
needs_kernel = pytest.mark.skipif(kx is None, reason="compiled kernel unavailable")
SHAPES = [  # (N, K, group size): tails of rows (N % 4), odd block counts, groups of odd blocks
    (1, 32, 32), (37, 100, 32), (13, 200, 64), (96, 576, 128), (21, 288, 96), (64, 1536, 0),
    (7, 224, 0)]


def act_round(x: torch.Tensor, kp: int) -> torch.Tensor:
    """The kernel's activation rounding: int8, one scale (max |x| / 127) a block of 32."""
    k = x.shape[-1]
    xb = F.pad(x, (0, kp - k)).reshape(*x.shape[:-1], kp // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv) * d).reshape(*x.shape[:-1], kp)[..., :k]


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int8_activation_kernel_matches_the_reference(bits, n, k, gs, rows, sym):
    torch.manual_seed(n * k + rows + bits)
    lin = to_module(rtn(torch.randn(n, k), Grid(bits, gs, sym)))
    x = torch.randn(rows, k)
    w = lin.dequantize().double()
    xp = F.pad(x, (0, lin.kp - k)).contiguous()
    got = kx.qgemv_q8(xp, lin.kernel_codes(), lin.scales, lin.zeros, bits, lin.group_size)
    # The integer sums are exact; what is left is fp32 accumulation over K/32 blocks.
    want = F.linear(act_round(x, lin.kp).double(), w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5 * k**0.5)
    # Against unrounded activations: int8 rounding costs ~0.4% (1/254 relative a value).
    exact = F.linear(x.double(), w)
    assert (got.double() - exact).abs().max() <= 0.02 * exact.abs().max()


@needs_kernel
def test_int8_weights_at_their_extremes_do_not_saturate():
    """Codes 0 and 255 against activations at +-127 (the int16 pairs of AVX2's maddubs would
    saturate on u8 x s8 products; the kernel multiplies centred codes instead)."""
    n, k = 8, 256
    codes = torch.where(torch.arange(k) % 2 == 0, 255, 0).to(torch.uint8).repeat(n, 1)
    scales = torch.full((n, 1), 0.01, dtype=torch.float16)
    zeros = torch.full((n, 1), 128, dtype=torch.uint8)
    x = torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)[None]  # rounds to +-127 exactly
    got = kx.qgemv_q8(x.contiguous(), codes, scales, zeros, 8, k)
    w = (codes.float() - 128) * scales.float()
    torch.testing.assert_close(got, x @ w.T, rtol=1e-6, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(8, 0), (8, 64), (4, 128), (3, 32)])
def test_fused_step_with_int8_activations_matches_the_module_path(bits, group, monkeypatch):
    """The fused decode step and the op-by-op path round the same activations the same way."""
    from test_fused import both_paths

    monkeypatch.setenv("POCKETLM_INT8_ACT", "1")
    model = quantize(make_tiny_model(), method="rtn", bits=bits, group_size=group, progress=False)
    got, want, _, _ = both_paths(model.network, [4, 11, 2])
    assert got is not None
    assert (got - want).abs().max() < 1e-4


@needs_kernel
def test_int8_activation_switch_changes_the_8bit_product_only_by_rounding(monkeypatch):
    torch.manual_seed(0)
    lin = to_module(rtn(torch.randn(48, 192), Grid(8, 0, True)))
    x = torch.randn(1, 192)
    monkeypatch.setenv("POCKETLM_INT8_ACT", "0")
    fp32_act = lin(x)
    torch.testing.assert_close(fp32_act, x @ lin.dequantize().T, rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("POCKETLM_INT8_ACT", "1")
    int8_act = lin(x)
    torch.testing.assert_close(int8_act, act_round(x, 192) @ lin.dequantize().T, rtol=1e-5,
                               atol=1e-4)
    assert not torch.equal(fp32_act, int8_act)


def test_isa_switch_is_checked_against_the_cpu(monkeypatch):
    avx2 = {"avx2", "fma", "f16c"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
    assert kernels.supported_isas(avx2) == ["avx2"]
    assert kernels.supported_isas(avx2 | {"avx_vnni"}) == ["avx2", "avx2+vnni"]
    assert kernels.supported_isas(avx512) == ["avx2", "avx2+vnni", "avx512"]
    monkeypatch.delenv("POCKETLM_NO_VNNI", raising=False)
    monkeypatch.delenv("POCKETLM_ISA", raising=False)
    assert "-mavx512f" in kernels.compile_flags(avx512)  # the fastest by default
    monkeypatch.setenv("POCKETLM_ISA", "avx2")
    assert kernels.compile_flags(avx512) == kernels.BASE_FLAGS
    monkeypatch.setenv("POCKETLM_ISA", "avx2+vnni")
    assert kernels.compile_flags(avx512)[-2:] == ["-mavx512vnni", "-mavx512vl"]
    assert kernels.compile_flags(avx2 | {"avx_vnni"})[-1] == "-mavxvnni"
    monkeypatch.setenv("POCKETLM_ISA", "avx512")
    with pytest.raises(InvalidArgument, match="runs avx2, avx2\\+vnni"):
        kernels.compile_flags(avx2 | {"avx_vnni"})
    monkeypatch.setenv("POCKETLM_ISA", "sse2")
    with pytest.raises(InvalidArgument, match="not one of"):
        kernels.compile_flags(avx512)


@needs_kernel
def test_isa_reports_what_was_built():
    assert kx.isa() == kernels.isa() == qlinear.backend()


# -- every build this CPU runs -------------------------------------------------------------------
NUMBERS = """
import sys, torch
from pocketlm.compress import qlinear
from pocketlm.compress.quantize import Grid, quantize, rtn, to_module
sys.path.insert(0, "TESTS")
from tiny import make_tiny_model
from test_fused import both_paths
ext = qlinear.kernel()
out = {"isa": ext.isa()}
for bits in (8, 4, 3):
    for n, k, gs in SHAPES:
        torch.manual_seed(n + k)
        lin = to_module(rtn(torch.randn(n, k), Grid(bits, gs, bits == 4)))
        x = torch.nn.functional.pad(torch.randn(5, k), (0, lin.kp - k)).contiguous()
        out[bits, n, k] = ext.qgemv_q8(x, lin.kernel_codes(), lin.scales, lin.zeros, bits,
                                       lin.group_size)
    model = quantize(make_tiny_model(), method="rtn", bits=bits, group_size=32, progress=False)
    out["fused", bits] = both_paths(model.network, [3, 9])[0]
torch.save(out, "OUT")
"""


def build_numbers(isa: str, out: Path) -> dict:
    env = {**os.environ, "POCKETLM_ISA": isa, "POCKETLM_INT8_ACT": "1"}
    env.pop("POCKETLM_NO_VNNI", None)
    code = NUMBERS.replace("TESTS", str(REPO / "tests")).replace("SHAPES", repr(SHAPES))
    r = subprocess.run([sys.executable, "-c", code.replace("OUT", str(out))], env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@needs_kernel
def test_every_build_gives_the_same_numbers_bit_for_bit(tmp_path):
    """Integer sums are exact and every build does the same fp32 operations per lane, so the
    AVX2, 256-bit VNNI and 512-bit VNNI builds agree exactly (products and fused steps)."""
    isas = kernels.supported_isas()
    if len(isas) < 2:
        pytest.skip(f"this CPU runs one build only ({isas})")
    got = {isa: build_numbers(isa, tmp_path / f"{isa}.pt") for isa in isas}
    for isa in isas:
        assert got[isa].pop("isa") == isa
    ref = got[isas[0]]
    for isa in isas[1:]:
        assert got[isa].keys() == ref.keys()
        for key, value in ref.items():
            assert torch.equal(got[isa][key], value), (isa, key)


KERNEL_TESTS = ["tests/test_kernels_isa.py", "tests/test_fused.py", "tests/test_fastlinear.py",
                "tests/test_prefill_kernels.py"]


@needs_kernel
@pytest.mark.parametrize("isa", kernels.ISAS)
def test_kernel_tests_pass_under_each_build(isa):
    """The kernel test files again with another build (the default one is this run)."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    if isa == kernels.isa() or os.environ.get("POCKETLM_ISA"):
        pytest.skip("the build this run already tests (or a run inside another build)")
    env = {**os.environ, "POCKETLM_ISA": isa}
    env.pop("POCKETLM_NO_VNNI", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not slow", "-k", "not every_build and not under_each_build",
                        *KERNEL_TESTS, "tests/test_quantize.py::test_kernel_matches_the_fallback"],
                       cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
