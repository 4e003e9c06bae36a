"""Calibration samples: seeded, reproducible token windows cut from a text file.

The default file is WikiText-2's *validation* split (never the test split that perplexity is
scored on). The same file, seed, sample count and length always give the same windows, and
the file's sha256 goes into the model card.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from pocketlm.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_samples(tokenizer, path: str | Path | None = None, samples: int = 64,
                        seq_len: int = 512, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``samples`` windows of ``seq_len`` tokens (LongTensor (samples, seq_len)) and provenance.

    Windows start at seeded random offsets in the tokenized file. Raises InvalidArgument when
    the file is missing, or too short for one window, or ``samples``/``seq_len`` are not
    positive.
    """
    path = Path(path) if path else DEFAULT_CALIBRATION
    if samples < 1 or seq_len < 2:
        raise InvalidArgument(f"need samples >= 1 and seq-len >= 2, got {samples} and {seq_len}")
    if not path.is_file():
        raise InvalidArgument(
            f"calibration file {path} does not exist; pass --calibration FILE with plain text "
            "(e.g. a few hundred KB of text like the model's use)"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < seq_len + 1:
        raise InvalidArgument(
            f"calibration file {path} has {len(ids)} tokens, fewer than one window of "
            f"--seq-len {seq_len}; use a longer file or a shorter --seq-len"
        )
    if len(ids) < samples * seq_len // 4:
        raise InvalidArgument(
            f"calibration file {path} has only {len(ids)} tokens: too short for {samples} "
            f"samples of {seq_len} tokens (windows would mostly repeat); use a longer file or "
            "fewer --samples"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=g)
    batch = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
    info = {"file": str(path), "sha256": file_sha256(path), "samples": samples,
            "seq_len": seq_len, "seed": seed, "tokens": samples * seq_len}
    return batch, info
