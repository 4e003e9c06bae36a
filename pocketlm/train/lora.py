"""LoRA: a low-rank update ``W + (alpha / r) * B @ A`` beside frozen ``nn.Linear`` weights.

``apply_lora`` swaps the chosen linears for ``LoRALinear`` (B starts at zero, so the wrapped
network computes exactly what the base did) and freezes everything else. After training the
update is either merged into plain ``nn.Linear`` weights (``merge_lora``) or saved on its own
as an adapter folder (``save_adapter``): ``adapter_config.json`` and
``adapter_model.safetensors`` with PEFT's key names and fields, so PEFT can read it too.
``pocketlm.load(adapter_folder)`` loads the base model named in the config and merges the
adapter in (``load_adapter``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from pocketlm.errors import FormatError, InvalidArgument

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T`` with A (r, in), B (out, r); base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 -> no change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)


def apply_lora(
    network: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose name ends in one of ``targets``; freeze the rest.

    Returns the wrapped module names. Raises InvalidArgument for a rank < 1 or targets that
    match nothing (listing the linear layers there are).
    """
    if rank < 1:
        raise InvalidArgument(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(alpha if alpha is not None else 2 * rank)
    for p in network.parameters():
        p.requires_grad_(False)
    names = [
        n
        for n, m in network.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in set(targets)
    ]
    if not names:
        kinds = sorted(
            {n.split(".")[-1] for n, m in network.named_modules() if isinstance(m, nn.Linear)}
        )
        raise InvalidArgument(
            f"--lora-targets {','.join(targets)} match no linear layer; this model has: "
            f"{', '.join(kinds)}"
        )
    for name in names:
        parent, child = _parent(network, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def _parent(network: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (network.get_submodule(path) if path else network), child


def lora_modules(network: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in network.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(network: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place)."""
    for name, m in lora_modules(network).items():
        parent, child = _parent(network, name)
        lin = m.base
        lin.weight.copy_(m.merged_weight())
        setattr(parent, child, lin)
    for p in network.parameters():
        p.requires_grad_(True)
    return network


def _peft_key(name: str, which: str) -> str:
    return f"base_model.model.model.{name}.lora_{which}.weight"


def save_adapter(network: nn.Module, folder: str | Path, base_model: str) -> Path:
    """Write the LoRA weights and config (PEFT layout) to ``folder``; returns it."""
    from safetensors.torch import save_file

    mods = lora_modules(network)
    if not mods:
        raise InvalidArgument("the network has no LoRA layers to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(mods.values()))
    tensors = {}
    for name, m in mods.items():
        tensors[_peft_key(name, "A")] = m.lora_A.detach().float().contiguous()
        tensors[_peft_key(name, "B")] = m.lora_B.detach().float().contiguous()
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({n.split(".")[-1] for n in mods}),
    }
    tmp = folder / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, folder / ADAPTER_CONFIG)  # last: marks a whole adapter folder
    return folder


def is_adapter_folder(path: Path) -> bool:
    return (
        path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()
    )


@torch.no_grad()
def load_adapter(path: str | Path, dtype: torch.dtype = torch.float32, threads: int | None = None):
    """Load the base model an adapter folder names and merge the adapter into it.

    Raises FormatError for a missing or inconsistent adapter, ModelNotFound for a base model
    that cannot be found (the path is stored in adapter_config.json).
    """
    from safetensors.torch import load_file

    from pocketlm.api import load
    from pocketlm.model.card import Card

    path = Path(path)
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        base_name, rank, alpha = cfg["base_model_name_or_path"], int(cfg["r"]), cfg["lora_alpha"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FormatError(
            f"{path / ADAPTER_CONFIG} is not a valid LoRA adapter config: {e}"
        ) from None
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise FormatError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    model = load(base_name, dtype=torch.float32, threads=threads)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    scale = float(alpha) / rank
    pairs = {}
    for key, t in tensors.items():
        name, which = key.removeprefix("base_model.model.model.").rsplit(".lora_", 1)
        pairs.setdefault(name, {})[which.split(".")[0]] = t
    for name, ab in pairs.items():
        try:
            lin = model.network.get_submodule(name)
        except AttributeError:
            raise FormatError(f"{path}: adapter names {name!r}, which {base_name} lacks") from None
        if set(ab) != {"A", "B"}:
            raise FormatError(f"{path}: {name} lacks lora_A or lora_B")
        delta = scale * (ab["B"].float() @ ab["A"].float())
        if delta.shape != lin.weight.shape:
            raise FormatError(
                f"{path}: {name} update is {tuple(delta.shape)}, the base weight "
                f"is {tuple(lin.weight.shape)}; was it trained on another model?"
            )
        lin.weight.add_(delta)
    model.network.to(dtype)
    card = Card.load(path)
    if card.steps:
        model.card.steps = card.steps
        model.card.metrics = card.metrics
    model.card.name = path.name
    return model
