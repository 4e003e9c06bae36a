"""Engine speed: pocketlm vs transformers (and llama.cpp when built), side by side.

    .venv/bin/python bench/engine.py [--threads 2] [--rounds 3] [--new-tokens 128]

Same weights (the default model's GGUF, dequantized to fp32 by each side's own loader), same
thread count, same prompt, greedy. Engines alternate A B A B and medians are reported, since
absolute speed on shared machines drifts 30-40% over hours; ratios within one run hold.

- decode tokens/s: (new tokens - 1) / time from the first new token to the last; both sides
  are timed per token (ours from the engine's stream, transformers' with a streamer).
- prefill tokens/s: one pass over a 512-token prompt into a fresh KV cache; ours also with the
  prompt's GEMMs in bf16 (POCKETLM_BF16_PREFILL=1) where the CPU has bf16 GEMMs.
- decode is also given as a share of the bound set by the read bandwidth measured in the run.
- llama.cpp: `llama-bench -p 512 -n 0` and `-p 0 -n 128` (`-t THREADS`) on F32 and Q8_0/Q4_0 files made by
  `llama-quantize --allow-requantize` (needs .peer/build: `bash bench/build_llama_cpp.sh`; skipped if absent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    SHARED,
    append_section,
    llama_bin,
    markdown_table,
    read_bandwidth_gbps,
    write_results,
)

import pocketlm
from pocketlm import kernels
from pocketlm.api import resolve
from pocketlm.engine.bench import weight_bytes
from pocketlm.engine.generate import prefill
from pocketlm.model.transformer import KVCache


def prompt_ids(model, n: int) -> list[int]:
    text = (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20000]
    ids = model.encode(text)
    assert len(ids) >= n
    return ids[:n]


# -- ours -------------------------------------------------------------------------------------
def ours_decode(model, ids: list[int], new: int, fused: bool = True) -> float:
    """Decode tokens/s; ``fused=False`` forces the op-by-op PyTorch path (POCKETLM_FUSED=0)."""
    os.environ["POCKETLM_FUSED"] = "1" if fused else "0"
    stamps = []
    for _ in model.stream_tokens([ids], max_tokens=new, temperature=0, ignore_eos=True):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


@torch.inference_mode()
def ours_prefill(model, ids: list[int], bf16: bool = False) -> float:
    """Prefill tokens/s; ``bf16`` runs the prompt's GEMMs in bf16 (POCKETLM_BF16_PREFILL=1)."""
    os.environ["POCKETLM_BF16_PREFILL"] = "1" if bf16 else "0"
    cache = KVCache.allocate(model.config, 1, len(ids) + 1)
    t0 = time.perf_counter()
    prefill(model.network, cache, 0, ids)
    return len(ids) / (time.perf_counter() - t0)


# -- transformers -----------------------------------------------------------------------------
class _Stamps:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.times, self.first = [], True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_load():
    import transformers

    path = resolve("smollm2-135m-instruct")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_decode(hf, ids: list[int], new: int) -> float:
    s = _Stamps()
    hf.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                streamer=s, pad_token_id=0)
    return (len(s.times) - 1) / (s.times[-1] - s.times[0])


@torch.inference_mode()
def hf_prefill(hf, ids: list[int]) -> float:
    t0 = time.perf_counter()
    # logits_to_keep=1: the output layer on the last position only, as transformers' generate()
    # does and as our prefill does (computing all 512 x 49k logits would handicap the peer).
    hf(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    return len(ids) / (time.perf_counter() - t0)


# -- llama.cpp ----------------------------------------------------------------------------------
def llama_cpp(threads: int, new: int) -> dict:
    """llama-bench per type: decode from the fastest build, prefill from one whose batched
    passes work (bench/_common.py's finder; the same binary where there is one build)."""
    bench, quant = llama_bin("llama-bench"), llama_bin("llama-quantize")
    batched = llama_bin("llama-bench", batched=True) or bench
    if bench is None or quant is None:
        print("llama.cpp not built (bash bench/build_llama_cpp.sh); skipping the peer", file=sys.stderr)
        return {}
    src = resolve("smollm2-135m-instruct")
    out = {}
    for qtype in ["F32", "F16", "Q8_0", "Q4_0"]:
        f = REPO / ".peer" / f"smollm2-135m-{qtype}.gguf"
        if not f.exists():
            subprocess.run([str(quant), "--allow-requantize", str(src), str(f), qtype],
                           check=True, capture_output=True)
        for kind, binary, p, n in (("decode", bench, 0, new), ("prefill", batched, 512, 0)):
            r = subprocess.run([str(binary), "-m", str(f), "-t", str(threads), "-p", str(p),
                                "-n", str(n), "-r", "3", "-o", "json"],
                               check=False, capture_output=True, text=True)
            try:
                row = json.loads(r.stdout)[0]
            except (json.JSONDecodeError, IndexError):
                print(f"llama-bench {kind} {qtype} gave no figure (exit {r.returncode})",
                      file=sys.stderr)
                continue
            out[f"llama_cpp_{qtype}_{kind}_tokens_per_s"] = row["avg_ts"]
            out[f"llama_cpp_{qtype}_{kind}_build"] = {
                "binary": str(binary), **{k: row.get(k) for k in ("build_commit", "backends")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    ours = pocketlm.load("smollm2-135m-instruct", threads=a.threads, dtype=torch.float32)
    hf = hf_load()
    torch.set_num_threads(a.threads)
    decode_prompt, long_prompt = prompt_ids(ours, 64), prompt_ids(ours, 512)

    bf16 = kernels.cpu_has_bf16()  # bf16 prefill GEMMs only where the CPU has them
    runs = {k: [] for k in ["ours_decode", "hf_decode", "ours_prefill", "hf_prefill",
                            "ours_unfused_decode"] + (["ours_prefill_bf16"] if bf16 else [])}
    ours_decode(ours, decode_prompt, 8)  # warm-up both
    hf_decode(hf, decode_prompt, 8)
    for r in range(a.rounds):  # A B A B
        runs["ours_decode"].append(ours_decode(ours, decode_prompt, a.new_tokens))
        runs["hf_decode"].append(hf_decode(hf, decode_prompt, a.new_tokens))
        runs["ours_prefill"].append(ours_prefill(ours, long_prompt))
        if bf16:
            runs["ours_prefill_bf16"].append(ours_prefill(ours, long_prompt, bf16=True))
        runs["hf_prefill"].append(hf_prefill(hf, long_prompt))
        runs["ours_unfused_decode"].append(ours_decode(ours, decode_prompt, a.new_tokens, fused=False))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    bandwidth = read_bandwidth_gbps()
    weight_gb = weight_bytes(ours.network) / 1e9  # read per decode step (tied matrix once)
    figures = {
        "threads": a.threads,
        "rounds": a.rounds,
        "our_kernel_isa": kernels.isa(),
        "cpu_bf16_gemm": bf16,
        "new_tokens": a.new_tokens,
        "decode_prompt_tokens": len(decode_prompt),
        "prefill_prompt_tokens": len(long_prompt),
        "ours_fp32_decode_tokens_per_s": med["ours_decode"],
        "ours_fp32_unfused_decode_tokens_per_s": med["ours_unfused_decode"],
        "transformers_fp32_decode_tokens_per_s": med["hf_decode"],
        "decode_ratio_ours_over_transformers": med["ours_decode"] / med["hf_decode"],
        "ours_fp32_prefill_tokens_per_s": med["ours_prefill"],
        "transformers_fp32_prefill_tokens_per_s": med["hf_prefill"],
        "prefill_ratio_ours_over_transformers": med["ours_prefill"] / med["hf_prefill"],
        "ours_fp32_decode_effective_gb_per_s": med["ours_decode"] * weight_gb,
        "read_bandwidth_gb_per_s": bandwidth,
        "bandwidth_bound_fp32_decode_tokens_per_s": bandwidth / weight_gb,
        "ours_fp32_decode_share_of_bandwidth_bound": med["ours_decode"] * weight_gb / bandwidth,
        "all_runs": runs,
    }
    if bf16:
        figures["ours_bf16_prefill_tokens_per_s"] = med["ours_prefill_bf16"]
        figures["prefill_ratio_bf16_over_fp32"] = med["ours_prefill_bf16"] / med["ours_prefill"]
    if not a.no_peer:
        figures.update(llama_cpp(a.threads, a.new_tokens))
    write_results("engine", figures)

    rows = [
        ["pocketlm fp32", f"{med['ours_decode']:.1f}", f"{med['ours_prefill']:.0f}"],
        ["pocketlm fp32, op by op (POCKETLM_FUSED=0)", f"{med['ours_unfused_decode']:.1f}", ""],
        *([["pocketlm, bf16 prefill GEMMs (POCKETLM_BF16_PREFILL=1)", "",
            f"{med['ours_prefill_bf16']:.0f}"]] if bf16 else []),
        ["transformers fp32", f"{med['hf_decode']:.1f}", f"{med['hf_prefill']:.0f}"],
        ["ratio (ours / transformers)", f"{figures['decode_ratio_ours_over_transformers']:.2f}x",
         f"{figures['prefill_ratio_ours_over_transformers']:.2f}x"],
    ]
    for q in ["F32", "F16", "Q8_0", "Q4_0"]:
        if f"llama_cpp_{q}_decode_tokens_per_s" in figures:
            pre = figures.get(f"llama_cpp_{q}_prefill_tokens_per_s")
            rows.append([f"llama.cpp {q}", f"{figures[f'llama_cpp_{q}_decode_tokens_per_s']:.1f}",
                         f"{pre:.0f}" if pre else "failed"])
    rows.append([f"fp32 bandwidth bound ({bandwidth:.0f} GB/s read, measured)", f"{figures['bandwidth_bound_fp32_decode_tokens_per_s']:.1f}", ""])
    table = markdown_table(["engine", "decode tokens/s (batch 1)", "prefill tokens/s (512)"], rows)
    print(table)
    append_section(
        "engine: pocketlm vs transformers (fp32, SmolLM2-135M-Instruct)",
        f"`bench/engine.py`: {a.threads} threads, greedy, {a.new_tokens} new tokens after a "
        f"{len(decode_prompt)}-token prompt; prefill of {len(long_prompt)} tokens; medians of "
        f"{a.rounds} alternating rounds. Our kernels: {kernels.isa()} build; read bandwidth "
        f"{bandwidth:.1f} GB/s measured after the rounds; fp32 decode at "
        f"{figures['ours_fp32_decode_share_of_bandwidth_bound']:.0%} of its bound.\n\n{table}\n",
    )


if __name__ == "__main__":
    main()
