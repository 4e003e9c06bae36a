"""Choosing scale-tuning settings on held-out *validation* text (never the scored test pages).

    .venv/bin/python bench/quant_tune_select.py --gptq DIR --variants JSON [--held 6] [--base]
        JSON: '[{"steps": 40, "lr": 2e-3, "bw": 1, "norms": false}, ...]'

DIR is a GPTQ folder made by ``quantize(..., samples=32, seq_len=512)`` (the calibration of
bench/compress.py). Each variant tunes a copy with ``pocketlm.compress.tune.tune`` on the
disjoint 512-token windows of wiki.valid that overlap none of the ``--held`` held-out windows
(``"samples": N``: the first N of them in a seeded order), saves it under --out, and scores it
on the held-out windows (spread over wiki.valid, overlapping no GPTQ calibration window):
perplexity and KL(fp32 || model). ``--base`` also scores fp32 and the untuned GPTQ model.
Rows of earlier sessions (keys without "tiles") tuned on GPTQ's own 32 windows or on windows
drawn at random around the held-out ones. Figures go to bench/results/compress.json under
"gptq_tuned_selection" (merged, so earlier variants stay).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import merge_results, read_results

import pocketlm
from pocketlm.compress.calibration import DEFAULT_CALIBRATION, calibration_samples
from pocketlm.compress.tune import kl_to_teacher, teacher_log_probs, tune


def held_out_starts(ids: torch.Tensor, n: int, seq_len: int = 512, samples: int = 32) -> list:
    """Starts of ``n`` windows of wiki.valid ``ids``, evenly spread, overlapping no window of
    the GPTQ calibration draw (``calibration_samples`` with seed 0)."""
    g = torch.Generator().manual_seed(0)  # calibration_samples' draw, to stay clear of it
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=g).tolist()
    return [s for s in range(0, len(ids) - seq_len, len(ids) // 40)
            if all(abs(s - c) >= seq_len for c in starts)][:n]


def held_out(tokenizer, n: int, seq_len: int = 512, samples: int = 32) -> torch.Tensor:
    """``n`` windows (n, seq_len) of wiki.valid, evenly spread, overlapping no calibration one."""
    ids = torch.tensor(tokenizer.encode(DEFAULT_CALIBRATION.read_text()))
    return torch.stack([ids[s: s + seq_len] for s in held_out_starts(ids, n, seq_len, samples)])


def tiles_around(tokenizer, held: int, seq_len: int = 512, samples: int | None = None,
                 seed: int = 0):
    """wiki.valid cut into disjoint windows of ``seq_len`` tokens, without those that overlap
    any of the ``held`` held-out windows, in a seeded order, the first ``samples`` (None: all);
    (S, seq_len) and their provenance for the card. ``calibration_tiles`` minus the held-out
    text: what a user's ``quantize(..., tune_steps=N)`` tunes on."""
    from pocketlm.compress.calibration import file_sha256

    ids = torch.tensor(tokenizer.encode(DEFAULT_CALIBRATION.read_text()))
    avoid = held_out_starts(ids, held, 512)
    starts = [s for s in range(0, len(ids) - seq_len + 1, seq_len)
              if all(s + seq_len <= h or s >= h + 512 for h in avoid)]
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[:samples] if samples else order
    info = {"file": str(DEFAULT_CALIBRATION), "sha256": file_sha256(DEFAULT_CALIBRATION),
            "tiles": f"{len(order)} of {len(starts)}", "seq_len": seq_len, "seed": seed,
            "tokens": len(order) * seq_len,
            "avoids": f"the {held} held-out windows of bench/quant_tune_select.py"}
    return torch.stack([ids[starts[i]: starts[i] + seq_len] for i in order]), info


def score(network, held: torch.Tensor, teacher: list[torch.Tensor]) -> dict:
    nll = kl = 0.0
    with torch.inference_mode():
        for i in range(held.shape[0]):
            logits = network(held[i: i + 1])[0]
            nll += F.cross_entropy(logits[:-1].float(), held[i, 1:]).item()
            kl += kl_to_teacher(logits, teacher[i]).item()
    return {"wiki_valid_ppl": math.exp(nll / len(held)), "kl_to_fp32": kl / len(held)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gptq", required=True)
    ap.add_argument("--variants", required=True)
    ap.add_argument("--held", type=int, default=6)
    ap.add_argument("--base", action="store_true")
    ap.add_argument("--out", default="/tmp/pocketlm-tuned")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ref = pocketlm.load("smollm2-135m-instruct", threads=a.threads)
    q = pocketlm.load(a.gptq, threads=a.threads)
    held = held_out(ref.tokenizer, a.held)
    teacher = teacher_log_probs(ref.network, held)
    fig = read_results("compress", "gptq_tuned_selection")
    fig["held_out"] = (f"{len(held)} x 512 tokens of wiki.valid, evenly spread, overlapping no "
                       "calibration window")
    if a.base:
        fig["fp32"] = score(ref.network, held, teacher)
        fig["gptq"] = score(q.network, held, teacher)
        print(fig["fp32"], fig["gptq"], flush=True)
    calibration_samples(ref.tokenizer, None, 32, 512, 0)  # fail early on a missing file
    for v in json.loads(a.variants):
        around = tiles_around(ref.tokenizer, a.held, samples=v.get("samples"))
        t = tune(q, ref, v["steps"], v["lr"], v.get("bw", 1), v.get("norms", False),
                 windows=around)
        name = "tiles-" + "-".join(f"{k}{v[k]}" for k in sorted(v))
        t.save(Path(a.out) / name)
        st = t.card.steps[-1]["settings"]
        fig[name] = {**score(t.network, held, teacher), "tune_s": st["seconds"],
                     "kl_first_step": st["kl_first_step"],
                     "kl_last_10pct_steps": st["kl_last_10pct_steps"],
                     "folder": str(Path(a.out) / name)}
        print(name, fig[name], flush=True)
        merge_results("compress", "gptq_tuned_selection", fig)
    merge_results("compress", "gptq_tuned_selection", fig)


if __name__ == "__main__":
    main()
