"""Quantized Linear and Embedding modules that compute from packed weights, and the module swap.

A quantized weight (N outputs, K inputs) is stored as unsigned codes q in [0, 2^bits) with one
fp16 scale s and one zero point z per (row, group of ``group_size`` input columns):
w = (q - z) * s. Rows are padded to ``Kp`` (a multiple of 32) with codes equal to the zero
point, so padded columns dequantize to exactly 0. On disk (model.safetensors), per module:

- ``NAME.qweight`` uint8: bits 8 -> (N, Kp), one code a byte; bits 4 -> (N, Kp/2), two codes a
  byte in blocks of 32 columns (byte i: column i low nibble, column 16+i high nibble);
  bits 3 -> (N, 3*Kp/8), eight codes in three bytes (little-endian 3-bit fields).
- ``NAME.scales`` fp16 (N, G), G = ceil(Kp / group_size);
- ``NAME.zeros`` uint8 (N, G), asymmetric only (symmetric zero point is 2^(bits-1)).

Decode-sized inputs (at most ``GEMV_MAX_ROWS`` rows) go through the kernel in
``kernels/qgemv.cpp`` (VNNI dot products where the CPU has them, on 512-bit vectors with
AVX-512): activations are rounded to int8 with one scale per block of 32 columns (as llama.cpp
does for its quantized dot products; ~0.5% relative error on a product) and multiplied with the
codes in integer arithmetic; 8-bit codes keep fp32 activations unless ``POCKETLM_INT8_ACT=1``
(``int8_activations``). Longer inputs (prefill, evaluation) dequantize a tile of rows at a
time and use a float matmul on unrounded activations, in bf16 where
``kernels.bf16_prefill()`` is on. Without the
compiled kernel every path is the pure-PyTorch *fallback*: dequantize, then matmul. 3-bit
codes are unpacked to one byte per code at load for the kernel (the file stays 3-bit).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import FormatError

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 8  # inputs with more rows than this dequantize once and use a float matmul
FORMAT = "pocketlm-packed-v1"


def padded_width(k: int) -> int:
    return -(-k // 32) * 32


# -- packing ---------------------------------------------------------------------------------
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (N, Kp) uint8 with Kp a multiple of 32 -> the stored ``qweight`` for ``bits``."""
    codes = codes.to(torch.uint8)
    n, kp = codes.shape
    if kp % 32:
        raise ValueError(f"pack: width {kp} is not a multiple of 32")
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        blocks = codes.view(n, kp // 32, 2, 16)  # (N, blocks, lo/hi half, 16)
        return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()
    if bits == 3:
        v = codes.view(n, kp // 8, 8).to(torch.int32)
        word = torch.zeros(n, kp // 8, dtype=torch.int32)
        for j in range(8):
            word |= v[:, :, j] << (3 * j)  # 24 bits
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1)  # (N, Kp/8, 3)
        return out.to(torch.uint8).reshape(n, kp * 3 // 8).contiguous()
    raise ValueError(f"pack: unsupported bits {bits}")


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: stored ``qweight`` -> codes (N, Kp) uint8."""
    n = qweight.shape[0]
    if bits == 8:
        return qweight
    if bits == 4:
        b = qweight.view(n, -1, 16)  # (N, blocks, 16)
        return torch.stack([b & 0x0F, b >> 4], dim=2).reshape(n, -1)
    if bits == 3:
        t = qweight.view(n, -1, 3).to(torch.int32)
        word = t[..., 0] | (t[..., 1] << 8) | (t[..., 2] << 16)  # (N, Kp/8)
        return torch.stack([(word >> (3 * j)) & 7 for j in range(8)], dim=-1).to(
            torch.uint8).reshape(n, -1)
    raise ValueError(f"unpack: unsupported bits {bits}")


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """(q - z) * s in fp32, (N, Kp); scales/zeros (N, G) broadcast over their groups."""
    kp = codes.shape[1]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :kp]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :kp]
    return (codes.float() - z) * s


# -- the compiled kernel (optional) ----------------------------------------------------------
_EXT: object | None = None
_EXT_TRIED = False


def kernel():
    """The compiled AVX2 extension, built on first use; None (fallback) when it cannot be.

    Set POCKETLM_NO_KERNEL=1 to force the pure-PyTorch fallback.
    """
    global _EXT, _EXT_TRIED
    if _EXT_TRIED:
        return _EXT
    _EXT_TRIED = True
    from pocketlm.kernels import build

    _EXT = build()
    return _EXT


def backend() -> str:
    """'avx2' or 'avx2+vnni' (``kernels.isa``) when the compiled kernel is in use, else
    'fallback' (dequantize, then matmul)."""
    if kernel() is None:
        return "fallback"
    from pocketlm.kernels import isa

    return isa()


def int8_activations() -> bool:
    """Whether decode-sized products with 8-bit codes round their activations to int8 (integer
    dot products, VNNI where the CPU has it), as 4- and 3-bit codes always do.
    ``POCKETLM_INT8_ACT=1`` turns it on; off by default until its WikiText-2 perplexity cost on
    the real models is measured under the issue's 0.3% bar (an earlier 256-bit version cost
    +0.7%, through int16 saturation of maddubs that the current kernel no longer has)."""
    import os

    return os.environ.get("POCKETLM_INT8_ACT", "0") == "1"


def qmatmul(x: torch.Tensor, qw: QuantizedTensor) -> torch.Tensor:
    """x (..., K) @ W.T for a quantized W (N, K) -> (..., N), computed in fp32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qw.in_features).float()
    if qw.kp != qw.in_features:
        x2 = F.pad(x2, (0, qw.kp - qw.in_features))
    ext = kernel()
    kbits = qw.bits  # the kernel takes 3-bit codes unpacked, one a byte (kernel_codes)
    if ext is not None and x2.shape[0] <= GEMV_MAX_ROWS:
        gemv = ext.qgemv_q8 if kbits != 8 or int8_activations() else ext.qgemv
        y = gemv(x2.contiguous(), qw.kernel_codes(), qw.scales, qw.zeros, kbits, qw.group_size)
    else:
        y = _dequantized_matmul(x2, qw, ext)
    return y.to(x.dtype).reshape(*lead, qw.out_features)


def _dequantized_matmul(x2: torch.Tensor, qw: QuantizedTensor, ext) -> torch.Tensor:
    """x2 (M, Kp) @ W.T with W dequantized a tile of output rows at a time (a few MB, never
    the whole fp32 matrix: the 49k-row embedding alone would be 113 MB), in bf16 where
    ``kernels.bf16_prefill()`` says so (no gradients), else fp32."""
    from pocketlm.kernels import bf16_prefill

    bf16 = (x2.shape[0] > GEMV_MAX_ROWS and x2.dtype == torch.float32
            and not torch.is_grad_enabled() and bf16_prefill(packed=True))
    xin = x2.to(torch.bfloat16) if bf16 else x2
    tile = max(64, (1 << 20) // qw.kp // 64 * 64)  # output rows a tile: ~4 MB fp32
    codes = qw.kernel_codes() if ext is not None else qw.codes()
    out = []
    for n0 in range(0, qw.out_features, tile):
        rows = slice(n0, min(qw.out_features, n0 + tile))
        if ext is not None:
            w = ext.dequantize(codes[rows], qw.scales[rows], qw.zeros[rows], qw.bits,
                               qw.group_size)
        else:
            w = dequantize_codes(codes[rows], qw.scales[rows], qw.zeros[rows], qw.group_size)
        out.append(F.linear(xin, w.to(torch.bfloat16) if bf16 else w))
    y = out[0] if len(out) == 1 else torch.cat(out, dim=1)
    return y.float()


# -- modules ---------------------------------------------------------------------------------
class QuantizedTensor(nn.Module):
    """Packed codes + scales (+ zeros) of one (N, K) weight, as buffers that save and load."""

    def __init__(self, out_features: int, in_features: int, bits: int, group_size: int,
                 sym: bool):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bits, self.sym = bits, sym
        self.kp = padded_width(in_features)
        self.group_size = group_size if group_size else self.kp  # 0 = one group per row
        if self.group_size % 32:
            raise ValueError(f"group size must be a multiple of 32, got {group_size}")
        g = -(-self.kp // self.group_size)
        n, b = out_features, {8: self.kp, 4: self.kp // 2, 3: self.kp * 3 // 8}[bits]
        self.register_buffer("qweight", torch.zeros(n, b, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(n, g, dtype=torch.float16))
        # The symmetric zero point is a constant: kept in memory for the kernel, not saved.
        self.register_buffer("zeros", torch.full((n, g), 1 << (bits - 1), dtype=torch.uint8),
                             persistent=not sym)
        self._unpacked: torch.Tensor | None = None
        self.compute_dtype = torch.float32  # activations' dtype; codes stay uint8

    def set(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Fill from codes (N, Kp) uint8, scales (N, G) fp16, zeros (N, G) uint8."""
        self.qweight.copy_(pack(codes, self.bits))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        self._unpacked = None

    @property
    def weight(self) -> torch.Tensor:
        """A shape-and-dtype stand-in (on the meta device, no data): code that asks
        ``lm_head.weight.dtype`` for the compute dtype keeps working. Use ``dequantize()``
        for the values."""
        return torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype,
                           device="meta")

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits)

    def kernel_codes(self) -> torch.Tensor:
        if self.bits != 3:
            return self.qweight
        if self._unpacked is None:
            self._unpacked = unpack(self.qweight, 3).contiguous()
        return self._unpacked

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) these codes stand for."""
        w = dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size)
        return w[:, : self.in_features]

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpacked = None
        super()._load_from_state_dict(*args, **kwargs)

    def nbytes(self) -> int:
        n = self.qweight.numel() + self.scales.numel() * 2
        return n + (0 if self.sym else self.zeros.numel())

    def extra_repr(self) -> str:
        return (f"{self.out_features}x{self.in_features}, int{self.bits}, "
                f"group {self.group_size}, {'sym' if self.sym else 'asym'}")


class QLinear(QuantizedTensor):
    """A Linear computing from its packed weight (buffers qweight, scales, zeros); its bias,
    where the float layer had one (Qwen2's q/k/v), stays a float parameter beside them."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool, bias: torch.Tensor | None = None):
        super().__init__(out_features, in_features, bits, group_size, sym)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qmatmul(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QEmbedding(QuantizedTensor):
    """An embedding table stored quantized, one row per token; lookups dequantize rows."""

    def __init__(self, num_embeddings: int, dim: int, bits: int, group_size: int, sym: bool):
        super().__init__(num_embeddings, dim, bits, group_size, sym)
        self.num_embeddings, self.embedding_dim = num_embeddings, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack(self.qweight[flat], self.bits)
        w = dequantize_codes(codes, self.scales[flat], self.zeros[flat], self.group_size)
        w = w[:, : self.embedding_dim].to(self.compute_dtype)
        return w.reshape(*ids.shape, self.embedding_dim)


class TiedQLinear(nn.Module):
    """The output projection tied to a ``QEmbedding``: same codes, nothing of its own to save."""

    def __init__(self, embedding: QEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its buffers save once
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmatmul(x, self.embedding)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight


# -- the swap --------------------------------------------------------------------------------
def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def make_module(name: str, shape: tuple[int, int], spec: dict, network: nn.Module) -> nn.Module:
    """An empty quantized module for ``name`` per its config entry ``spec``."""
    if spec.get("tied"):
        return TiedQLinear(network.get_submodule(spec["tied"]))
    n, k = shape
    bits, gs, sym = spec["bits"], spec.get("group_size", 0), spec.get("sym", True)
    if name == "embed_tokens":
        return QEmbedding(n, k, bits, gs, sym)
    return QLinear(k, n, bits, gs, sym)


def swap_in(network: nn.Module, state: dict, qconfig: dict) -> nn.Module:
    """Replace the modules named in ``qconfig["modules"]`` by quantized ones and load ``state``.

    ``network`` is a float ``Transformer`` (its weights may be uninitialised); every other
    tensor of ``state`` is copied into it. Raises FormatError for a config or state that does
    not match the network.
    """
    if qconfig.get("format") != FORMAT:
        raise FormatError(
            f"quantization format {qconfig.get('format')!r} is not one this pocketlm reads "
            f"({FORMAT}); re-quantize the model with this version"
        )
    modules = qconfig.get("modules") or {}
    # Embedding first, so a tied head can point at it.
    for name in sorted(modules, key=lambda m: m != "embed_tokens"):
        try:
            old = network.get_submodule(name)
        except AttributeError:
            raise FormatError(f"quantized module {name!r} does not exist in this network") from None
        if isinstance(old, nn.Embedding):
            shape = (old.num_embeddings, old.embedding_dim)
        else:
            shape = (old.out_features, old.in_features)
        new = make_module(name, shape, modules[name], network)
        if isinstance(new, QLinear) and getattr(old, "bias", None) is not None:
            new.bias = nn.Parameter(torch.empty_like(old.bias), requires_grad=False)  # loaded below
        _set_module(network, name, new)
    state = {k: v for k, v in state.items() if v is not None}
    result = network.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FormatError(
            f"quantized weights do not match the config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    network.quantization_config = qconfig
    return network


def build_quantized_network(config, state: dict, qconfig: dict, dtype=torch.float32):
    """A ``Transformer`` with quantized modules, from a saved state dict and its qconfig."""
    from pocketlm.model.transformer import Transformer

    with torch.device("meta"):
        network = Transformer(config)
    network = network.to_empty(device="cpu")
    if config.tie_embeddings and "lm_head" not in qconfig.get("modules", {}):
        network.lm_head.weight = network.embed_tokens.weight
    swap_in(network, state, qconfig)
    network.init_rope(dtype)  # every table: Llama 3's scaling, Gemma's local ones
    if config.tie_embeddings and "lm_head" not in qconfig.get("modules", {}):
        network.lm_head.weight = network.embed_tokens.weight
    # Only float parameters change dtype; codes stay uint8 and scales fp16.
    for p in network.parameters():
        p.data = p.data.to(dtype)
    for m in network.modules():
        if isinstance(m, QuantizedTensor):
            m.compute_dtype = dtype
    return network.eval()


def quantized_bytes(network: nn.Module) -> int:
    """Bytes of all quantized tensors (codes + scales + zeros) in ``network``."""
    return sum(m.nbytes() for m in network.modules() if isinstance(m, QuantizedTensor))
