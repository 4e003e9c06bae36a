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


def sampled_windows(model, path: str | Path | None = None, n: int = 384,
                    seq_len: int = 512, prefix: int = 32, top_p: float = 0.95, seed: int = 0,
                    batch_size: int = 64, progress: bool = True,
                    checkpoint_dir: str | Path | None = None) -> tuple[torch.Tensor, dict]:
    """``n`` windows of ``seq_len`` tokens written by the float ``model`` (a ``pocketlm.Model``)
    itself; LongTensor (n, seq_len) and provenance.

    Each window starts with ``prefix`` tokens of the calibration file (seeded random offsets),
    so the model writes in that file's style, and continues with tokens sampled from the
    model's own distribution (temperature 1, nucleus ``top_p``). This is the data-free
    augmentation of LLM-QAT (Liu et al., 2023): scale tuning, which only asks the quantized
    model to match the float one, can read as much of this text as it needs, where a real
    calibration file runs out (WikiText-2 validation holds 521 windows of 512 tokens).
    Cost: ~20 min for 384 windows of 512 tokens on 2 cores (batched decoding, ``batch_size``
    sequences at a time). With ``checkpoint_dir`` each finished batch is saved there, and a
    later call with the same settings continues from it; batch b always draws from its own
    generator (seed, b), so an interrupted run ends with the same windows as an uninterrupted one.
    Raises InvalidArgument as ``calibration_samples``.
    """
    from tqdm import tqdm

    from pocketlm.engine.generate import decode_step
    from pocketlm.engine.sampling import top_p_filter
    from pocketlm.evaluate.run import fingerprint
    from pocketlm.model.transformer import KVCache

    if n < 1 or not 1 <= prefix < seq_len:
        raise InvalidArgument(f"need n >= 1 windows and 1 <= prefix < seq-len, got n={n}, "
                              f"prefix={prefix}, seq-len={seq_len}")
    network = model.network
    path = Path(path) if path else DEFAULT_CALIBRATION
    ids = _file_tokens(model.tokenizer, path, seq_len)
    starts = torch.randint(0, len(ids) - prefix, (n,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    info = {"sampled_from": "the float model", "prompts_from": str(path),
            "sha256": file_sha256(path), "windows": n, "seq_len": seq_len,
            "prefix_tokens": prefix, "temperature": 1.0, "top_p": top_p, "seed": seed}
    saved = None
    if checkpoint_dir:  # named after everything that decides the windows, the weights included
        key = hashlib.sha256(repr((info, batch_size, fingerprint(model))).encode()).hexdigest()
        saved = Path(checkpoint_dir) / f"sampled-{key[:16]}.safetensors"
    done = []
    if saved is not None and saved.is_file():
        from safetensors.torch import load_file

        done = [load_file(str(saved))["windows"]]
        log.info("resuming sampling from %s: %d windows already written", saved, len(done[0]))
    have = sum(len(d) for d in done)
    with torch.inference_mode(), tqdm(total=n, initial=have, desc="sample windows",
                                      unit="window", disable=not progress) as bar:
        for b0 in range(have, n, batch_size):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b0)
            prompts = torch.stack([ids[s: s + prefix] for s in starts[b0: b0 + batch_size]])
            B = len(prompts)
            cache = KVCache.allocate(network.config, B, seq_len,
                                     dtype=network.lm_head.weight.dtype)
            logits = network(prompts, torch.arange(prefix)[None].expand(B, -1), cache,
                             rows=slice(0, B))[:, -1]
            out = [prompts]
            for pos in range(prefix, seq_len):
                probs = top_p_filter(torch.softmax(logits.float(), -1), top_p)
                nxt = torch.multinomial(probs, 1, generator=g)[:, 0]
                out.append(nxt[:, None])
                if pos + 1 < seq_len:
                    logits = decode_step(network, cache, nxt, torch.full((B,), pos))
            done.append(torch.cat(out, 1))
            bar.update(B)
            if saved is not None:
                from safetensors.torch import save_file

                saved.parent.mkdir(parents=True, exist_ok=True)
                tmp = saved.with_suffix(".tmp")
                save_file({"windows": torch.cat(done).contiguous()}, str(tmp))
                tmp.replace(saved)
    return torch.cat(done)[:n], info
