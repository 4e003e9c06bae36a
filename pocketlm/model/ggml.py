"""Weights kept in llama.cpp's (GGML's) block formats, computed from as they are stored.

A GGUF file's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K tensors (and F16/BF16 ones, as
"blocks" of 32 16-bit values) become ``GGMLLinear`` / ``GGMLEmbedding`` modules holding the
file's bytes, (N, row_bytes) uint8, usually a view of the memory-mapped file itself: loading
copies nothing and the model's resident memory is about its file size. ``kernels/ggml.cpp``
computes from the blocks:

- up to ``MAX_ROWS`` input rows (decode): one matrix-vector call, each block decoded in
  registers and multiplied with every row, so each weight byte is read once a step;
- more rows (prefill, scoring): ``TILE_BYTES`` of output rows at a time are dequantized to fp32
  and multiplied with oneDNN's GEMM, so no whole fp32 copy of a matrix ever exists; in bf16
  (tile and activations rounded) where ``kernels.bf16_prefill(packed=True)`` says so;
- an embedding dequantizes only the rows it looks up; a tied output head reads the same bytes.

Without the compiled kernels the same modules dequantize with the ``gguf`` package (slow, but
the same numbers). ``--dtype float32`` (``load(dtype=torch.float32)``) skips all of this and
dequantizes every weight to fp32 at load.
"""

from __future__ import annotations

import ctypes
import warnings
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import UnsupportedModel
from pocketlm.kernels import bf16_prefill

MAX_ROWS = 8  # input rows up to which the matrix-vector kernel beats dequantize + GEMM
TILE_BYTES = 16 << 20  # fp32 bytes of one dequantized tile of output rows (prefill)

# gguf.GGMLQuantizationType ids -> (name, values per block, bytes per block)
TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 1: ("F16", 32, 64), 30: ("BF16", 32, 64),
}
TYPE_IDS = {name: i for i, (name, _, _) in TYPES.items()}
_TORCH_16 = {1: torch.float16, 30: torch.bfloat16}


def supported_names() -> str:
    return ", ".join(["F32"] + [name for name, _, _ in TYPES.values()])


def check_type(qtype: int, tensor_name: str = "") -> None:
    """Raises UnsupportedModel naming ``qtype`` and the types we compute from."""
    if qtype not in TYPES:
        import gguf

        try:
            name = gguf.GGMLQuantizationType(qtype).name
        except ValueError:
            name = f"type {qtype}"
        where = f"tensor {tensor_name} is stored as " if tensor_name else ""
        raise UnsupportedModel(
            f"{where}{name}, which pocketlm cannot compute from; supported tensor types: "
            f"{supported_names()}. Re-quantize the model to one of those (e.g. llama.cpp's "
            "llama-quantize ... Q4_K_M)."
        )


@lru_cache(maxsize=1)
def _lib():
    """The kernel entry points (ctypes on the compiled extension), or None without kernels."""
    from pocketlm import kernels

    ext = kernels.get()
    if ext is None:
        return None
    try:
        lib = ctypes.CDLL(ext.__file__)
        gemv, deq = lib.pocketlm_ggml_gemv, lib.pocketlm_ggml_dequantize
    except (OSError, AttributeError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemv.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, i64, ptr]
    deq.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ptr, ctypes.c_int]
    gemv.restype = deq.restype = ctypes.c_int
    return lib


def blocks_from_numpy(data: np.ndarray, rows: int) -> torch.Tensor:
    """(rows, row_bytes) uint8 tensor over ``data``'s memory (no copy, also for a read-only
    memory map: nothing writes to weights)."""
    raw = np.asarray(data).view(np.uint8).reshape(rows, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write
        return torch.from_numpy(raw)


class GGMLTensor(nn.Module):
    """An (N, K) weight held as N rows of GGML blocks of type ``qtype``.

    ``weight`` is a meta tensor: it carries the compute dtype and shape (what the engine reads
    to size its cache) but no data; ``dequantize()`` gives the values.
    """

    def __init__(self, qtype: int, n: int, k: int, blocks: torch.Tensor):
        super().__init__()
        check_type(qtype)
        name, qk, nbytes = TYPES[qtype]
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, k // qk * nbytes) or k % qk:
            raise UnsupportedModel(
                f"a {name} weight of shape ({n}, {k}) needs {k} columns in whole blocks of {qk} "
                f"and ({n}, {k // qk * nbytes}) bytes; got {tuple(blocks.shape)}")
        self.qtype, self.n, self.k = qtype, n, k
        self.register_buffer("blocks", blocks)
        self.weight = torch.empty(n, k, dtype=torch.float32, device="meta")

    @property
    def type_name(self) -> str:
        return TYPES[self.qtype][0]

    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self, rows: torch.Tensor | slice | None = None, exact: bool = True) -> torch.Tensor:
        """fp32 (n, K) of the given rows (a slice, or int64 row ids; default all): gguf.quants'
        values bit for bit, or with ``exact=False`` to within a rounding (fused multiply-adds)."""
        if rows is None:
            rows = slice(0, self.n)
        lib = _lib()
        if isinstance(rows, slice):
            r0, r1, _ = rows.indices(self.n)
            n = max(0, r1 - r0)
            src, ids = self.blocks[r0:r1], None
        else:
            ids = rows.reshape(-1).to(torch.int64).contiguous()
            n = ids.numel()
            src = self.blocks
        out = torch.empty(n, self.k)
        if n == 0:
            return out
        if lib is None:  # no kernels: the gguf package's reference dequantization
            return self._reference(src if ids is None else src[ids])
        lib.pocketlm_ggml_dequantize(
            self.qtype, src.data_ptr(), self.blocks.shape[1], self.k, n,
            None if ids is None else ids.data_ptr(), out.data_ptr(), int(exact))
        return out

    def _reference(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.qtype in _TORCH_16:
            return blocks.contiguous().view(_TORCH_16[self.qtype]).float()
        import gguf

        arr = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(self.qtype))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, self.k))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ W.T -> (..., N) in fp32 (see the module docstring for the paths)."""
        rows = x.numel() // self.k
        x2 = x.reshape(rows, self.k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        grad = torch.is_grad_enabled() and x2.requires_grad
        lib = _lib()
        if rows <= MAX_ROWS and lib is not None and not grad:
            x2 = x2.contiguous()
            y = torch.empty(rows, self.n)
            lib.pocketlm_ggml_gemv(self.qtype, x2.data_ptr(), rows, self.k, self.blocks.data_ptr(),
                                   self.blocks.shape[1], self.n, y.data_ptr())
        else:
            # bf16 (``kernels.bf16_prefill``): the fp32 tile and the activations are rounded to
            # bf16, oneDNN accumulates in fp32 and rounds the product to bf16, handed on as fp32.
            # 16-bit weights (F16/BF16 rows: a 16-bit model, not a quantized one) stay fp32.
            bf16 = (rows > MAX_ROWS and not grad and self.qtype not in _TORCH_16
                    and bf16_prefill(packed=True))
            xin = x2.to(torch.bfloat16) if bf16 else x2

            def product(part: slice) -> torch.Tensor:
                w = self.dequantize(part, exact=False)
                return F.linear(xin, w.to(torch.bfloat16) if bf16 else w)

            tile = max(16, TILE_BYTES // (4 * self.k))
            if tile >= self.n:
                y = product(slice(0, self.n))
            else:
                y = torch.cat([product(slice(r, r + tile)) for r in range(0, self.n, tile)], dim=-1)
            y = y.float() if bf16 else y
        return y.view(*x.shape[:-1], self.n)

    def extra_repr(self) -> str:
        return f"{self.type_name}, ({self.n}, {self.k}), {self.nbytes() / 1e6:.1f} MB"


class GGMLLinear(GGMLTensor):
    """A linear layer (optional fp32 bias) computing from GGML blocks."""

    def __init__(self, qtype: int, out_features: int, in_features: int, blocks: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__(qtype, out_features, in_features, blocks)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class GGMLEmbedding(GGMLTensor):
    """Token embeddings in GGML blocks: only the looked-up rows are dequantized."""

    def __init__(self, qtype: int, num_embeddings: int, dim: int, blocks: torch.Tensor):
        super().__init__(qtype, num_embeddings, dim, blocks)
        self.num_embeddings, self.embedding_dim = num_embeddings, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n):
            raise IndexError(f"token id out of range for a vocabulary of {self.n}")
        return self.dequantize(ids).view(*ids.shape, self.k)


class TiedGGMLHead(nn.Module):
    """The output layer of a tied model: the embedding's own blocks, read as a linear layer."""

    def __init__(self, embedding: GGMLEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: the bytes are counted once
        self.in_features, self.out_features = embedding.k, embedding.n

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embedding.matmul(x)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"tied to the embedding ({self.embedding.type_name})"


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def packed_modules(network: nn.Module) -> list[GGMLTensor]:
    return [m for m in network.modules() if isinstance(m, GGMLTensor)]


def float_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """``network.state_dict()`` with every packed GGML weight dequantized to fp32 under its
    ``.weight`` name (one tensor at a time), so a model loaded packed saves as a plain folder
    that our loader and transformers read. A tied head adds nothing: the folder ties it."""
    state = network.state_dict()
    for name, module in network.named_modules():
        if isinstance(module, GGMLTensor):
            prefix = f"{name}." if name else ""
            state.pop(prefix + "blocks", None)
            state[prefix + "weight"] = module.dequantize()
    return state


def dense_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` whose packed GGML modules are plain fp32 ``nn.Linear`` /
    ``nn.Embedding`` (a tied head stays tied), for the steps that rewrite weights (quantize,
    prune, finetune, distill). The original keeps its packed blocks; without packed modules this
    is ``copy.deepcopy``."""
    import copy

    packed = packed_modules(network)
    memo = {id(m.blocks): m.blocks for m in packed}  # the copy never duplicates the file's bytes
    out = copy.deepcopy(network, memo)
    tied = None
    for name, m in list(out.named_modules()):
        if isinstance(m, GGMLEmbedding):
            new = nn.Embedding(m.n, m.k)
            new.weight = nn.Parameter(m.dequantize())
            tied = new if isinstance(getattr(out, "lm_head", None), TiedGGMLHead) else tied
        elif isinstance(m, GGMLLinear):
            new = nn.Linear(m.k, m.n, bias=m.bias is not None)
            new.weight = nn.Parameter(m.dequantize())
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().clone())
        else:
            continue
        set_module(out, name, new)
    if tied is not None:
        head = nn.Linear(tied.embedding_dim, tied.num_embeddings, bias=False)
        head.weight = tied.weight
        out.lm_head = head
    return out


def stored_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """``float_state_dict`` that keeps F16/BF16 weights in their 16-bit dtype (a view of their
    bytes, no copy), so saving a model loaded 16-bit (a bf16 Hugging Face folder, an F16 GGUF)
    writes a folder of the same size and values; block-quantized weights are dequantized to
    fp32 as in ``float_state_dict``."""
    state = network.state_dict()
    for name, module in network.named_modules():
        if isinstance(module, GGMLTensor):
            prefix = f"{name}." if name else ""
            state.pop(prefix + "blocks", None)
            if module.qtype in _TORCH_16:
                w = module.blocks.view(_TORCH_16[module.qtype]).view(module.n, module.k)
            else:
                w = module.dequantize()
            state[prefix + "weight"] = w
    return state
