"""Training checkpoints: everything needed to continue a run as if it never stopped.

One file, ``last.pt``, written to a temporary name, flushed to disk and renamed over the old
one, so a crash at any moment leaves either the previous checkpoint or the new one, never a
torn file. It holds the trainable weights only (frozen weights come back from the source
model), the optimizer state, the step (the data position and the learning-rate schedule are
pure functions of the step), the RNG states, the loss history, and the run's settings and
data fingerprint so a resume with different settings or data is refused.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from pocketlm.errors import PocketError

CHECKPOINT = "last.pt"


class CheckpointMismatch(PocketError):
    """A checkpoint from a run with other settings or other data."""


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(folder: Path, state: dict) -> Path:
    """Write ``state`` to folder/last.pt atomically; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    tmp = folder / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(folder: Path) -> dict | None:
    """The last checkpoint in ``folder``, or None if there is none."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def check_compatible(saved: dict, settings: dict, fingerprint: str, folder: Path) -> None:
    """Raise CheckpointMismatch if the run's settings or data differ from the checkpoint's."""
    if saved.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"the checkpoint in {folder} was made on other data (or another tokenization); "
            "resume with the same --data and settings, or drop --resume to start over"
        )
    differ = [
        f"{k}: checkpoint {saved['settings'].get(k)!r}, now {v!r}"
        for k, v in settings.items()
        if saved["settings"].get(k) != v
    ]
    if differ:
        raise CheckpointMismatch(
            f"the checkpoint in {folder} was made with other settings ({'; '.join(differ)}); "
            "resume with the same settings, or drop --resume to start over"
        )
