"""Our int4 decode with the kernels built for VNNI against the same kernels built without it.

    .venv/bin/python bench/kernel_isa.py [--threads 2] [--rounds 5] [--tokens 128]

Where the CPU has AVX512-VNNI (with VL) or AVX-VNNI, the int4/int3 dot products are one
``vpdpbusd`` each instead of ``maddubs`` + ``madd`` (``pocketlm/kernels/kernels.h``,
``dot_u8s8``). Each round runs one process per build, alternating (VNNI, then
``POCKETLM_NO_VNNI=1``), each timing batch-1 decode of SmolLM2-135M int4 g128 (RTN, asymmetric:
the GPTQ grid; speed does not depend on how the codes were chosen) and, as a control, int8
(whose kernel has no integer dot product, so the two builds should tie). Medians over rounds.
Writes the ``kernel_isa`` key of bench/results/compress.json and a dated section in
BENCHMARKS.md. On a CPU without VNNI both builds are the same and the script says so.
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
import json, sys, torch
import pocketlm
from pocketlm.compress.qlinear import backend
from pocketlm.compress.quantize import quantize
from pocketlm.engine.bench import time_decode
threads, tokens = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
fp32 = pocketlm.load("smollm2-135m-instruct", threads=threads)
out = {"backend": backend()}
for name, q in (("int4", quantize(fp32, "rtn", 4, 128, sym=False, progress=False)),
                ("int8", quantize(fp32, "rtn", 8, progress=False))):
    time_decode(q.network, new_tokens=8)  # warm-up
    out[name] = 1 / time_decode(q.network, new_tokens=tokens)
print(json.dumps(out))
"""


def run_child(no_vnni: bool, threads: int, tokens: int) -> dict:
    env = {**os.environ, **({"POCKETLM_NO_VNNI": "1"} if no_vnni else {})}
    r = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(tokens)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"decode run failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    from pocketlm.kernels import isa

    if isa() == "avx2":
        print("this CPU has no VNNI: both builds are the AVX2 one; nothing to compare")
        return
    runs: dict[str, list] = {f"{b}_{m}": [] for b in ("vnni", "avx2") for m in ("int4", "int8")}
    for r in range(a.rounds):
        for build, no_vnni in (("vnni", False), ("avx2", True)):
            out = run_child(no_vnni, a.threads, a.tokens)
            want = "avx2" if no_vnni else "avx2+vnni"
            if out["backend"] != want:
                sys.exit(f"expected the {want} build, got {out['backend']}")
            for m in ("int4", "int8"):
                runs[f"{build}_{m}"].append(out[m])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    fig = {"threads": a.threads, "rounds": a.rounds, "decode_tokens": a.tokens,
           "all_runs_tokens_per_s": runs}
    for m in ("int4", "int8"):
        fig[f"vnni_{m}_decode_tokens_per_s"] = med[f"vnni_{m}"]
        fig[f"avx2_{m}_decode_tokens_per_s"] = med[f"avx2_{m}"]
        fig[f"ratio_{m}_vnni_over_avx2"] = med[f"vnni_{m}"] / med[f"avx2_{m}"]
    merge_results("compress", "kernel_isa", fig)
    table = markdown_table(
        ["model", "VNNI build tok/s", "AVX2 build tok/s", "VNNI / AVX2"],
        [[m, med[f"vnni_{m}"], med[f"avx2_{m}"], med[f"vnni_{m}"] / med[f"avx2_{m}"]]
         for m in ("int4", "int8")])
    print(table)
    append_section("int4 decode: kernels built with VNNI vs without (bench/kernel_isa.py)", f"""
{a.threads} thread(s), batch 1, {a.tokens} new tokens; {a.rounds} rounds, each a process per
build, alternating; medians. int8's kernel has no integer dot product: the control.

{table}
""")


if __name__ == "__main__":
    main()
