"""Calibration samples: seeded, reproducible token windows cut from a text file.

The default file is WikiText-2's *validation* split (never the test split that perplexity is
scored on). The same file, seed, sample count and length always give the same windows, and
the file's sha256 goes into the model card.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from pocketlm.errors import InvalidArgument

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CALIBRATION = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_tokens(tokenizer, path: Path, seq_len: int) -> torch.Tensor:
    """The tokenized file (LongTensor); InvalidArgument if it is missing or under one window."""
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
    return ids


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
    ids = _file_tokens(tokenizer, path, seq_len)
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


def calibration_tiles(tokenizer, path: str | Path | None = None, seq_len: int = 512,
                      samples: int | None = None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The file cut into disjoint windows of ``seq_len`` tokens, in a seeded random order, the
    first ``samples`` of them (None: all); LongTensor (S, seq_len) and provenance.

    Where ``calibration_samples`` draws windows that may overlap, tiles see every token at most
    once, so the same number of windows holds more distinct text: what scale tuning, which
    can fit its windows too closely, needs. Raises InvalidArgument as ``calibration_samples``.
    """
    path = Path(path) if path else DEFAULT_CALIBRATION
    if (samples is not None and samples < 1) or seq_len < 2:
        raise InvalidArgument(f"need samples >= 1 and seq-len >= 2, got {samples} and {seq_len}")
    ids = _file_tokens(tokenizer, path, seq_len)
    n = len(ids) // seq_len
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if samples is not None and samples > n:
        log.warning("calibration file %s holds %d windows of %d tokens, fewer than the %d "
                    "asked for: using all %d", path, n, seq_len, samples, n)
    order = order[:samples] if samples is not None else order
    batch = ids[: n * seq_len].view(n, seq_len)[order]
    info = {"file": str(path), "sha256": file_sha256(path), "tiles": f"{len(order)} of {n}",
            "seq_len": seq_len, "seed": seed, "tokens": len(order) * seq_len}
    return batch, info
