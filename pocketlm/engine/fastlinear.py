"""The fastest dense layout this machine allows for inference, chosen once at load.

Batch-1 decode streams every weight once per token, so its speed is how fast a matrix-vector
product reads memory. PyTorch's BLAS reads these shapes at ~8-20 GB/s; the AVX2 kernel
(``gemv_f32`` in ``kernels/qgemv.cpp``, compiled on first use) at ~22-26 GB/s on the
same 2-core machine. ``GemvLinear`` uses it for up to ``MAX_ROWS`` input rows without
gradients, oneDNN's GEMM for longer inputs (prefill), and ``F.linear`` for training; where the
kernel cannot be built, weights are stored column-major instead, the best plain-PyTorch layout.
Prefill products can run in bf16 (``bf16_prefill``) where the CPU has bf16 GEMMs.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.kernels import bf16_prefill
from pocketlm.model.transformer import to_column_major

MAX_ROWS = 8


def _kernel():
    from pocketlm import kernels

    return kernels.get()


@lru_cache(maxsize=1)
def _onednn() -> bool:
    """Whether oneDNN's linear (``mkldnn._linear_pointwise``) runs here and agrees with F.linear.

    On a 2-core AVX2 machine it multiplies prefill-sized fp32 inputs by the plain row-major
    weight at 190-220 GFLOP/s where ``F.linear`` reaches 135-190 (512 x 576 by 576 x 1536 and
    friends), with no second copy of the weight.
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.randn(40, 64), torch.randn(48, 64)
        return torch.backends.mkldnn.is_available() and torch.allclose(
            op(x, w, None, "none", [], ""), F.linear(x, w), atol=1e-4)
    except (AttributeError, RuntimeError):
        return False


def _bf16_copy(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A bf16 copy of ``w`` kept beside the module, remade when the weight changes (in-place
    updates bump ``_version``; a replaced tensor has another storage)."""
    key = (w.data_ptr(), w._version, tuple(w.shape))
    cached = module.__dict__.get("_bf16_weight")
    if cached is None or cached[0] != key:
        cached = (key, w.detach().to(torch.bfloat16))
        module.__dict__["_bf16_weight"] = cached
    return cached[1]


class GemvLinear(nn.Linear):
    """An nn.Linear (same weight, same state dict) with fast inference paths: our AVX2 kernel
    for a few input rows (decode), oneDNN's GEMM for many (prefill); ``F.linear`` otherwise
    (gradients, other dtypes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1]
        if (self.bias is None and x.dtype == w.dtype == torch.float32 and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            if rows <= MAX_ROWS:
                k = _kernel()
                if k is not None:
                    y = k.gemv_f32(x.reshape(rows, -1).contiguous(), w)
                    return y.view(*x.shape[:-1], w.shape[0])
            elif bf16_prefill():
                y = F.linear(x.reshape(rows, -1).to(torch.bfloat16), _bf16_copy(self, w))
                return y.float().view(*x.shape[:-1], w.shape[0])
            elif _onednn():
                y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), w, None, "none", [], "")
                return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def speed_up(network: nn.Module) -> nn.Module:
    """Give every fp32 Linear the fast decode path (or column-major weights without the kernel)."""
    if _kernel() is None:
        return to_column_major(network)
    for module in network.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = GemvLinear
    return network
