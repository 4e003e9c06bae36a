"""Our CPU kernels (AVX2/FMA), compiled on first use with the machine's g++.

- ``qgemv.cpp``: quantized and dense fp32 matrix-vector products for a few rows;
- ``decode.cpp``: a whole decode step (every layer) in one call, ``DecodePlan``;
- ``attention.cpp``: causal grouped-query attention for prefill, ``causal_attention``;
- ``elementwise.cpp``: ``rms_norm``, ``silu_mul`` and ``rope`` in one pass each;
- ``kernels.h``: the SIMD pieces they share.

``build()`` JIT-compiles them through ``torch.utils.cpp_extension.load`` into
``$POCKETLM_HOME/kernels`` (default ``~/.cache/pocketlm/kernels``) with -O3 -mavx2 -mfma
-mf16c -fopenmp, plus VNNI where the CPU has it (``compile_flags``); later processes reuse the
cached build. The extension's name carries a hash of the sources (header included) and the
flags, so an edited kernel or another CPU's build is never served stale. It returns None (and callers use the
pure-PyTorch fallback) when the CPU lacks AVX2/FMA/F16C, when POCKETLM_NO_KERNEL=1, or when
compilation fails; the reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SOURCES = [HERE / "qgemv.cpp", HERE / "decode.cpp", HERE / "attention.cpp",
           HERE / "elementwise.cpp"]
HEADERS = [HERE / "kernels.h"]


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


def compile_flags(flags: set[str] | None = None) -> list[str]:
    """g++ flags for this CPU: AVX2/FMA/F16C, plus VNNI (one instruction for the int4/int3
    dot products, ``dot_u8s8`` in kernels.h) where the CPU has AVX512-VNNI with VL, or
    AVX-VNNI. POCKETLM_NO_VNNI=1 leaves VNNI out (to compare the two paths)."""
    flags = cpu_flags() if flags is None else flags
    extra = []
    if not os.environ.get("POCKETLM_NO_VNNI"):
        if {"avx512_vnni", "avx512vl"} <= flags:
            extra = ["-mavx512vnni", "-mavx512vl"]
        elif "avx_vnni" in flags:
            extra = ["-mavxvnni"]
    return BASE_FLAGS + extra


def isa() -> str:
    """'avx2+vnni' or 'avx2': the instruction set of the kernels this process loaded (before
    a build: the one ``build()`` would choose on this CPU)."""
    flags = _BUILT_FLAGS if _BUILT_FLAGS is not None else compile_flags()
    return "avx2+vnni" if len(flags) > len(BASE_FLAGS) else "avx2"


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
    try:
        from torch.utils.cpp_extension import load

        flags = compile_flags()
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
