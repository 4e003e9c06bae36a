"""Pruning the default model: WikiText-2 quality, storage and decode speed of every method.

    POCKETLM_THREADS=1 .venv/bin/python bench/prune.py [--pages 1 --stride 512] [--samples 16]
        [--seq-len 256] [--decode-tokens 16] [--heal-steps 6] [--resume] [--skip-heal]

As run for BENCHMARKS.md (2026-11-29): ``--pages 1 --stride 512 --decode-tokens 16
--heal-steps 6``, one thread (on this shared 2-core machine two threads were 2-6x slower).
Reference: the default model dequantized to fp32. Quality: WikiText-2 raw *test* perplexity
from ``pocketlm.evaluate`` (lm-eval's document-level pages and metrics) over the first
``--pages`` pages, rolling windows of ``--context`` tokens with ``--stride``. Calibration:
``--samples`` seeded windows of ``--seq-len`` tokens from the *validation* split.

(a) 50% unstructured and 2:4 for magnitude, Wanda and SparseGPT.
(b) Storage of a 50% model: dense safetensors (``Model.save``, ``--storage dense``) and
    values + bitmask (``save_bitmask``, ``--storage bitmask``), both measured on disk.
(c) Decode speed (batch 1, ``time_decode``): pruned-but-dense vs the reference, A B A B medians,
    and a batch-1 sparse (CSR) matvec vs dense on one real pruned weight.
(d) Structured pruning of ~25% of the parameters (MLP channels; whole layers): perplexity
    before and after a short healing fine-tune (``pocketlm.train.finetune`` on the validation
    split) and decode speed vs the reference, A B A B medians.

Figures go under "prune" in bench/results/compress.json after every configuration, so
``--resume`` after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    SHARED,
    append_section,
    decode_ab,
    markdown_table,
    merge_results,
    read_results,
    wikitext_perplexity,
)

import pocketlm
from pocketlm.compress.prune import prune, save_bitmask, sparsity_of
from pocketlm.compress.structured import prune_structured
from pocketlm.engine.bench import weight_bytes

VALID = SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"



def folder_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save(d)
        return os.path.getsize(Path(d) / "model.safetensors")


def packed_bytes(model) -> int:
    """model.safetensors as ``pocketlm prune --storage bitmask`` writes it."""
    with tempfile.TemporaryDirectory() as d:
        save_bitmask(model, d)
        return os.path.getsize(Path(d) / "model.safetensors")


@torch.inference_mode()
def csr_vs_dense(weight: torch.Tensor, rounds: int = 5, calls: int = 200) -> dict:
    """Batch-1 matvec with the pruned weight: dense ``F.linear`` vs torch's CSR ``sparse @``."""
    x = torch.randn(weight.shape[1], 1)
    csr = weight.to_sparse_csr()
    fns = {"dense": lambda: weight @ x, "csr": lambda: csr @ x}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[k].append((time.perf_counter() - t0) / calls)
    return {f"{k}_matvec_us": statistics.median(v) * 1e6 for k, v in times.items()}


def heal(model, steps: int, a) -> dict:
    from pocketlm.train import TrainSettings, finetune, load_data

    data = load_data(VALID, model.tokenizer, seq_len=256, held_out=0.05)
    s = TrainSettings(steps=steps, batch_size=4, lr=a.heal_lr, eval_every=0, eval_rows=8,
                      checkpoint_every=0, progress=True, memory_check=False)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        healed = finetune(model, data, d, settings=s, eval_before=False)
        seconds = time.perf_counter() - t0
    healed.network.eval()
    for p in healed.network.parameters():
        p.requires_grad_(False)
    return healed, {"heal_steps": steps, "heal_tokens": steps * 4 * 256, "heal_lr": a.heal_lr,
                    "heal_s": seconds, "heal_data": str(VALID)}



def read_prune_results() -> dict:
    return read_results("compress", "prune")


def save_prune_results(prune_figures: dict) -> None:
    """Only the "prune" key is ours; "quantize" belongs to bench/compress.py."""
    merge_results("compress", "prune", prune_figures)


perplexity = wikitext_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=1, help="WikiText-2 test pages scored (1)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows (16)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window tokens (256)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--heal-steps", type=int, default=6)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--skip-heal", action="store_true")
    ap.add_argument("--heal-units", default="mlp,layers",
                    help="which structured models get the healing fine-tune (mlp,layers)")
    ap.add_argument("--no-section", action="store_true",
                    help="write the JSON but append no BENCHMARKS.md section (a later run will)")
    ap.add_argument("--resume", action="store_true", help="keep figures already in compress.json")
    ap.add_argument("--redo-speed", action="store_true",
                    help="with --resume: measure every decode speed again, keep the other figures")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings, nothing written: checks the script runs end to end")
    a = ap.parse_args()
    if a.smoke:
        global save_prune_results, append_section
        save_prune_results = append_section = lambda *args: None
        a.pages, a.context, a.stride, a.samples, a.seq_len = 1, 128, 128, 2, 64
        a.decode_tokens, a.rounds, a.heal_steps = 2, 1, 1

    res = read_prune_results() if a.resume else {}
    settings = {"pages": a.pages, "context": a.context, "stride": a.stride,
                "calibration": str(VALID), "samples": a.samples, "seq_len": a.seq_len,
                "threads": torch.get_num_threads(), "evaluator": "pocketlm.evaluate wikitext2"}
    if res.get("settings", {}) | {"threads": 0} != settings | {"threads": 0}:
        res = {}
    res["settings"] = settings
    if a.redo_speed:  # measure decode speeds again (e.g. on a quieter machine); keep the rest
        res.pop("speed_unstructured", None)
        for k in ("structured_mlp", "structured_layers"):
            for f in ("reference_decode_tokens_per_s", "decode_tokens_per_s", "decode_speedup"):
                res.get(k, {}).pop(f, None)
    ref = pocketlm.load("smollm2-135m-instruct")  # threads: $POCKETLM_THREADS, else all cores
    res["settings"]["threads"] = torch.get_num_threads()
    if "reference" not in res:
        res["reference"] = {**perplexity(ref, a), "params": ref.config.n_params,
                            "file_bytes": folder_bytes(ref)}
        save_prune_results(res)
    calib = {"samples": a.samples, "seq_len": a.seq_len}

    # (a) unstructured and 2:4
    keep_for_speed = None
    for method in ("magnitude", "wanda", "sparsegpt"):
        for tag, amount in (("50pct", {"sparsity": 0.5}), ("2of4", {"pattern": "2:4"})):
            key = f"{method}_{tag}"
            need_model = key == "wanda_50pct" and "storage" not in res
            if key in res and not need_model:
                continue
            t0 = time.perf_counter()
            pruned = prune(ref, method, **amount, **calib)
            prune_s = time.perf_counter() - t0
            if key not in res:
                res[key] = {**perplexity(pruned, a), "prune_s": prune_s,
                            "achieved_sparsity": sparsity_of(pruned.network)}
                save_prune_results(res)
            if key == "wanda_50pct":
                keep_for_speed = pruned
            del pruned

    # (b) storage and (c) speed of a 50% model
    if "storage" not in res or "speed_unstructured" not in res:
        sparse = keep_for_speed or prune(ref, "wanda", sparsity=0.5, **calib)
        dense_b, packed_b = folder_bytes(sparse), packed_bytes(sparse)
        res["storage"] = {"dense_safetensors_bytes": dense_b, "bitmask_safetensors_bytes": packed_b,
                          "bitmask_vs_dense": packed_b / dense_b,
                          "note": "embedding (tied lm_head) and norms stay dense"}
        step = decode_ab({"reference": ref.network, "wanda_50pct": sparse.network},
                         a.decode_tokens, a.rounds)
        w = sparse.network.layers[15].mlp.down_proj.weight.detach().clone()
        res["speed_unstructured"] = {
            "reference_decode_tokens_per_s": 1 / step["reference"],
            "wanda_50pct_dense_decode_tokens_per_s": 1 / step["wanda_50pct"],
            "speedup": step["reference"] / step["wanda_50pct"],
            "down_proj_576x1536_50pct": csr_vs_dense(w)}
        save_prune_results(res)
        del sparse, keep_for_speed

    # (d) structured, ~25% of the parameters
    hidden = ref.config.hidden_dim
    heal_units = [] if a.skip_heal else a.heal_units.split(",")
    for unit, ratio in (("mlp", 640 / hidden), ("layers", 0.3)):
        key = f"structured_{unit}"
        entry = res.get(key, {})
        if entry and "decode_speedup" in entry and ("heal_steps" in entry or unit not in heal_units):
            continue
        t0 = time.perf_counter()
        small = prune_structured(ref, unit, ratio, **calib)
        if not entry:
            entry = {"ratio": ratio, "prune_s": time.perf_counter() - t0,
                     "params": small.config.n_params,
                     "params_removed_fraction": 1 - small.config.n_params / ref.config.n_params,
                     "weight_bytes": weight_bytes(small.network), "file_bytes": folder_bytes(small),
                     "config": {k: getattr(small.config, k) for k in
                                ("n_layers", "n_heads", "n_kv_heads", "hidden_dim")},
                     "before_heal": perplexity(small, a)}
            res[key] = entry
            save_prune_results(res)
        if "decode_speedup" not in entry:
            step = decode_ab({"reference": ref.network, unit: small.network}, a.decode_tokens,
                             a.rounds)
            entry.update(reference_decode_tokens_per_s=1 / step["reference"],
                         decode_tokens_per_s=1 / step[unit],
                         decode_speedup=step["reference"] / step[unit])
            save_prune_results(res)
        if unit in heal_units and "heal_steps" not in entry:
            healed, info = heal(small, a.heal_steps, a)
            entry.update(info, after_heal=perplexity(healed, a))
            save_prune_results(res)
        del small

    report(res, section=not a.no_section)


def report(res: dict, section: bool = True) -> None:
    s = res["settings"]
    ref = res["reference"]
    rows = [["fp32 reference", "-", f"{ref['word_perplexity']:.3f}", f"{ref['token_perplexity']:.3f}", "-"]]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for tag, label in (("50pct", "50% unstructured"), ("2of4", "2:4")):
            r = res.get(f"{method}_{tag}")
            if r:
                rows.append([f"{method} {label}", f"{r['achieved_sparsity']:.3f}",
                             f"{r['word_perplexity']:.3f}", f"{r['token_perplexity']:.3f}",
                             f"{r['prune_s']:.0f}"])
    body = [(f"WikiText-2 raw test, first {s['pages']} pages ({ref['tokens_scored']} tokens), "
            f"`pocketlm.evaluate` rolling windows, context {s['context']}, stride {s['stride']}. "
            f"Calibration: {s['samples']} x {s['seq_len']} tokens of wiki.valid.raw (seed 0). "
            f"Speeds with {s['threads']} thread(s) on a shared machine."),
            "", markdown_table(["model", "sparsity", "word ppl", "token ppl", "prune s"], rows),
            "", ("Sparsity is over the 7 linears of every block (embedding/lm_head and norms "
                 "kept); the source weights (Q4_1, dequantized) already hold a few exact zeros, "
                 "so an N:M pattern can show slightly more than 50%.")]
    st, sp = res.get("storage"), res.get("speed_unstructured")
    if st and sp:
        mv = sp["down_proj_576x1536_50pct"]
        body += ["", (f"Storage at 50%: the saved folder is dense safetensors, "
                 f"{st['dense_safetensors_bytes'] / 1e6:.1f} MB (same as the reference); the same "
                 f"weights as values + bitmask (`--storage bitmask`, the CLI default) measure "
                 f"{st['bitmask_safetensors_bytes'] / 1e6:.1f} MB ({st['bitmask_vs_dense']:.0%})."),
                 (f"Decode at batch 1 (A B A B medians): reference "
                 f"{sp['reference_decode_tokens_per_s']:.1f} tok/s, Wanda 50% (dense kernels) "
                 f"{sp['wanda_50pct_dense_decode_tokens_per_s']:.1f} tok/s "
                 f"(x{sp['speedup']:.2f}): zeros do not speed up dense kernels. torch's CSR "
                 f"matvec on a real 50% 576x1536 weight: {mv['csr_matvec_us']:.0f} us vs dense "
                 f"{mv['dense_matvec_us']:.0f} us.")]
    srows = []
    for unit in ("mlp", "layers"):
        r = res.get(f"structured_{unit}")
        if not r:
            continue
        after = r.get("after_heal")
        srows.append([unit, f"{r['ratio']:.3f}", f"{r['params'] / 1e6:.1f}M",
                      f"{r['params_removed_fraction']:.1%}", json.dumps(r["config"]),
                      f"{r['before_heal']['word_perplexity']:.2f}",
                      f"{after['word_perplexity']:.2f} ({r['heal_steps']} steps, "
                      f"{r['heal_tokens']} tok)" if after else "not run",
                      (f"{r['decode_tokens_per_s']:.1f} vs {r['reference_decode_tokens_per_s']:.1f}"
                      f" (x{r['decode_speedup']:.2f})")])
    if srows:
        body += ["", (f"Structured pruning (reference {ref['params'] / 1e6:.1f}M params, word ppl "
                 f"{ref['word_perplexity']:.2f}); healing = full fine-tune on wiki.valid.raw, "
                 "batch 4 x 256 tokens:"), "",
                 markdown_table(["unit", "ratio", "params", "removed", "config", "word ppl",
                                 "after healing", "decode tok/s vs ref"], srows)]
    text = "\n".join(body)
    print(text)
    if section:
        append_section("Pruning (bench/prune.py)", text)


if __name__ == "__main__":
    main()

