"""Hugging Face folders: config.json + model.safetensors (or shards with an index) + tokenizer.

A folder pocketlm saves is exactly such a folder plus ``card.json``, so transformers loads our
output and we load theirs. Weights are read from safetensors only: pickled ``.bin`` files can
run code when loaded, and are refused.

By default (``load(dtype=None)``) a folder's bf16/fp16 matrices stay 16-bit: ``read_16bit``
memory-maps each safetensors file and hands its rows to ``model/ggml.py`` as F16/BF16 blocks,
so a bf16 checkpoint takes its file size in memory, not twice that as fp32; norms and biases
are read as fp32. ``read_state_dict`` (any explicit dtype, pruned or quantized folders) reads
every tensor as stored.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from pocketlm.errors import FormatError, UnsupportedModel
from pocketlm.model.config import ModelConfig


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> ModelConfig:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise FormatError(f"{folder / 'config.json'} lacks the key {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise FormatError(f"{index} is not a valid shard index: {e}") from None
        files = [folder / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise UnsupportedModel(
            f"{folder} holds only pickled weights (.bin/.pt), which can run code when loaded; "
            "pocketlm reads safetensors only. Convert them once in a trusted environment with "
            "transformers: model.save_pretrained(folder, safe_serialization=True)"
        )
    raise FormatError(f"{folder} has no model.safetensors (or sharded safetensors with an index)")


def read_state_dict(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Weights under our names (Hugging Face's minus ``model.``), as stored (dtype kept)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = {}
    for f in _weight_files(folder):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(
                f"{f} could not be read ({e}); it may be truncated or corrupted"
            ) from None
        for name, t in tensors.items():
            name = name.removeprefix("model.")
            if config.norm_offset and name.endswith("norm.weight"):  # Gemma: factor = 1 + w,
                t = t.float() + config.norm_offset  # in fp32 as HF computes it
            out[name] = t
    if any(name.endswith(".bitmask") for name in out):  # pruned weights: values + bitmask
        from pocketlm.compress.prune import bitmask_unpack

        out = bitmask_unpack(out)
    if config.tie_embeddings:
        out["lm_head.weight"] = out.get("embed_tokens.weight")
    return out


def torch_dtype(state: dict[str, torch.Tensor]) -> str:
    """config.json's ``torch_dtype`` / ``dtype`` for these weights: the float dtype holding the most
    values ("bfloat16" for bf16 matrices beside fp32 norms), "float32" if none is float.

    transformers' ``from_pretrained(dtype="auto")`` loads in this dtype, so a bf16 folder
    that says float32 would be loaded at twice its size."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t is not None and t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return "float32"
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def save_state_dict(
    state: dict[str, torch.Tensor], folder: Path, tied: bool, norm_offset: float | None = None
) -> str:
    """Write model.safetensors with Hugging Face names, atomically (temp file, then rename);
    returns the ``torch_dtype`` of what was written (see ``torch_dtype``).

    ``norm_offset`` (``ModelConfig.norm_offset``, 1 for Gemma) is taken off every norm weight:
    we hold the factor a norm multiplies by, Gemma's checkpoints hold that factor minus one.
    None: 1 if the state has Gemma's pre-MLP norms (no other family we run has them), else 0.
    """
    from safetensors.torch import save_file

    if norm_offset is None:
        norm_offset = float(any(n.endswith("pre_feedforward_layernorm.weight") for n in state))

    tensors = {}
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        key = name if name.startswith("lm_head") else f"model.{name}"
        if norm_offset and name.endswith("norm.weight"):
            t = (t.float() - norm_offset).to(t.dtype)
        tensors[key] = t.detach().contiguous()
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    return torch_dtype(tensors)


# -- 16-bit weights kept 16-bit -----------------------------------------------------------------
# safetensors dtypes we map: 16-bit ones to GGML's F16/BF16 "blocks" (32 raw values, 64 bytes:
# a row of K 16-bit values is exactly K/32 such blocks), the rest read as fp32.
_QTYPE_16 = {"F16": 1, "BF16": 30}
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64}


def _safetensors_map(f: Path) -> tuple[np.memmap, dict, int]:
    """(memory map, header, offset of the data) of one safetensors file, parsed here so the
    tensors can be views of the map (safetensors' own loader copies them)."""
    try:
        mm = np.memmap(f, mode="r")
    except (OSError, ValueError) as e:
        raise FormatError(f"{f} could not be read ({e}); it may be truncated or corrupted") from None
    try:
        n = struct.unpack_from("<Q", mm, 0)[0]
        header = json.loads(bytes(mm[8:8 + n]))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise FormatError(f"{f} has no readable safetensors header; it may be truncated or "
                          "corrupted: download or save it again") from None
    header.pop("__metadata__", None)
    return mm, header, 8 + n


def read_16bit(folder: Path, config: ModelConfig):
    """The folder's weights with every bf16/fp16 matrix kept 16-bit, or None when it has none.

    Returns ``(packed, small)``: ``packed`` maps a module name to ``(qtype, N, K, blocks)``,
    ``blocks`` an (N, 2K) uint8 view of the memory-mapped file (GGML type F16=1 / BF16=30, what
    ``model/ggml.py`` computes from: nothing is copied); ``small`` holds the norms, biases and
    any matrix whose width is not whole blocks of 32, as fp32 (Gemma's norms as ``1 + w``).
    Pruned folders (values + bitmask) return None: they load through ``read_state_dict``.
    Raises FormatError for a truncated or corrupted file.
    """
    maps = [(f, *_safetensors_map(f)) for f in _weight_files(folder)]
    names = [name for _, _, header, _ in maps for name in header]
    if any(n.endswith(".bitmask") for n in names):
        return None
    packed, small = {}, {}
    for f, mm, header, base in maps:
        for name, info in header.items():
            dtype, shape = info.get("dtype"), list(info.get("shape", []))
            begin, end = (base + o for o in info.get("data_offsets", (0, 0)))
            if dtype not in _NUMPY:
                raise FormatError(f"{f}: tensor {name!r} is stored as {dtype}; pocketlm reads "
                                  f"{', '.join(_NUMPY)} weights")
            if end > len(mm) or end - begin != int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize:
                raise FormatError(f"{f}: tensor {name!r} runs past the end of the file or has the "
                                  "wrong size; the file is truncated or corrupted")
            ours = name.removeprefix("model.")
            if config.tie_embeddings and ours == "lm_head.weight":
                continue  # a tied head is the embedding's own blocks
            raw = mm[begin:end]
            module, _, kind = ours.rpartition(".")
            if dtype in _QTYPE_16 and len(shape) == 2 and kind == "weight" and shape[1] % 32 == 0:
                packed[module] = (_QTYPE_16[dtype], shape[0], shape[1],
                                  _ggml().blocks_from_numpy(raw, shape[0]))
                continue
            arr = raw.view(_NUMPY[dtype]).reshape(shape)
            t = torch.from_numpy(arr.astype(np.float32) if dtype != "BF16" else arr.copy())
            t = t.view(torch.bfloat16).float() if dtype == "BF16" else t
            if config.norm_offset and ours.endswith("norm.weight"):
                t = t + config.norm_offset  # Gemma: the factor is 1 + w, in fp32 as HF computes
            small[ours] = t
    return (packed, small) if packed else None


def _ggml():
    from pocketlm.model import ggml

    return ggml
