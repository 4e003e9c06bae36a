"""bf16 prefill GEMMs on packed weights: speed and WikiText-2 perplexity against fp32 (issue #20).

    .venv/bin/python bench/bf16_prefill.py [--models smollm2-135m-instruct ...] [--rounds 3]
        [--threads 2] [--chunks 2]

Each model is loaded as it ships (its GGUF file, packed), and SmolLM2 also as our own int4 g128
and int8 RTN codes (``NAME+rtn4``, ``NAME+rtn8``: QLinear); products of more than 8 rows
dequantize a tile of weight rows and multiply it either in fp32 or, with
``POCKETLM_BF16_PREFILL=1``, with the tile and the activations rounded to bf16 (oneDNN, fp32
accumulation, the product rounded to bf16 and handed on as fp32). The switch is read on every product, so both settings run in one
process on the same weights:

- prefill 512 tokens/s: ``engine.generate.prefill`` of the first 512 WikiText-2 test tokens
  into a fresh KV cache, fp32 and bf16 alternating A B A B for ``--rounds`` rounds after one
  untimed warm-up each; medians. The dequantization is inside the timing (it runs every call);
- perplexity: ``--chunks`` windows of 512 tokens of the test split (pages detokenized as the
  evaluator does, joined by blank lines; BOS first where the tokenizer adds one), each one
  full-sequence forward (every product has 512 rows, so the bf16 path runs throughout,
  output layer included), every token after a window's first scored; the same tokens for both.

Prints a table and writes bench/results/bf16_prefill.json. The bar: |delta ppl| < 0.3%.
Needs a CPU with bf16 GEMMs (AVX512-BF16 or AMX); elsewhere the switch stays off and the
script says so.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, markdown_table, write_results

import pocketlm
from pocketlm import kernels
from pocketlm.engine.generate import prefill
from pocketlm.model.transformer import KVCache

MODELS = ["smollm2-135m-instruct", "smollm2-135m-instruct+rtn4", "smollm2-135m-instruct+rtn8",
          "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
PROMPT = 512
BAR = 0.3  # percent


def set_bf16(on: bool) -> None:
    os.environ["POCKETLM_BF16_PREFILL"] = "1" if on else "0"


def wikitext_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the WikiText-2 test split, as the evaluator reads it."""
    from pocketlm.evaluate.perplexity import wikitext_detokenizer, wikitext_pages

    pages, text, ids = wikitext_pages(TEST.read_text(encoding="utf-8")), "", []
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    for page in pages:
        text += ("\n\n" if text else "") + wikitext_detokenizer(page)
        ids = bos + tokenizer.encode(text)
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the test split has fewer than {n} tokens")


@torch.inference_mode()
def prefill_tps(net, ids: list[int]) -> float:
    cache = KVCache.allocate(net.config, 1, len(ids) + 1)
    t0 = time.perf_counter()
    prefill(net, cache, 0, ids)
    return len(ids) / (time.perf_counter() - t0)


@torch.inference_mode()
def perplexity(net, windows: list[list[int]]) -> float:
    """exp(mean NLL) over every token after each window's first, one forward a window."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = net(torch.tensor([ids]))[0].float()  # (T, V)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(ids[1:])
        nll -= float(logp.gather(1, target[:, None]).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def load(name: str, threads: int):
    """A pulled model as it ships (GGUF, packed), or ``NAME+rtnB`` for our own B-bit RTN codes
    (QLinear: g128 for 4 bits, per channel for 8) made from its fp32 dequantization."""
    name, _, ours = name.partition("+rtn")
    if not ours:
        return pocketlm.load(name, threads=threads)
    from pocketlm.compress.quantize import quantize

    dense = pocketlm.load(name, dtype=torch.float32, threads=threads)
    return quantize(dense, "rtn", int(ours), progress=False)


def measure(name: str, rounds: int, chunks: int, threads: int) -> dict:
    model = load(name, threads)
    net = model.network
    ids = wikitext_ids(model.tokenizer, PROMPT * chunks)
    windows = [ids[i * PROMPT:(i + 1) * PROMPT] for i in range(chunks)]
    ppl = {}
    for on in (False, True):
        set_bf16(on)
        ppl[on] = perplexity(net, windows)
    speeds: dict[bool, list[float]] = {False: [], True: []}
    for on in (False, True):  # warm-up: page in the file, build the kernels' threads
        set_bf16(on)
        prefill_tps(net, windows[0])
    for _ in range(rounds):
        for on in (False, True):
            set_bf16(on)
            speeds[on].append(prefill_tps(net, windows[0]))
    os.environ.pop("POCKETLM_BF16_PREFILL", None)
    fp32, bf16 = (statistics.median(speeds[k]) for k in (False, True))
    delta = 100 * (ppl[True] - ppl[False]) / ppl[False]
    return {
        "model": name,
        "prefill_fp32_tokens_per_s": round(fp32, 1),
        "prefill_bf16_tokens_per_s": round(bf16, 1),
        "speedup": round(bf16 / fp32, 3),
        "rounds_fp32_tokens_per_s": [round(s, 1) for s in speeds[False]],
        "rounds_bf16_tokens_per_s": [round(s, 1) for s in speeds[True]],
        "ppl_fp32": round(ppl[False], 4),
        "ppl_bf16": round(ppl[True], 4),
        "ppl_delta_pct": round(delta, 3),
        "within_bar": abs(delta) < BAR,
        "tokens_scored": chunks * (PROMPT - 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=2)
    args = ap.parse_args()
    if not kernels.cpu_has_bf16():
        raise SystemExit("this CPU has no bf16 GEMMs (AVX512-BF16 or AMX): nothing to compare")
    rows = []
    for name in args.models:
        rows.append(measure(name, args.rounds, args.chunks, args.threads))
        print(rows[-1], flush=True)
    table = markdown_table(
        ["model", "prefill 512 fp32 tok/s", "bf16 tok/s", "bf16/fp32", "ppl fp32", "ppl bf16",
         "delta ppl %"],
        [[r["model"], r["prefill_fp32_tokens_per_s"], r["prefill_bf16_tokens_per_s"],
          f'{r["speedup"]:.2f}x', r["ppl_fp32"], r["ppl_bf16"], f'{r["ppl_delta_pct"]:+.3f}']
         for r in rows])
    print(table)
    cpu = "AMX" if kernels.cpu_has_amx() else "AVX512-BF16"
    path = write_results("bf16_prefill", {
        "protocol": (f"{args.threads} threads, prefill {PROMPT} tokens, fp32/bf16 alternating "
                     f"A B, {args.rounds} rounds after a warm-up, medians; perplexity over "
                     f"{args.chunks} windows of {PROMPT} WikiText-2 test tokens, full forward"),
        "bf16_gemm": cpu, "bar_pct": BAR, "models": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
