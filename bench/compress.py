"""Quantizing the default model: WikiText-2 quality, file size and decode speed of every method.

    .venv/bin/python bench/compress.py [--pages 3] [--context 1024 --stride 512]
                                       [--samples 32 --seq-len 512] [--threads 1] [--resume]
                                       [--no-speed] [--peer-types F16,Q8_0,Q4_0] [--report-only]
                                       [--only CONFIG,...] [--key quantize] [--save-dir DIR]

The 2026-11-29 figures: ``--pages 5 --context 1024 --stride 1024 --no-speed`` (then
``--resume --peer-types F16,Q8_0,Q4_0``). The 2026-12-01 figures, the whole test split
(key "quantize_full_test"): ``--pages 0 --context 1024 --stride 1024 --no-speed --no-peer
--threads 2 --key quantize_full_test --only int4_gptq_g128_tuned,int4_gptq_g128,...``.

Reference: the default model (SmolLM2-135M-Instruct, from its Q4_1 GGUF) dequantized to fp32.
Each configuration is quantized, saved, *loaded back from the folder* (what a user runs), and
measured:
- quality: WikiText-2 raw *test* perplexity from ``pocketlm.evaluate`` (lm-eval's pages and
  metrics) over the first ``--pages`` pages, rolling windows of ``--context`` tokens with
  ``--stride``; calibration (GPTQ/AWQ): ``--samples`` seeded windows of ``--seq-len`` tokens
  from the *validation* split (scale tuning: every disjoint window of it);
- size: model.safetensors bytes, and its ratio to fp32 (4 bytes x parameters);
- speed: decode tokens/s at batch 1 (``pocketlm.engine.bench.time_decode``), alternating
  fp32 and the quantized model A B A B, medians; the kernel in use ("avx2", or "fallback" =
  dequantize then matmul) is named.
Peer (when .peer/build exists): llama.cpp's ``llama-quantize --allow-requantize`` from the same
GGUF to Q8_0 and Q4_0 (and F16 as its reference), ``llama-perplexity`` on the same pages'
text (its own windows: chunks of --context, second half scored), ``llama-bench`` decode.

Figures go under "quantize" (or ``--key``) in bench/results/compress.json after every
configuration, so ``--resume`` continues after an interruption; a configuration interrupted
midway resumes from quantize()'s checkpoint in the temp folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    SHARED,
    append_section,
    decode_ab,
    markdown_table,
    merge_results,
    read_results,
    wikitext_perplexity,
)

import pocketlm
from pocketlm.compress import quantize
from pocketlm.compress.qlinear import backend

PEER_BIN = REPO / ".peer" / "build" / "bin"
TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CONFIGS = {  # name -> quantize() settings; None = quantize()'s default for the method
    # The rows measured before GPTQ went stage by stage by default keep their setting.
    "int4_gptq_g128": {"method": "gptq", "bits": 4, "group_size": 128,  # asym, act-order
                       "sequential": False},
    "int4_rtn_g128": {"method": "rtn", "bits": 4, "group_size": 128},  # sym
    "int3_gptq_g128": {"method": "gptq", "bits": 3, "group_size": 128, "sequential": False},
    "int3_rtn_g128": {"method": "rtn", "bits": 3, "group_size": 128},
    "int4_awq_g128": {"method": "awq", "bits": 4, "group_size": 128},
    "int8_rtn": {"method": "rtn", "bits": 8, "group_size": 0},
    "int4_rtn_g128_asym": {"method": "rtn", "bits": 4, "group_size": 128, "sym": False},
    "int4_gptq_g128_cal64": {"method": "gptq", "bits": 4, "group_size": 128, "samples": 64,
                             "sequential": False},
    # GPTQ, then its scales and norm weights tuned toward the float model on every disjoint
    # 512-token window of wiki.valid, 470 of its 521 once (25 min on 2 cores): the best int4.
    "int4_gptq_g128_tuned": {"method": "gptq", "bits": 4, "group_size": 128, "tune_steps": 470,
                             "tune_norms": True, "sequential": False},
    # The same, two passes over the 521 windows (50 min on 2 cores; no better on test).
    "int4_gptq_g128_tuned_2pass": {"method": "gptq", "bits": 4, "group_size": 128,
                                   "tune_steps": 1042, "tune_norms": True,
                                   "sequential": False},
    # GPTQ stage by stage through each block (each stage's Hessians from the block quantized
    # so far; quantize()'s default), with and without tuning: the best pure int4.
    "int4_gptq_g128_seq": {"method": "gptq", "bits": 4, "group_size": 128, "sequential": True},
    "int4_gptq_g128_seq_tuned": {"method": "gptq", "bits": 4, "group_size": 128,
                                 "sequential": True, "tune_steps": 470, "tune_norms": True},
    # The same at twice and at half the tuning rate: whole split +9.3% and +9.1% word
    # perplexity against +8.7% at 2e-3 (session 9), so the recipe keeps 2e-3.
    "int4_gptq_g128_seq_tuned_lr4e-3": {"method": "gptq", "bits": 4, "group_size": 128,
                                        "sequential": True, "tune_steps": 470,
                                        "tune_norms": True, "tune_lr": 4e-3},
    "int4_gptq_g128_seq_tuned_lr1e-3": {"method": "gptq", "bits": 4, "group_size": 128,
                                        "sequential": True, "tune_steps": 470,
                                        "tune_norms": True, "tune_lr": 1e-3},
    # The recipe with 384 more windows the float model writes itself (each begun with 32
    # tokens of wiki.valid), one pass over all 905: more tuning text than wiki.valid holds.
    "int4_gptq_g128_seq_tuned_gen384": {"method": "gptq", "bits": 4, "group_size": 128,
                                        "sequential": True, "tune_steps": 905,
                                        "tune_norms": True, "tune_generated": 384},
    # Mixed precision (--int8): the MLPs of the first three and last two blocks, where int4
    # costs most, at int8 per channel; every other Linear int4 g128. +6.4 MB.
    "int4_gptq_g128_int8mlp5_tuned": {"method": "gptq", "bits": 4, "group_size": 128,
                                      "sequential": True,
                                      "int8": ["layers.[012].mlp.*", "layers.2[89].mlp.*"],
                                      "tune_steps": 470, "tune_norms": True},
}
SPEED_KEYS = ("decode_tokens_per_s", "fp32_decode_tokens_per_s_same_run",
              "decode_speedup_vs_fp32")



def measure(ref, name: str, settings: dict, a) -> dict:
    ids = ref.encode("The history of the city begins in the year 1200, when")
    t0 = time.perf_counter()
    extra = {"samples": a.samples, "seq_len": a.seq_len} if settings["method"] != "rtn" else {}
    extra = {k: v for k, v in extra.items() if k not in settings}  # a config's own wins
    # A killed run resumes from its finished layers / tuning steps (quantize's checkpoints).
    partial = Path(tempfile.gettempdir()) / f"pocketlm-bench-compress-{name}.partial"
    q = quantize(ref, **settings, **extra, checkpoint_dir=str(partial))
    seconds = time.perf_counter() - t0
    before = q.logits(ids)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.save_dir) / name if a.save_dir else Path(tmp)
        q.save(d)
        size = os.path.getsize(d / "model.safetensors")
        del q
        loaded = pocketlm.load(d, threads=a.threads)
    identical = bool(torch.equal(loaded.logits(ids), before))
    row = {**settings, "quantize_s": seconds, "file_bytes": size,
           "file_ratio_to_fp32": size / (4 * ref.config.n_params),
           "logits_bit_identical_after_load": identical, "kernel": backend()}
    row.update(perplexity(loaded, a))
    if tuned := _tune_settings(loaded):
        row["tune"] = tuned
    row["quantization_config"] = {k: v for k, v in loaded.network.quantization_config.items()
                                  if k != "modules"}
    if a.no_speed:
        return row
    d = decode_ab({"fp32": ref.network, name: loaded.network}, a.decode_tokens, a.rounds)
    row["decode_tokens_per_s"] = 1 / d[name]
    row["fp32_decode_tokens_per_s_same_run"] = 1 / d["fp32"]
    row["decode_speedup_vs_fp32"] = d["fp32"] / d[name]
    return row


def _tune_settings(model) -> dict:
    """The tuning figures a quantize step recorded on the card ({} without tuning)."""
    steps = [st for st in model.card.steps if st["step"] == "quantize"]
    return steps[-1]["settings"].get("tune", {}) if steps else {}


# -- llama.cpp ----------------------------------------------------------------------------------
def page_text(a) -> str:
    from pocketlm.evaluate.perplexity import wikitext_detokenizer, wikitext_pages

    pages = wikitext_pages(TEST.read_text(encoding="utf-8"))[: a.pages]
    return "\n\n".join(wikitext_detokenizer(p) for p in pages)


def llama_cpp(a) -> dict:
    quant, ppl, bench = (PEER_BIN / n for n in ("llama-quantize", "llama-perplexity", "llama-bench"))
    if not (quant.exists() and ppl.exists() and bench.exists()):
        print("llama.cpp not built (bash bench/build_llama_cpp.sh); skipping the peer", file=sys.stderr)
        return {}
    from pocketlm.api import resolve

    src = resolve("smollm2-135m-instruct")
    pages = f"first{a.pages}pages" if a.pages else "allpages"
    text = REPO / ".peer" / f"wikitext2-test-{pages}.txt"
    text.write_text(page_text(a))
    out = {"text_file": str(text), "context": a.context}
    for qtype in a.peer_types.split(","):
        f = src if qtype == "SOURCE_Q4_1" else REPO / ".peer" / f"smollm2-135m-{qtype}.gguf"
        if not f.exists():
            subprocess.run([str(quant), "--allow-requantize", str(src), str(f), qtype],
                           check=True, capture_output=True)
        r = subprocess.run([str(ppl), "-m", str(f), "-f", str(text), "-c", str(a.context),
                            "-t", str(a.threads)], capture_output=True, text=True, check=False)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
        row = {"file_bytes": os.path.getsize(f),
               "token_perplexity": float(m.group(1)) if m else None}
        if not m:  # say why, rather than leave a bare None in the table
            tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
            row["error"] = f"llama-perplexity exit status {r.returncode}: {tail[0][-200:]}"
            print(f"llama.cpp {qtype}: no perplexity ({row['error']})", file=sys.stderr)
        m2 = re.search(r"perplexity over (\d+) chunks, n_ctx=(\d+)", r.stdout + r.stderr)
        if m2:  # llama-perplexity scores the second half of each chunk
            chunks, n_ctx = int(m2.group(1)), int(m2.group(2))
            row["chunks"], row["tokens_scored"] = chunks, chunks * (n_ctx - 1 - n_ctx // 2)
        if qtype != "SOURCE_Q4_1" and not a.no_speed:
            b = subprocess.run([str(bench), "-m", str(f), "-t", str(a.threads), "-p", "0", "-n",
                                str(a.decode_tokens), "-r", str(a.rounds), "-o", "json"],
                               capture_output=True, text=True, check=False)
            try:
                row["decode_tokens_per_s"] = json.loads(b.stdout)[0]["avg_ts"]
            except (json.JSONDecodeError, IndexError, KeyError):
                row["decode_tokens_per_s"] = None
        out[qtype] = row
    return out


def _grid(r: dict) -> str:
    qc = r.get("quantization_config", r)
    if r.get("method") == "rtn" and r.get("bits") == 8:
        return "sym, per channel"
    sym = qc.get("sym", True)
    parts = ["sym" if sym else "asym"]
    if qc.get("act_order"):
        parts.append("act-order")
    if qc.get("sequential"):
        parts.append("sequential")
    if qc.get("int8"):
        parts.append("int8: " + " ".join(qc["int8"]))
    return ", ".join(parts)


def report(fig: dict) -> str:
    ref = fig.get("fp32", {})
    rows = []
    for name, r in fig.items():
        if name in ("fp32", "settings", "llama_cpp") or "word_perplexity" not in r:
            continue
        speed = r.get("decode_tokens_per_s")
        rows.append([name, r["method"], r["bits"], r["group_size"] or "row", _grid(r),
                     f"{r['file_bytes'] / 1e6:.1f} MB ({100 * r['file_ratio_to_fp32']:.1f}%)",
                     r["word_perplexity"],
                     f"{100 * (r['word_perplexity'] / ref['word_perplexity'] - 1):+.1f}%",
                     r["token_perplexity"],
                     f"{100 * (r['token_perplexity'] / ref['token_perplexity'] - 1):+.1f}%",
                     r["tokens_scored"],
                     f"{speed:.1f} vs {r['fp32_decode_tokens_per_s_same_run']:.1f} "
                     f"({r['decode_speedup_vs_fp32']:.2f}x)"
                     + (" *" if r.get("speed_from_earlier_run") else "") if speed else "",
                     "yes" if r["logits_bit_identical_after_load"] else "NO"])
    head = ["config", "method", "bits", "group", "grid", "file (of fp32)", "word ppl",
            "vs fp32", "token ppl", "vs fp32", "tokens", "decode tok/s vs fp32 (speedup)",
            "load bit-identical"]
    table = markdown_table(head, [["fp32", "", 32, "", "", "", ref.get("word_perplexity", math.nan),
                                   "", ref.get("token_perplexity", math.nan), "",
                                   ref.get("tokens_scored", ""), "", ""]] + rows)
    if any(r.get("speed_from_earlier_run") for r in fig.values() if isinstance(r, dict)):
        table += ("\n\n\\* decode speed not re-measured in this run (shared, loaded machine): "
                  f"{fig['settings'].get('speed_from', 'see compress.json')}; measured under "
                  "load, so not a clean figure. A blank: no earlier figure in this format.")
    peer = fig.get("llama_cpp") or {}
    if peer:
        base = peer.get("F16", {}).get("token_perplexity")
        prow = []
        for q in ("SOURCE_Q4_1", "F16", "Q8_0", "Q4_0"):
            if q not in peer:
                continue
            r = peer[q]
            p = r.get("token_perplexity")
            prow.append([q, f"{r.get('file_bytes', 0) / 1e6:.1f} MB", p,
                         f"{100 * (p / base - 1):+.1f}%" if p and base else "",
                         r["chunks"] * (peer["context"] - 1 - peer["context"] // 2)
                         if "chunks" in r else "", r.get("decode_tokens_per_s", "")])
        table += ("\n\nllama.cpp on the same text (`llama-perplexity -c "
                  f"{peer.get('context')}`: its own windows, chunks of the context with the "
                  "second half scored, so compare the change vs its F16, not the absolute "
                  "value):\n\n"
                  + markdown_table(["llama.cpp", "file", "token ppl", "vs F16", "tokens",
                                    "decode tok/s (llama-bench)"], prow))
    return table


def _earlier_date() -> str:
    path = REPO / "bench" / "results" / "compress.json"
    m = json.loads(path.read_text()).get("machine", {}) if path.is_file() else {}
    return f"{m.get('date', '?')} (commit {m.get('commit', '?')})"


KEY = "quantize"  # compress.json key of this run (--key)


def load_results() -> dict:
    return read_results("compress", KEY)


def save_results(figures: dict) -> None:
    """Only our key is ours; "prune" belongs to bench/prune.py."""
    merge_results("compress", KEY, figures)


perplexity = wikitext_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=3,
                    help="WikiText-2 test pages scored (3; 0 = all 62)")
    ap.add_argument("--key", default="quantize",
                    help="compress.json key for this run's figures (quantize)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (32)")
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window tokens (512)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for everything, ours and llama.cpp (1: the machine is shared)")
    ap.add_argument("--only", default="", help="comma-separated configs (default: all)")
    ap.add_argument("--save-dir", default=None,
                    help="keep each quantized model as DIR/CONFIG (default: a temp folder)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-types", default="SOURCE_Q4_1,F16,Q8_0,Q4_0",
                    help="llama.cpp files to score (F16 is the reference of the others)")
    ap.add_argument("--resume", action="store_true", help="keep figures already in compress.json")
    ap.add_argument("--no-section", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--no-speed", action="store_true",
                    help="skip decode timing (loaded machine); keep the earlier run's speed "
                         "figures of the same config, marked as such")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: print the table of compress.json (and append it)")
    a = ap.parse_args()
    a.pages = a.pages or None  # 0: every page
    global KEY
    KEY = a.key
    if a.report_only:
        fig = load_results()
        print(report(fig))
        if not a.no_section:
            section(fig)
        return

    earlier = load_results()
    fig = dict(earlier) if a.resume else {}
    fig["settings"] = {"pages": a.pages, "context": a.context, "stride": a.stride,
                       "calibration_samples": a.samples, "calibration_seq_len": a.seq_len,
                       "decode_tokens": a.decode_tokens, "rounds": a.rounds,
                       "threads": a.threads, "reference": "smollm2-135m-instruct fp32"}
    if a.no_speed:
        fig["settings"]["speed_from"] = (
            "decode figures of the run of "
            f"{_earlier_date()}")
    ref = pocketlm.load("smollm2-135m-instruct", threads=a.threads)
    if "fp32" not in fig:
        fig["fp32"] = {"file_bytes_fp32": 4 * ref.config.n_params, **perplexity(ref, a)}
        save_results(fig)
    if not a.no_peer and "llama_cpp" not in fig:
        fig["llama_cpp"] = llama_cpp(a)
        if a.no_speed:
            for q, r in fig["llama_cpp"].items():
                old = earlier.get("llama_cpp", {}).get(q)
                if isinstance(r, dict) and isinstance(old, dict) and "decode_tokens_per_s" in old:
                    r["decode_tokens_per_s"] = old["decode_tokens_per_s"]
        save_results(fig)
    names = [n for n in (a.only.split(",") if a.only else CONFIGS) if n]
    for name in names:
        if name in fig and a.resume:
            continue
        print(f"== {name}", flush=True)
        fig[name] = measure(ref, name, CONFIGS[name], a)
        if a.no_speed and all(k in earlier.get(name, {}) for k in SPEED_KEYS):
            fig[name].update({k: earlier[name][k] for k in SPEED_KEYS},
                             speed_from_earlier_run=True)
        print(json.dumps(fig[name], indent=1), flush=True)
        save_results(fig)
    print(report(fig))
    if not a.no_section:
        section(fig)


def _pages(settings: dict) -> str:
    return f"first {settings['pages']} pages" if settings["pages"] else "all 62 pages"


def section(fig: dict) -> None:
    s = fig["settings"]
    windows = ("disjoint windows, lm-eval's default" if s["stride"] == s["context"]
               else f"rolling windows, stride {s['stride']}")
    speed = ("decode speed not re-measured (shared machine under load; see the note below "
             "the table)" if s.get("speed_from") else
             f"decode batch 1, {s['decode_tokens']} tokens, {s['rounds']} rounds A B A B vs "
             "fp32, medians")
    append_section(
        "Quantization (bench/compress.py)",
        f"WikiText-2 test, {_pages(s)}, context {s['context']} ({windows}; "
        f"pocketlm.evaluate); calibration {s['calibration_samples']} x "
        f"{s['calibration_seq_len']} tokens of the validation split; {speed}; "
        f"{s['threads']} thread(s). Every quantized model is measured after save + load. "
        "GPTQ runs with quantize()'s defaults (asymmetric grid, activation order with static "
        "groups, damping 0.01, the first token of each calibration window counted L times in "
        "the k_proj/v_proj Hessians; \"sequential\": each block's Linears stage by stage, "
        "--sequential); RTN and AWQ use the symmetric grid.\n\n" + report(fig))


if __name__ == "__main__":
    main()

