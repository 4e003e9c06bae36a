"""Our quantized decode in each kernel build this CPU runs, side by side.

    .venv/bin/python bench/kernel_isa.py [--threads 2] [--rounds 5] [--tokens 128]

The kernels are built per instruction set (``POCKETLM_ISA``, ``pocketlm/kernels``): ``avx2``
(integer dot products through maddubs + madd), ``avx2+vnni`` (one ``vpdpbusd`` per block on
256-bit vectors) and ``avx512`` (one ``vpdpbusd`` per pair of blocks on 512-bit vectors). All
three give the same numbers bit for bit (tests/test_kernels_isa.py); this measures what each
costs. Each round runs one process per build, alternating, each timing batch-1 decode of
SmolLM2-135M int4 g128 (RTN, asymmetric: the GPTQ grid; speed does not depend on how the codes
were chosen), int8 with fp32 activations and int8 with int8 activations
(``POCKETLM_INT8_ACT=1``). Medians over rounds. Writes the ``kernel_isa`` key of
bench/results/compress.json and a dated section in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_section, markdown_table, merge_results

CHILD = """
import json, os, sys, torch
import pocketlm
from pocketlm.compress.qlinear import backend
from pocketlm.compress.quantize import quantize
from pocketlm.engine.bench import time_decode
threads, tokens = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
fp32 = pocketlm.load("smollm2-135m-instruct", threads=threads, dtype=torch.float32)
out = {"backend": backend()}
int8 = quantize(fp32, "rtn", 8, progress=False)
for name, q, act in (("int4", quantize(fp32, "rtn", 4, 128, sym=False, progress=False), "0"),
                     ("int8", int8, "0"), ("int8_q8act", int8, "1")):
    os.environ["POCKETLM_INT8_ACT"] = act
    time_decode(q.network, new_tokens=8)  # warm-up
    out[name] = 1 / time_decode(q.network, new_tokens=tokens)
print(json.dumps(out))
"""
MODELS = ("int4", "int8", "int8_q8act")


def run_child(isa: str, threads: int, tokens: int) -> dict:
    env = {**os.environ, "POCKETLM_ISA": isa}
    env.pop("POCKETLM_NO_VNNI", None)
    r = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tokens)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"decode run failed:\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["backend"] != isa:
        sys.exit(f"expected the {isa} build, got {out['backend']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    from pocketlm.kernels import supported_isas

    isas = supported_isas()
    if len(isas) < 2:
        print(f"this CPU runs one build only ({isas}); nothing to compare")
        return
    runs: dict[str, list] = {f"{b} {m}": [] for b in isas for m in MODELS}
    for r in range(a.rounds):
        for isa in isas:
            out = run_child(isa, a.threads, a.tokens)
            for m in MODELS:
                runs[f"{isa} {m}"].append(out[m])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    fig = {"threads": a.threads, "rounds": a.rounds, "decode_tokens": a.tokens, "isas": isas,
           "all_runs_tokens_per_s": runs}
    for k, v in med.items():
        fig[f"{k.replace(' ', '_').replace('+', '_')}_decode_tokens_per_s"] = v
    merge_results("compress", "kernel_isa", fig)
    table = markdown_table(["model"] + [f"{b} tok/s" for b in isas] + [f"{isas[-1]} / avx2"],
                           [[m] + [med[f"{b} {m}"] for b in isas]
                            + [med[f"{isas[-1]} {m}"] / med[f"avx2 {m}"]] for m in MODELS])
    print(table)
    append_section("Quantized decode in each kernel build (bench/kernel_isa.py)", f"""
{a.threads} thread(s), batch 1, {a.tokens} new tokens; {a.rounds} rounds, each a process per
build, alternating; medians. int8_q8act: int8 weights with activations rounded to int8
(POCKETLM_INT8_ACT=1).

{table}
""")


if __name__ == "__main__":
    main()
