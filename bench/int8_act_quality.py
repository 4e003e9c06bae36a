"""What int8 activations cost in quality on the real GGUF models (issue #20's bar).

    .venv/bin/python bench/int8_act_quality.py [--models smollm2-135m-instruct ...] [--tokens 1024]

For each model, the same packed weights with fp32 activations and with int8 ones
(``pocketlm_ggml_set_int8_act``), both through the decode path, the only one the int8 products
run on (a prefill of more than 8 rows dequantizes and runs an fp32 GEMM):

- WikiText-2 perplexity: the first ``--tokens`` tokens of the test split (pages detokenized as
  the evaluator does, joined by blank lines; the tokenizer's BOS first where it adds one), one
  window, fed 8 tokens a step through the fused decode plan (``fused.verify``) over one KV
  cache; every token after the first is scored; the same tokens for both settings;
- greedy continuations: tests/test_ggml.py's 12 prompts, 32 tokens each (the engine's
  ``prefill`` + ``decode_step``), counted identical or not.

Prints a table and writes bench/results/int8_act_quality.json. The bar: |delta ppl| < 0.3% and
most continuations identical.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, write_results

MODELS = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
          "qwen2.5-coder-1.5b-instruct"]
TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
PROMPTS = [  # tests/test_ggml.py's PROMPTS
    "def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time",
    "SELECT name FROM users WHERE", "Water boils at", "class Stack:\n    def __init__(self):",
    "The three primary colours are", "for i in range(10):", "Machine learning is",
    "#include <stdio.h>\nint main() {", "A haiku about autumn:\n",
]
BAR = 0.3  # percent


def set_int8(on: int) -> int:
    """Forces int8 (1) or fp32 (0) activations; -1 only asks. Returns the setting before."""
    from pocketlm.model import ggml

    lib = ggml._lib()
    if lib is None:
        raise SystemExit("the compiled kernels are unavailable: nothing to measure")
    lib.pocketlm_ggml_set_int8_act.argtypes = [ctypes.c_int]
    return int(lib.pocketlm_ggml_set_int8_act(on))


def wikitext_ids(tokenizer, n: int) -> list[int]:
    from pocketlm.evaluate.perplexity import wikitext_detokenizer, wikitext_pages

    pages, text, ids = wikitext_pages(TEST.read_text(encoding="utf-8")), "", []
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    for page in pages:  # enough pages for n tokens
        text += ("\n\n" if text else "") + wikitext_detokenizer(page)
        ids = bos + tokenizer.encode(text)
        if len(ids) > n:
            break
    return ids[: n + 1]


@torch.inference_mode()
def decode_nll(net, ids: list[int]) -> list[float]:
    """-log p(ids[i + 1] | ids[:i + 1]) for every i, 8 tokens a fused decode pass."""
    from pocketlm.engine import fused
    from pocketlm.model.transformer import KVCache

    cache = KVCache.allocate(net.config, 1, len(ids) + 1, torch.float32)
    out = []
    for s in range(0, len(ids) - 1, fused.MAX_ROWS):
        chunk = ids[s: min(s + fused.MAX_ROWS, len(ids) - 1)]
        logits = fused.verify(net, cache, 0, chunk, s)
        if logits is None:
            raise SystemExit("the fused decode plan does not cover this model")
        lp = torch.log_softmax(logits.double(), -1)
        target = torch.tensor(ids[s + 1: s + 1 + len(chunk)])
        out += (-lp[torch.arange(len(chunk)), target]).tolist()
    return out


@torch.inference_mode()
def greedy(net, ids: list[int], n: int) -> list[int]:
    from pocketlm.engine.generate import decode_step, prefill
    from pocketlm.model.transformer import KVCache

    cache = KVCache.allocate(net.config, 1, len(ids) + n + 1, torch.float32)
    out = [int(prefill(net, cache, 0, ids).argmax())]
    for i in range(n - 1):
        logits = decode_step(net, cache, torch.tensor(out[-1:]), torch.tensor([len(ids) + i]))
        out.append(int(logits[0].argmax()))
    return out


def measure(name: str, tokens: int, new_tokens: int) -> dict:
    import pocketlm

    model = pocketlm.load(name)
    net, tok = model.network, model.tokenizer
    ids = wikitext_ids(tok, tokens)
    prompts = [tok.encode(p) for p in PROMPTS]
    row: dict = {"model": name, "scored_tokens": len(ids) - 1}
    conts = {}
    for setting, on in (("fp32", 0), ("int8", 1)):
        set_int8(on)
        t0 = time.perf_counter()
        nll = decode_nll(net, ids)
        row[f"ppl_{setting}"] = math.exp(sum(nll) / len(nll))
        conts[setting] = [greedy(net, p, new_tokens) for p in prompts]
        row[f"seconds_{setting}"] = round(time.perf_counter() - t0, 1)
    row["delta_pct"] = 100 * (row["ppl_int8"] / row["ppl_fp32"] - 1)
    row["identical"] = sum(a == b for a, b in zip(conts["fp32"], conts["int8"]))
    row["prompts"] = len(prompts)
    row["meets_bar"] = abs(row["delta_pct"]) < BAR and 2 * row["identical"] > len(prompts)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--tokens", type=int, default=1024, help="WikiText-2 tokens scored")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    a = ap.parse_args()
    before = set_int8(-1)
    rows = []
    try:
        for name in a.models:
            rows.append(measure(name, a.tokens, a.new_tokens))
            r = rows[-1]
            print(f"{name}: ppl fp32 {r['ppl_fp32']:.4f} int8 {r['ppl_int8']:.4f} "
                  f"({r['delta_pct']:+.2f}%), identical {r['identical']}/{r['prompts']}",
                  flush=True)
    finally:
        set_int8(before)
    print(f"\n| model | tokens | ppl fp32 act | ppl int8 act | delta | identical greedy | "
          f"< {BAR}% and most identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['scored_tokens']} | {r['ppl_fp32']:.4f} | {r['ppl_int8']:.4f} "
              f"| {r['delta_pct']:+.2f}% | {r['identical']}/{r['prompts']} | "
              f"{'yes' if r['meets_bar'] else 'no'} |")
    path = write_results("int8_act_quality", {
        "protocol": {"text": "wiki.test.raw, pages detokenized, joined by blank lines",
                     "tokens": a.tokens, "feed": "fused decode plan, 8 tokens a pass, one window",
                     "greedy": f"{len(PROMPTS)} prompts x {a.new_tokens} tokens"},
        "bar_pct": BAR, "models": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
