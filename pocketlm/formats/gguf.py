"""Read a GGUF file (llama.cpp's format) into a config, fp32 weights and a tokenizer.

Tensors are read and dequantized with the ``gguf`` package. llama.cpp's converter interleaves
the rows of Q and K for its RoPE kernel; we undo that so weights are in Hugging Face order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import FormatError, UnsupportedModel
from pocketlm.model.config import ModelConfig

# GGUF tensor name -> our (Hugging Face, minus "model.") name; "{}" is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_ARCHS = ("llama",)


class GGUFFile:
    """A parsed GGUF file: ``metadata`` (dict) and the raw tensors, read lazily (memory-mapped)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"no GGUF file at {self.path}")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError, IndexError, ...
            raise FormatError(
                f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e}). "
                "It may be truncated or corrupted: download it again and check its sha256."
            ) from None
        self.metadata = {}
        for key, field in self.reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception:  # noqa: BLE001, S110 - a field we cannot decode we do not use
                pass
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        return self.get("general.architecture", "?")

    def quant_summary(self) -> str:
        """The file's dominant tensor type, e.g. 'Q4_1' (what `pocketlm list` shows)."""
        from collections import Counter

        counts = Counter(t.tensor_type.name for t in self.reader.tensors if len(t.shape) > 1)
        return counts.most_common(1)[0][0] if counts else "?"


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.arch
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(
            f"{f.path.name}: architecture {arch!r} is not supported; pocketlm runs "
            f"{', '.join(SUPPORTED_ARCHS)} (LLaMA-family) models for now"
        )
    g = lambda key, default=None: f.get(f"{arch}.{key}", default)
    if g("rope.scaling.type", "none") not in ("none", None) or g("rope.scaling.factor"):
        raise UnsupportedModel(f"{f.path.name}: RoPE scaling is not supported yet")
    n_heads = g("attention.head_count")
    dim = g("embedding_length")
    tokens = f.get("tokenizer.ggml.tokens")
    try:
        return ModelConfig(
            vocab_size=g("vocab_size") or len(tokens),
            dim=dim,
            n_layers=g("block_count"),
            n_heads=n_heads,
            n_kv_heads=g("attention.head_count_kv", n_heads),
            hidden_dim=g("feed_forward_length"),
            head_dim=g("attention.key_length", dim // n_heads),
            norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            max_seq_len=g("context_length", 2048),
            tie_embeddings="output.weight" not in f.tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=f.get("tokenizer.ggml.eos_token_id"),
        )
    except (TypeError, KeyError) as e:
        raise FormatError(f"{f.path.name}: metadata is incomplete ({e}); is this a model file?") from None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row interleaving: rows (h, e/2, 2) -> (h, 2, e/2)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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
    """All weights as fp32 tensors under our module names."""
    out = {}
    for name, t in f.tensors.items():
        if name in _TOP_NAMES:
            ours = _TOP_NAMES[name]
        elif name.startswith("blk."):
            _, idx, kind, suffix = name.split(".", 3)
            if kind not in _LAYER_NAMES or suffix != "weight":
                raise UnsupportedModel(f"{f.path.name}: unexpected tensor {name!r} for a LLaMA model")
            ours = f"layers.{idx}.{_LAYER_NAMES[kind]}.{suffix}"
        elif name == "rope_freqs.weight":
            raise UnsupportedModel(f"{f.path.name}: custom RoPE frequencies are not supported yet")
        else:
            raise UnsupportedModel(f"{f.path.name}: unexpected tensor {name!r} for a LLaMA model")
        w = dequantize(t)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, config.n_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, config.n_kv_heads)
        out[ours] = torch.from_numpy(w)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out
