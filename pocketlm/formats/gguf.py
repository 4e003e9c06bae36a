"""Read a GGUF file (llama.cpp's format) into a config, weights and a tokenizer.

``tensor_map`` says which of the file's tensors becomes which of our module's weights, so the
fp32 reader here (``read_state_dict``, the ``--dtype float32`` path) and the packed-weight
loader read the same names. Tensors are dequantized with the ``gguf`` package. llama.cpp's
converter interleaves the rows of LLaMA's Q and K for its RoPE kernel (and only LLaMA's:
Qwen and Gemma use the "NEOX" RoPE, whose order is Hugging Face's); we undo that so weights
are in Hugging Face order. Gemma's norm weights are stored as ``1 + w``, the factor our
RMSNorm multiplies by, so they are read as they are.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import FormatError, UnsupportedModel
from pocketlm.model.config import SUPPORTED, ModelConfig, rope_inv_freq

# GGUF tensor name -> our (Hugging Face, minus "model.") module name, per layer.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",  # LLaMA's pre-MLP norm; Gemma's: see below
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma has a norm after each sublayer too, and Hugging Face names its pre-MLP norm differently.
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_ARCHS = SUPPORTED
# Llama 3.x's rope_scaling, recognised from the rope_freqs tensor llama.cpp writes for it.
_LLAMA3_SCALINGS = [
    {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    for factor in (32.0, 8.0, 16.0)
]


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (dict) and ``tensors`` (name -> ``GGUFTensor``, whose
    data are views of the memory-mapped file). Parsed here, not by ``gguf.GGUFReader``, which
    costs ~0.5 GB of numpy objects for a 150k-token vocabulary; raises FormatError for a
    truncated or corrupt file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"no GGUF file at {self.path}")
        try:
            self._map = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise FormatError(f"{self.path} is not a readable GGUF file ({e})") from None
        try:
            self.metadata, self.tensors = _parse(self.path, self._map)
        except _Corrupt as e:
            raise FormatError(
                f"{self.path} is not a readable GGUF file: {e}. It may be truncated or "
                "corrupted: download it again and check its sha256."
            ) from None

    @functools.cached_property
    def reader(self):
        """The ``gguf`` package's reader of the same file (memory-hungry: built on first use)."""
        import gguf

        return gguf.GGUFReader(str(self.path))

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        return self.get("general.architecture", "?")

    def quant_summary(self) -> str:
        """The file's dominant tensor type, e.g. 'Q4_1' (what `pocketlm list` shows)."""
        from collections import Counter

        counts = Counter(t.tensor_type.name for t in self.tensors.values() if len(t.shape) > 1)
        return counts.most_common(1)[0][0] if counts else "?"



class GGUFTensor:
    """One tensor of a GGUF file, described the way ``gguf.GGUFReader`` describes it.

    ``shape`` lists the dimensions GGUF's way (ne0, the columns, first); ``data`` is a read-only
    view of the memory-mapped file shaped like the reader's (numpy's order, the last axis in
    bytes for block-quantized types).
    """

    __slots__ = ("data", "data_offset", "n_bytes", "n_elements", "name", "shape", "tensor_type")

    def __init__(self, name, tensor_type, shape, n_elements, n_bytes, data_offset, data):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self.data = n_elements, n_bytes, data_offset, data

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, {self.tensor_type.name}, shape={tuple(int(n) for n in self.shape)})"


class _Corrupt(Exception):
    pass


class _Parser:
    """Reads the GGUF header, key-value pairs and tensor infos straight from the file's bytes.

    Strings become ``str``, arrays of strings lists of ``str``, other arrays lists of numbers
    (what ``ReaderField.contents()`` gives). We parse ourselves because ``gguf.GGUFReader``
    builds several numpy objects for every vocabulary token and merge, ~0.5 GB for a 150k
    vocabulary.
    """

    def __init__(self, buf):
        import gguf

        self.buf, self.pos, self.gguf = buf, 0, gguf
        v = gguf.GGUFValueType
        # value type -> (numpy dtype, struct format), both little-endian
        self.scalars = {
            v.UINT8: ("<u1", "<B"), v.INT8: ("<i1", "<b"), v.UINT16: ("<u2", "<H"),
            v.INT16: ("<i2", "<h"), v.UINT32: ("<u4", "<I"), v.INT32: ("<i4", "<i"),
            v.FLOAT32: ("<f4", "<f"), v.BOOL: ("?", "<?"), v.UINT64: ("<u8", "<Q"),
            v.INT64: ("<i8", "<q"), v.FLOAT64: ("<f8", "<d"),
        }
        self.structs = {t: struct.Struct(fmt) for t, (_, fmt) in self.scalars.items()}

    def unpack(self, fmt: struct.Struct):
        if self.pos + fmt.size > len(self.buf):
            raise _Corrupt(f"the header ends early (at byte {self.pos} of {len(self.buf)})")
        out = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return out[0]

    def u32(self) -> int:
        return self.unpack(_U32)

    def u64(self) -> int:
        return self.unpack(_U64)

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise _Corrupt(f"a string of {n} bytes at byte {self.pos} runs past the end of the file")
        try:
            s = str(self.buf[self.pos:end], "utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"the string at byte {self.pos} is not UTF-8") from None
        self.pos = end
        return s

    def value(self, vtype: int):
        v = self.gguf.GGUFValueType
        if vtype == v.STRING:
            return self.string()
        if vtype == v.ARRAY:
            etype, count = self.u32(), self.u64()
            if etype == v.STRING or etype == v.ARRAY:
                return [self.value(etype) for _ in range(count)]
            dtype = self._dtype(etype)
            n = count * dtype.itemsize
            if self.pos + n > len(self.buf):
                raise _Corrupt(f"an array of {count} values at byte {self.pos} runs past the end")
            arr = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += n
            return arr.tolist()  # plain numbers, not views that would pin the map
        self._dtype(vtype)
        return self.unpack(self.structs[vtype])

    def _dtype(self, vtype: int) -> np.dtype:
        if vtype not in self.scalars:
            raise FormatError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        return np.dtype(self.scalars[vtype][0])


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _parse(path: Path, mm: np.memmap) -> tuple[dict, dict]:
    """(metadata, tensors by name) of the GGUF file mapped at ``mm``."""
    import gguf

    Q = gguf.GGMLQuantizationType
    p = _Parser(memoryview(mm))
    if len(mm) < 24 or p.u32() != gguf.GGUF_MAGIC:
        raise FormatError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    version = p.u32()
    if version not in (2, 3):
        hint = " (a big-endian file? only little-endian is read)" if version & 0xFFFF == 0 else ""
        if version > 255 and not hint:  # no GGUF version ever looked like this: a damaged header
            raise FormatError(f"{path}: the file is truncated or corrupted (its header's version "
                              f"field reads {version}); download it again")
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors, n_kv = p.u64(), p.u64()
    # the header's counts too, under the names gguf.GGUFReader gives them
    metadata = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = p.string()
        metadata[key] = p.value(p.u32())
    infos = []
    for _ in range(n_tensors):
        name = p.string()
        n_dims = p.u32()
        if n_dims > 8:
            raise FormatError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = [p.u64() for _ in range(n_dims)]
        raw_type, offset = p.u32(), p.u64()
        try:
            qtype = Q(raw_type)
        except ValueError:
            raise FormatError(f"{path}: tensor {name!r} has unknown tensor type {raw_type}") from None
        infos.append((name, dims, qtype, offset))
    align = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    if align <= 0 or align & (align - 1):
        raise FormatError(f"{path}: general.alignment {align} is not a power of two")
    start = -(-p.pos // align) * align
    typed = {Q.F16: np.float16, Q.F32: np.float32, Q.F64: np.float64, Q.I8: np.int8,
             Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}  # the rest: bytes, as the reader
    tensors = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise FormatError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise FormatError(f"{path}: tensor {name!r} has {dims[0]} columns, not whole {qtype.name} blocks")
        n_bytes = n_elems * type_size // block
        begin = start + offset
        if begin + n_bytes > len(mm):
            raise FormatError(
                f"{path}: tensor {name!r} needs bytes {begin}..{begin + n_bytes} but the file has "
                f"{len(mm)}; it is truncated: download it again and check its sha256"
            )
        np_dims = tuple(reversed(dims))
        if qtype in typed:
            data = mm[begin:begin + n_bytes].view(typed[qtype]).reshape(np_dims)
        else:
            data = mm[begin:begin + n_bytes].reshape(gguf.quants.quant_shape_to_byte_shape(np_dims, qtype))
        tensors[name] = GGUFTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elems, n_bytes, begin, data)
    return metadata, tensors


def read_config(f: GGUFFile) -> ModelConfig:
    """The model's shape from the file's metadata.

    Raises UnsupportedModel for an architecture or RoPE variant we do not run (naming the
    supported ones), FormatError when the metadata is incomplete.
    """
    arch = f.arch
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"{f.path.name}: architecture {arch!r} is not supported; pocketlm runs "
            f"{', '.join(SUPPORTED_ARCHS)} models"
        )
    g = lambda key, default=None: f.get(f"{arch}.{key}", default)
    scaling = None
    kind = g("rope.scaling.type", "none") or "none"
    if kind == "linear" and g("rope.scaling.factor"):
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif kind != "none":
        raise UnsupportedModel(f"{f.path.name}: RoPE scaling {kind!r} is not supported (linear, llama3)")
    n_heads = g("attention.head_count")
    dim = g("embedding_length")
    tokens = f.get("tokenizer.ggml.tokens")
    gemma = arch == "gemma3"
    try:
        head_dim = g("attention.key_length", dim // n_heads)
        theta = float(g("rope.freq_base", 10000.0))
        if "rope_freqs.weight" in f.tensors:  # Llama 3's scaled frequencies, as a tensor
            scaling = _llama3_scaling(f, head_dim, theta)
        return ModelConfig(
            vocab_size=g("vocab_size") or len(tokens),
            dim=dim,
            n_layers=g("block_count"),
            n_heads=n_heads,
            n_kv_heads=g("attention.head_count_kv", n_heads),
            hidden_dim=g("feed_forward_length"),
            head_dim=head_dim,
            norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            max_seq_len=g("context_length", 2048),
            tie_embeddings="output.weight" not in f.tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
            arch=arch,
            attn_bias="blk.0.attn_q.bias" in f.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
            post_norms="blk.0.post_ffw_norm.weight" in f.tensors,
            act="gelu_tanh" if gemma else "silu",
            scale_embeddings=gemma,
            norm_offset=1.0 if gemma else 0.0,
            # llama.cpp scales Gemma 3's queries by 1/sqrt(head_dim) (27B aside: dim/heads)
            query_pre_attn_scalar=float(head_dim) if gemma else 0.0,
            final_softcap=float(g("final_logit_softcapping") or 0.0),
            sliding_window=int(g("attention.sliding_window") or 0) if gemma else 0,
            # llama.cpp's Gemma 3: every 6th layer global, local layers at RoPE base 10000
            sliding_window_pattern=int(g("attention.sliding_window_pattern") or 6) if gemma else 0,
            rope_local_theta=10000.0 if gemma else 0.0,
            rope_scaling=scaling,
        )
    except (TypeError, KeyError) as e:
        raise FormatError(f"{f.path.name}: metadata is incomplete ({e}); is this a model file?") from None


def _llama3_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict:
    """The rope_scaling whose frequencies equal the file's rope_freqs (llama.cpp divides each
    frequency by its factor), so the config exports to Hugging Face as Llama 3's."""
    factors = dequantize(f.tensors["rope_freqs.weight"]).reshape(-1).astype(np.float64)
    base = np.asarray(rope_inv_freq(head_dim, theta))
    for scaling in _LLAMA3_SCALINGS:
        scaled = np.asarray(rope_inv_freq(head_dim, theta, scaling))
        if len(factors) == len(base) and np.allclose(base / factors, scaled, rtol=1e-4):
            return dict(scaling)
    raise UnsupportedModel(
        f"{f.path.name}: its rope_freqs are not Llama 3's rope scaling (factor 8, 16 or 32); "
        "custom RoPE frequencies are not supported"
    )


def tensor_map(f: GGUFFile, config: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(GGUF tensor name, our state-dict name, heads to un-interleave Q/K rows by or None).

    Every tensor of the file is in it except ``rope_freqs.weight`` (read into the config).
    The third field is set only for LLaMA's Q and K weights: llama.cpp's converter permutes
    those rows, and no other family's.
    Raises UnsupportedModel naming a tensor this architecture should not have.
    """
    names = _GEMMA_LAYER_NAMES if config.post_norms else _LAYER_NAMES
    permute = config.arch == "llama"
    out = []
    for name in f.tensors:
        if name == "rope_freqs.weight":
            continue
        if name in _TOP_NAMES:
            out.append((name, _TOP_NAMES[name], None))
            continue
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in names:
            raise UnsupportedModel(f"{f.path.name}: unexpected tensor {name!r} for a {config.arch} model")
        _, idx, kind, suffix = parts
        if suffix not in ("weight", "bias") or suffix == "bias" and not (
            config.attn_bias and kind in ("attn_q", "attn_k", "attn_v")
        ):
            raise UnsupportedModel(f"{f.path.name}: unexpected tensor {name!r} for a {config.arch} model")
        heads = None
        if permute and suffix == "weight" and kind in ("attn_q", "attn_k"):
            heads = config.n_heads if kind == "attn_q" else config.n_kv_heads
        out.append((name, f"layers.{idx}.{names[kind]}.{suffix}", heads))
    return out


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row interleaving: rows (h, e/2, 2) -> (h, 2, e/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_unpermute = unpermute  # the old private name


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as float32, shape (rows, cols) = PyTorch's (out, in)."""
    import gguf

    qtype = tensor.tensor_type
    try:
        arr = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise UnsupportedModel(
            f"tensor {tensor.name} is stored as {qtype.name}, which the gguf package cannot "
            "dequantize; supported include F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
            "Q2_K..Q6_K"
        ) from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists ne0 (columns) first
    arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
    return arr if arr.flags.writeable else arr.copy()  # F32 tensors are read-only memmap views


def read_state_dict(f: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All weights as fp32 tensors under our module names (see ``tensor_map``)."""
    out = {}
    for name, ours, heads in tensor_map(f, config):
        w = dequantize(f.tensors[name])
        if heads is not None:
            w = unpermute(w, heads)
        out[ours] = torch.from_numpy(w)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
