"""Our CPU kernels (AVX2/FMA, AVX-512 VNNI where the CPU has it), compiled on first use.

- ``qgemv.cpp``: quantized and dense fp32 matrix-vector products for a few rows;
- ``decode.cpp``: a whole decode step (every layer) in one call, ``DecodePlan``;
- ``attention.cpp``: causal grouped-query attention for prefill, ``causal_attention``;
- ``elementwise.cpp``: ``rms_norm``, ``silu_mul`` and ``rope`` in one pass each;
- ``kernels.h``: the SIMD pieces they share.

``build()`` JIT-compiles them through ``torch.utils.cpp_extension.load`` into
``$POCKETLM_HOME/kernels`` (default ``~/.cache/pocketlm/kernels``) with -O3 -mavx2 -mfma
-mf16c -fopenmp, plus VNNI on 256- or 512-bit vectors where the CPU has it (``compile_flags``;
``POCKETLM_ISA=avx2|avx2+vnni|avx512`` forces one, so one machine can test every build); later
processes reuse the cached build. The extension's name carries a hash of the sources (header included) and the
flags, so an edited kernel or another CPU's build is never served stale. It returns None (and callers use the
pure-PyTorch fallback) when the CPU lacks AVX2/FMA/F16C, when POCKETLM_NO_KERNEL=1, or when
compilation fails; the reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / "qgemv.cpp", HERE / "decode.cpp", HERE / "attention.cpp",
           HERE / "elementwise.cpp", HERE / "ggml.cpp"]
HEADERS = [HERE / "kernels.h", HERE / "ggml.h"]


BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_BUILT_FLAGS: list[str] | None = None  # the flags of the extension this process loaded


def _name(flags: list[str]) -> str:
    digest = hashlib.sha256(" ".join(flags).encode())
    for p in SOURCES + HEADERS:
        digest.update(p.read_bytes())
    return f"pocketlm_kernels_{digest.hexdigest()[:12]}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        return set(next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split())
    except (OSError, StopIteration):
        return set()


def _cpu_ok() -> bool:
    return {"avx2", "fma", "f16c"} <= cpu_flags()


ISAS = ("avx2", "avx2+vnni", "avx512")  # what a build can target, slowest first
ISA_FLAGS = {
    "avx2": [],
    # VNNI on 256-bit vectors: AVX512-VNNI with VL (the -mavx512vl spelling), or AVX-VNNI.
    "avx2+vnni": ["-mavx512vnni", "-mavx512vl"],
    # 512-bit VNNI: the integer dot products take a pair of blocks (64 columns) an instruction.
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vnni", "-mavx512vl"],
}


def supported_isas(flags: set[str] | None = None) -> list[str]:
    """The builds this CPU can run, slowest first (empty without AVX2/FMA/F16C)."""
    flags = cpu_flags() if flags is None else flags
    if not {"avx2", "fma", "f16c"} <= flags:
        return []
    out = ["avx2"]
    if {"avx512_vnni", "avx512vl"} <= flags or "avx_vnni" in flags:
        out.append("avx2+vnni")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= flags:
        out.append("avx512")
    return out


def chosen_isa(flags: set[str] | None = None) -> str:
    """The build to make: POCKETLM_ISA (avx2, avx2+vnni or avx512) if set, else the fastest this
    CPU runs; POCKETLM_NO_VNNI=1 means avx2. Raises InvalidArgument for an ISA that is unknown
    or that this CPU lacks."""
    from pocketlm.errors import InvalidArgument

    supported = supported_isas(flags) or ["avx2"]
    want = os.environ.get("POCKETLM_ISA", "").strip().lower()
    if not want:
        return "avx2" if os.environ.get("POCKETLM_NO_VNNI") else supported[-1]
    if want not in ISAS:
        raise InvalidArgument(f"POCKETLM_ISA={want!r} is not one of {', '.join(ISAS)}; "
                              "unset it to build for the fastest this CPU runs")
    if want not in supported:
        raise InvalidArgument(f"POCKETLM_ISA={want} needs CPU features this machine lacks (it "
                              f"runs {', '.join(supported)}); pick one of those or unset it")
    return want


def compile_flags(flags: set[str] | None = None) -> list[str]:
    """g++ flags for this CPU (``chosen_isa``): AVX2/FMA/F16C, plus VNNI on 256-bit vectors
    (AVX512-VNNI with VL, or AVX-VNNI) or on 512-bit ones (AVX-512 F/BW/DQ/VL + VNNI)."""
    isa_ = chosen_isa(flags)
    extra = ISA_FLAGS[isa_]
    if isa_ == "avx2+vnni" and not {"avx512_vnni", "avx512vl"} <= (
            cpu_flags() if flags is None else flags):
        extra = ["-mavxvnni"]
    return BASE_FLAGS + extra


def isa() -> str:
    """'avx512', 'avx2+vnni' or 'avx2': the instruction set of the kernels this process loaded
    (before a build: the one ``build()`` would choose on this CPU)."""
    flags = _BUILT_FLAGS if _BUILT_FLAGS is not None else compile_flags()
    if "-mavx512f" in flags:
        return "avx512"
    return "avx2+vnni" if len(flags) > len(BASE_FLAGS) else "avx2"


# Prefill in bf16: oneDNN multiplies bf16 with fp32 accumulation; activations are rounded to
# bf16 on the way in and the product on the way out, the residual stream stays fp32. On by
# default only with AMX, where oneDNN's bf16 GEMM ran ~2,050 GFLOP/s against ~300 for fp32
# (512 x 576 x 1536, 2-core Sapphire Rapids, issue 20). With AVX512-BF16 alone (2-core AMD
# EPYC, Zen 4) bf16 lost: 0.6x fp32's GFLOP/s on the prefill shapes, A B A B, so there it is
# off unless asked for.
# Packed weights (GGUF blocks, our int codes) are dequantized a tile at a time for every
# product anyway, so rounding the tile to bf16 costs one more pass over it; there bf16 is on
# wherever the CPU has bf16 GEMMs. Prefill 512, fp32 vs bf16 A B in one process (1 thread,
# loaded 2-core EPYC with AVX512-BF16, no AMX; torch 2.13, oneDNN 3.12): SmolLM2 Q4_1 1.75x,
# Gemma-3-270M Q4_K_M 1.68x, Qwen2.5-Coder 0.5B / 1.5B Q4_K_M 2.41x / 2.51x; WikiText-2
# perplexity (2 windows of 512 tokens) +0.13%, +0.08%, -0.02%, +0.03% (SmolLM2 over 8
# windows: +0.03%); our RTN int4 g128 / int8 codes on SmolLM2: 1.48x / 1.55x, -0.00% / +0.20%.
# All inside issue 20's 0.3% bar (bench/bf16_prefill.py). Still opt-in for packed weights
# (POCKETLM_BF16_PREFILL=1): the slow tests that check the real default model's logits against
# transformers (fp32) at 2e-3 / 1e-3 were not yet moved to pinned fp32 or to bf16 tolerances,
# and the gain at 2 threads on a quiet machine is not measured. Flip PACKED_BF16_DEFAULT then.
PACKED_BF16_DEFAULT = False


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether oneDNN has native bf16 GEMMs here (AVX512-BF16 or AMX), not an emulation."""
    import torch

    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, c, lambda: False)()
               for c in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    import torch

    return bool(getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", lambda: False)())


_fp32_depth = 0  # > 0 inside fp32_products(): a process-wide flag, seen by every thread


@contextmanager
def fp32_products():
    """Within this block, prefill-sized products stay fp32 whatever the bf16 default (only
    ``POCKETLM_BF16_PREFILL=1`` still forces bf16). The evaluator runs in one, so its scores
    stay the ones lm-eval's fp32 transformers backend gives on the same weights, item for
    item, and its per-item cache never mixes two precisions."""
    global _fp32_depth
    _fp32_depth += 1
    try:
        yield
    finally:
        _fp32_depth -= 1


def bf16_prefill(packed: bool = False) -> bool:
    """Whether prefill-sized products (more than 8 rows, no gradients) run in bf16; ``packed``
    for products that dequantize packed weights (GGUF blocks, our int codes) a tile at a time.
    ``POCKETLM_BF16_PREFILL=1``/``0`` turns it on/off for both; by default it is on for dense
    weights where the CPU has AMX, for packed ones if ``PACKED_BF16_DEFAULT`` (see above).
    Never on a CPU without bf16 GEMMs (an emulated one is ~4x slower than fp32)."""
    env = os.environ.get("POCKETLM_BF16_PREFILL")
    if env is None and _fp32_depth:
        return False
    want = (PACKED_BF16_DEFAULT if packed else cpu_has_amx()) if env is None else env == "1"
    return want and cpu_has_bf16()


def build_dir() -> Path:
    home = Path(os.environ.get("POCKETLM_HOME", Path.home() / ".cache" / "pocketlm"))
    return home / "kernels"


def build():
    """The compiled extension (``qgemv``, ``gemv_f32``, ``dequantize``, ``DecodePlan``), or None."""
    if os.environ.get("POCKETLM_NO_KERNEL"):
        return None
    if not _cpu_ok():
        log.warning("this CPU lacks AVX2/FMA/F16C: quantized layers use the slow fallback")
        return None
    flags = compile_flags()  # raises for a POCKETLM_ISA this CPU cannot run: the user's to fix
    try:
        from torch.utils.cpp_extension import load

        name = _name(flags)
        d = build_dir() / name  # one folder a version: builds never share a build.ninja
        d.mkdir(parents=True, exist_ok=True)
        ext = load(
            name=name,
            sources=[str(p) for p in SOURCES],
            build_directory=str(d),
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        global _BUILT_FLAGS
        _BUILT_FLAGS = flags
        return ext
    except Exception as e:  # noqa: BLE001 - compiler missing, headers missing, ...: fall back, loudly
        log.warning("could not build the quantized kernel (%s: %s); using the slow fallback "
                    "(dequantize, then matmul)", type(e).__name__, str(e).splitlines()[0][:200])
        return None


@lru_cache(maxsize=1)
def get():
    """``build()``, once per process: the extension, or None where it cannot be built."""
    return build()
