"""The low-bit speed race: our int8/int4 decode and prefill against llama.cpp's Q8_0/Q4_0.

    .venv/bin/python bench/quant_speed.py [--threads 2] [--rounds 5] [--tokens 128] [--prompt 512]

Each round runs, back to back (A B A B): the machine's read bandwidth (``engine.py``'s
``read_bandwidth_gbps``); our fp32, int8 (RTN per-channel; fp32 activations, then int8
activations with ``POCKETLM_INT8_ACT=1``), int4 (g128 asymmetric, the GPTQ grid; speed does not
depend on how the codes were chosen) and mixed (int4 g128 with the MLPs of blocks 0-2 and 28-29
at int8) decode at batch 1 (``engine.bench.time_decode``: the engine's own step, fused when the
kernels build); then ``llama-bench -p 0 -n TOKENS -r 1`` on F32, Q8_0 and Q4_0 files
requantized from the same GGUF; then prefill of a PROMPT-token prompt, ours in fp32 and (where
the CPU has bf16 GEMMs) bf16 (``POCKETLM_BF16_PREFILL``), llama.cpp's ``-p PROMPT -n 0``.
Medians over rounds; ratios from the same rounds. Every decode figure is also given as a share
of the bandwidth bound measured in the same run: bound = bandwidth / bytes a token reads (our
weight bytes, tied matrices once; llama.cpp's GGUF file size). The CPU, our kernel build
(``kernels.isa()``) and llama.cpp's build go with the figures. Writes the ``speed_race`` key of
bench/results/compress.json and a dated section in BENCHMARKS.md. Needs llama.cpp built
(``bash bench/build_llama_cpp.sh``) for the peer columns; without it, ours only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    append_section,
    llama_bin,
    machine,
    markdown_table,
    merge_results,
    read_bandwidth_gbps,
)

import pocketlm
from pocketlm import kernels
from pocketlm.compress.quantize import quantize
from pocketlm.engine import fused
from pocketlm.engine.bench import time_decode, time_prefill, weight_bytes

MIXED_INT8 = ["layers.[012].mlp.*", "layers.2[89].mlp.*"]  # compress.py's int8mlp5 config
# (ours, environment for it, the llama.cpp type it races)
RACE = [("fp32", {}, "F32"), ("int8", {}, "Q8_0"), ("int8 q8act", {"POCKETLM_INT8_ACT": "1"}, "Q8_0"),
        ("int4", {}, "Q4_0"), ("mixed", {}, None)]
PREFILL = [("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0")]


def llama_files(model: str) -> dict[str, Path]:
    from pocketlm.api import resolve

    quant = llama_bin("llama-quantize")
    if quant is None or llama_bin("llama-bench") is None:
        return {}
    src = resolve(model)
    out = {}
    for qtype in ["F32", "Q8_0", "Q4_0"]:
        f = REPO / ".peer" / f"{model}-{qtype}.gguf"
        if not f.exists():
            subprocess.run([str(quant), "--allow-requantize", str(src), str(f), qtype],
                           check=True, capture_output=True)
        out[qtype] = f
    return out


def llama_bench(f: Path, threads: int, prompt: int, tokens: int) -> dict | None:
    """One llama-bench row (-p PROMPT -n TOKENS, one of them 0): tokens/s and its build."""
    binary = llama_bin("llama-bench", batched=prompt > 0)
    r = subprocess.run([str(binary), "-m", str(f), "-t", str(threads), "-p", str(prompt),
                        "-n", str(tokens), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, check=False)
    try:
        row = json.loads(r.stdout)[0]
        return {"tokens_per_s": float(row["avg_ts"]), "binary": str(binary),
                "build": {k: row.get(k) for k in ("build_commit", "cpu_info", "backends")}}
    except (json.JSONDecodeError, IndexError, KeyError, ValueError, TypeError):
        return None


def with_env(env: dict, fn):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt length (512)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--check", action="store_true", help="print the tables, save nothing")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    fp32 = pocketlm.load(a.model, threads=a.threads, dtype=torch.float32)
    nets = {"fp32": fp32.network,
            "int8": quantize(fp32, "rtn", 8, progress=False).network,
            "int4": quantize(fp32, "rtn", 4, 128, sym=False, progress=False).network,
            "mixed": quantize(fp32, "rtn", 4, 128, sym=False, int8=MIXED_INT8,
                              progress=False).network}
    net_of = {k: nets[k.split()[0]] for k, _, _ in RACE}
    env_of = {k: e for k, e, _ in RACE}
    bf16 = kernels.cpu_has_bf16()
    prefill_modes = [("fp32", {"POCKETLM_BF16_PREFILL": "0"})] + (
        [("bf16", {"POCKETLM_BF16_PREFILL": "1"})] if bf16 else [])
    peers = {} if a.no_peer else llama_files(a.model)
    runs: dict[str, list] = {"bandwidth_gb_per_s": []}
    runs.update({f"decode {k}": [] for k in net_of})
    runs.update({f"decode llama.cpp {q}": [] for q in peers})
    runs.update({f"prefill {k} {m}": [] for k, _ in PREFILL for m, _ in prefill_modes})
    runs.update({f"prefill llama.cpp {q}": [] for q in peers})
    builds: dict[str, dict] = {}
    for k, net in net_of.items():  # warm-up: kernels built, plans made
        with_env(env_of[k], lambda net=net: time_decode(net, new_tokens=8))
    for r in range(a.rounds):
        runs["bandwidth_gb_per_s"].append(read_bandwidth_gbps())
        for k, net in net_of.items():
            s = with_env(env_of[k], lambda net=net: time_decode(net, new_tokens=a.tokens))
            runs[f"decode {k}"].append(1 / s)
        for q, f in peers.items():
            row = llama_bench(f, a.threads, 0, a.tokens)
            runs[f"decode llama.cpp {q}"].append(row and row["tokens_per_s"])
            if row:
                builds[f"decode {q}"] = {"binary": row["binary"], **row["build"]}
        for k, _ in PREFILL:
            for m, env in prefill_modes:
                s = with_env(env, lambda k=k: time_prefill(nets[k], a.prompt, repeats=1))
                runs[f"prefill {k} {m}"].append(a.prompt / s)
        for q, f in peers.items():
            row = llama_bench(f, a.threads, a.prompt, 0)
            runs[f"prefill llama.cpp {q}"].append(row and row["tokens_per_s"])
            if row:
                builds[f"prefill {q}"] = {"binary": row["binary"], **row["build"]}
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v[-1]),
              file=sys.stderr)

    med = {k: statistics.median(x for x in v if x) for k, v in runs.items() if any(v)}
    bw = med["bandwidth_gb_per_s"] * 1e9
    nbytes = {k: weight_bytes(net_of[k]) for k in net_of}
    nbytes.update({f"llama.cpp {q}": f.stat().st_size for q, f in peers.items()})
    fig = {
        "model": a.model, "threads": a.threads, "rounds": a.rounds, "decode_tokens": a.tokens,
        "prefill_tokens": a.prompt, "cpu": machine()["cpu"], "our_kernel_isa": kernels.isa(),
        "cpu_bf16_gemm": bf16, "llama_cpp_builds": builds,
        "decode_path": "fused" if fused.plan_for(fp32.network) is not None else "pytorch",
        "read_bandwidth_gb_per_s": med["bandwidth_gb_per_s"],
        "bytes_read_per_token": nbytes, "all_runs_tokens_per_s": runs,
    }
    rows = []
    for k, _, q in RACE:
        ours = med[f"decode {k}"]
        peer = med.get(f"decode llama.cpp {q}")
        ours_share = ours * nbytes[k] / bw
        fig[f"ours_{k.replace(' ', '_')}_decode_tokens_per_s"] = ours
        fig[f"ours_{k.replace(' ', '_')}_share_of_bandwidth_bound"] = ours_share
        row = [k, f"{nbytes[k] / 1e6:.0f}", f"{ours:.1f}", f"{ours_share:.0%}", q or "-"]
        if peer:
            share = peer * nbytes[f"llama.cpp {q}"] / bw
            fig[f"llama_cpp_{q}_decode_tokens_per_s"] = peer
            fig[f"llama_cpp_{q}_share_of_bandwidth_bound"] = share
            fig[f"ratio_ours_{k.replace(' ', '_')}_over_llama_cpp_{q}"] = ours / peer
            row += [f"{peer:.1f}", f"{share:.0%}", f"{ours / peer:.2f}x"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    decode_table = markdown_table(["ours", "weights MB", "decode tok/s", "of bound", "llama.cpp",
                                   "decode tok/s", "of bound", "ours / llama.cpp"], rows)
    rows = []
    for k, q in PREFILL:
        peer = med.get(f"prefill llama.cpp {q}")
        for m, _ in prefill_modes:
            ours = med[f"prefill {k} {m}"]
            fig[f"ours_{k}_prefill_{m}_tokens_per_s"] = ours
            if peer:
                fig[f"ratio_ours_{k}_prefill_{m}_over_llama_cpp_{q}"] = ours / peer
            rows.append([f"{k} ({m} GEMMs)", f"{ours:.0f}", q, f"{peer:.0f}" if peer else "-",
                         f"{ours / peer:.2f}x" if peer else "-"])
        if peer:
            fig[f"llama_cpp_{q}_prefill_tokens_per_s"] = peer
    prefill_table = markdown_table([f"ours, prefill {a.prompt}", "tok/s", "llama.cpp", "tok/s",
                                    "ours / llama.cpp"], rows)
    print(decode_table + "\n\n" + prefill_table)
    if a.check:
        return
    merge_results("compress", "speed_race", fig)
    peer_build = "; ".join(f"{k}: {v.get('binary')} ({v.get('backends')}, "
                           f"{v.get('build_commit')})" for k, v in builds.items()) or "not built"
    append_section(
        "Quantized speed race: pocketlm vs llama.cpp, decode and prefill (bench/quant_speed.py)",
        f"{a.model}, {a.threads} threads; decode batch 1, {a.tokens} new tokens; prefill "
        f"{a.prompt} tokens; medians of {a.rounds} rounds, A B A B. Our kernels: "
        f"{kernels.isa()} build, decode path {fig['decode_path']}; int8 q8act = int8 weights "
        f"with activations rounded to int8 (POCKETLM_INT8_ACT=1). Read bandwidth measured each "
        f"round: {med['bandwidth_gb_per_s']:.1f} GB/s (median); 'of bound' = tok/s x bytes a "
        f"token reads / bandwidth. llama.cpp: {peer_build}.\n\n{decode_table}\n\n"
        f"{prefill_table}\n")


if __name__ == "__main__":
    main()
