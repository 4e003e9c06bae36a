"""The low-bit speed race: our int8/int4 decode against llama.cpp's Q8_0/Q4_0, side by side.

    .venv/bin/python bench/quant_speed.py [--threads 2] [--rounds 5] [--tokens 128]

Each round runs, back to back: our fp32, int8 (RTN per-channel), int4 (g128, asymmetric,
the GPTQ default grid; speed does not depend on how the codes were chosen) and the mixed
int4/int8 model of the compress bench (int4 g128 with the MLPs of blocks 0-2 and 28-29 at int8,
``--int8 MIXED_INT8``) decode at batch 1
(``engine.bench.time_decode``: the engine's own decode step, fused when the kernels build),
then ``llama-bench -n TOKENS -r 1`` on F32, Q8_0 and Q4_0 files requantized from the same GGUF.
Medians over rounds; the ratios come from the same rounds. Writes the ``speed_race`` key of
bench/results/compress.json and a dated section in BENCHMARKS.md. Needs .peer/build
(``bash bench/build_llama_cpp.sh``) for the llama.cpp columns; without it, ours only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, append_section, markdown_table, merge_results

import pocketlm
from pocketlm.compress.quantize import quantize
from pocketlm.engine import fused
from pocketlm.engine.bench import time_decode, weight_bytes

PEER_BIN = REPO / ".peer" / "build" / "bin"
MIXED_INT8 = ["layers.[012].mlp.*", "layers.2[89].mlp.*"]  # compress.py's int8mlp5 config
RACE = [("fp32", "F32"), ("int8", "Q8_0"), ("int4", "Q4_0"), ("mixed", None)]  # ours, peer


def llama_files() -> dict[str, Path]:
    from pocketlm.api import resolve

    quant = PEER_BIN / "llama-quantize"
    if not (quant.exists() and (PEER_BIN / "llama-bench").exists()):
        return {}
    src = resolve("smollm2-135m-instruct")
    out = {}
    for qtype in ["F32", "Q8_0", "Q4_0"]:
        f = REPO / ".peer" / f"smollm2-135m-{qtype}.gguf"
        if not f.exists():
            subprocess.run([str(quant), "--allow-requantize", str(src), str(f), qtype],
                           check=True, capture_output=True)
        out[qtype] = f
    return out


def llama_decode(f: Path, threads: int, tokens: int) -> float | None:
    r = subprocess.run([str(PEER_BIN / "llama-bench"), "-m", str(f), "-t", str(threads), "-p", "0",
                        "-n", str(tokens), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, check=False)
    try:
        return float(json.loads(r.stdout)[0]["avg_ts"])
    except (json.JSONDecodeError, IndexError, KeyError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    fp32 = pocketlm.load("smollm2-135m-instruct", threads=a.threads)
    ours = {"fp32": fp32,
            "int8": quantize(fp32, "rtn", 8, progress=False),
            "int4": quantize(fp32, "rtn", 4, 128, sym=False, progress=False),
            "mixed": quantize(fp32, "rtn", 4, 128, sym=False, int8=MIXED_INT8, progress=False)}
    peers = llama_files()
    runs: dict[str, list] = {k: [] for k in list(ours) + [f"llama.cpp {q}" for q in peers]}
    for m in ours.values():
        time_decode(m.network, new_tokens=8)  # warm-up: kernels built, plans made
    for r in range(a.rounds):
        for k, m in ours.items():
            runs[k].append(1 / time_decode(m.network, new_tokens=a.tokens))
        for q, f in peers.items():
            runs[f"llama.cpp {q}"].append(llama_decode(f, a.threads, a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v[-1]),
              file=sys.stderr)
    med = {k: statistics.median(x for x in v if x) for k, v in runs.items() if any(v)}
    fig = {
        "threads": a.threads, "rounds": a.rounds, "decode_tokens": a.tokens,
        "decode_path": "fused" if fused.plan_for(fp32.network) is not None else "pytorch",
        "all_runs_tokens_per_s": runs,
    }
    for k, m in ours.items():
        fig[f"ours_{k}_decode_tokens_per_s"] = med[k]
        fig[f"ours_{k}_weight_bytes"] = weight_bytes(m.network)
    for ours_k, peer_k in RACE:
        peer = med.get(f"llama.cpp {peer_k}")
        if peer:
            fig[f"llama_cpp_{peer_k}_decode_tokens_per_s"] = peer
            fig[f"ratio_ours_{ours_k}_over_llama_cpp_{peer_k}"] = med[ours_k] / peer
    merge_results("compress", "speed_race", fig)

    rows = []
    for ours_k, peer_k in RACE:
        peer = med.get(f"llama.cpp {peer_k}")
        rows.append([ours_k, f"{fig[f'ours_{ours_k}_weight_bytes'] / 1e6:.0f}", f"{med[ours_k]:.1f}",
                     f"{med[ours_k] / med['fp32']:.2f}x", peer_k or "-",
                     f"{peer:.1f}" if peer else "-", f"{med[ours_k] / peer:.2f}x" if peer else "-"])
    table = markdown_table(["ours", "weights MB", "decode tok/s", "vs our fp32", "llama.cpp",
                            "decode tok/s", "ours / llama.cpp"], rows)
    print(table)
    append_section(
        "Quantized decode speed race: pocketlm vs llama.cpp (bench/quant_speed.py)",
        f"{a.threads} threads, batch 1, {a.tokens} new tokens, medians of {a.rounds} rounds, "
        f"each round ours (fp32, int8 RTN per-channel, int4 g128 asymmetric, mixed = int4 g128 "
        f"with 5 MLPs int8) then llama-bench "
        f"(F32, Q8_0, Q4_0 requantized from the same GGUF). Our decode path: "
        f"{fig['decode_path']}.\n\n{table}\n")


if __name__ == "__main__":
    main()
