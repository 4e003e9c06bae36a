"""Our CPU kernels (AVX2/FMA), compiled on first use with the machine's g++.

- ``qgemv.cpp``: quantized and dense fp32 matrix-vector products for a few rows;
- ``decode.cpp``: a whole decode step (every layer) in one call, ``DecodePlan``;
- ``attention.cpp``: causal grouped-query attention for prefill, ``causal_attention``;
- ``elementwise.cpp``: ``rms_norm``, ``silu_mul`` and ``rope`` in one pass each;
- ``kernels.h``: the SIMD pieces they share.

``build()`` JIT-compiles them through ``torch.utils.cpp_extension.load`` into
``$POCKETLM_HOME/kernels`` (default ``~/.cache/pocketlm/kernels``) with -O3 -mavx2 -mfma
-mf16c -fopenmp; later processes reuse the cached build. The extension's name carries a hash
of the sources (header included), so an edited kernel is never served stale. It returns None (and callers use the
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


def _name() -> str:
    digest = hashlib.sha256()
    for p in SOURCES + HEADERS:
        digest.update(p.read_bytes())
    return f"pocketlm_kernels_{digest.hexdigest()[:12]}"


def _cpu_ok() -> bool:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c"))


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

        name = _name()
        d = build_dir() / name  # one folder a version: builds never share a build.ninja
        d.mkdir(parents=True, exist_ok=True)
        return load(
            name=name,
            sources=[str(p) for p in SOURCES],
            build_directory=str(d),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - compiler missing, headers missing, ...: fall back, loudly
        log.warning("could not build the quantized kernel (%s: %s); using the slow fallback "
                    "(dequantize, then matmul)", type(e).__name__, str(e).splitlines()[0][:200])
        return None


@lru_cache(maxsize=1)
def get():
    """``build()``, once per process: the extension, or None where it cannot be built."""
    return build()
