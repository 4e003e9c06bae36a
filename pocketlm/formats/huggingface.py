"""Hugging Face folders: config.json + model.safetensors (or shards with an index) + tokenizer.

A folder pocketlm saves is exactly such a folder plus ``card.json``, so transformers loads our
output and we load theirs. Weights are read from safetensors only: pickled ``.bin`` files can
run code when loaded, and are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def save_state_dict(
    state: dict[str, torch.Tensor], folder: Path, tied: bool, norm_offset: float | None = None
) -> None:
    """Write model.safetensors with Hugging Face names, atomically (temp file, then rename).

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
