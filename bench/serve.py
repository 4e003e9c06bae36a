"""Serving throughput: aggregate decode tokens/s at 1, 4, 8, 16 concurrent streaming clients.

    .venv/bin/python bench/serve.py [--levels 1 4 8 16] [--tokens 64] [--rounds 2] [--peer-requests 4] [--threads N]

Starts ``pocketlm serve``'s app on the real default model on loopback (uvicorn, a free port)
and, per level, sends that many streaming /v1/completions requests at once (distinct prompts,
64 tokens each, greedy, ignore_eos so every request decodes all 64). Aggregate tokens/s =
all completion tokens / wall time from the first request to the last [DONE]. Peer from the
same run: transformers' own ``generate`` on the same weights (saved as a Hugging Face folder),
serving the same requests one after another, as a simple server without batching would.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_section, markdown_table, write_results
from serve_util import ServerThread

PROMPTS = [
    f"Write a short story about a {w} who learns to"
    for w in (
        "cat",
        "robot",
        "farmer",
        "painter",
        "dragon",
        "sailor",
        "teacher",
        "baker",
        "pilot",
        "gardener",
        "miner",
        "poet",
        "child",
        "doctor",
        "musician",
        "fox",
    )
]


async def _one(client: httpx.AsyncClient, prompt: str, tokens: int) -> tuple[int, float]:
    body = {
        "model": "smollm2-135m-instruct",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    n = 0
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage": {' in line:
                import json

                n = json.loads(line[6:])["usage"]["completion_tokens"]
            elif first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    return n, first or 0.0


async def _level(url: str, clients: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(_one(client, PROMPTS[i % len(PROMPTS)], tokens) for i in range(clients))
        )
        wall = time.perf_counter() - t0
    total = sum(n for n, _ in results)
    if total != clients * tokens:
        raise RuntimeError(f"expected {clients * tokens} tokens, got {total}")
    return {"wall_s": wall, "tokens": total, "ttft_s": statistics.median(f for _, f in results)}


def peer_sequential(model, requests: int, tokens: int) -> dict | None:
    """transformers' generate on the same weights, one request after another (no batching)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = [torch.tensor([model.encode(PROMPTS[i % len(PROMPTS)])]) for i in range(requests)]
    with torch.inference_mode():
        hf.generate(ids[0], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        total = 0
        for x in ids:
            out = hf.generate(
                x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
            total += out.shape[1] - x.shape[1]
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="repeat each level; report the median")
    ap.add_argument(
        "--peer-requests",
        type=int,
        default=4,
        help="requests the sequential peer serves (0 = skip the peer)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: $POCKETLM_THREADS or all cores); on a busy machine 1 "
        "avoids OpenMP threads spinning against other jobs",
    )
    a = ap.parse_args()

    import pocketlm
    from pocketlm.serve.app import create_app

    model = pocketlm.load("smollm2-135m-instruct", threads=a.threads)
    threads = __import__("torch").get_num_threads()
    app = create_app(
        {"smollm2-135m-instruct": model},
        max_batch=max(a.levels),
        max_queue=4 * max(a.levels),
        max_len=1024,
    )
    runs: dict[int, list[dict]] = {c: [] for c in a.levels}
    with ServerThread(app) as url:
        asyncio.run(_level(url, 1, 4))  # warm-up
        bar = tqdm(total=a.rounds * len(a.levels), desc="serve bench", unit="level")
        for _ in range(a.rounds):
            for c in a.levels:
                runs[c].append(asyncio.run(_level(url, c, a.tokens)))
                bar.update()
        bar.close()
    rows, figures = [], {}
    for c in a.levels:
        tps = statistics.median(r["tokens"] / r["wall_s"] for r in runs[c])
        ttft = statistics.median(r["ttft_s"] for r in runs[c])
        figures[f"clients_{c}"] = {
            "aggregate_tokens_per_s": round(tps, 2),
            "per_client_tokens_per_s": round(tps / c, 2),
            "median_time_to_first_token_s": round(ttft, 3),
            "rounds_tokens_per_s": [round(r["tokens"] / r["wall_s"], 2) for r in runs[c]],
        }
        rows.append([c, tps, tps / c, ttft])
    base = figures[f"clients_{a.levels[0]}"]["aggregate_tokens_per_s"]
    speedup = {
        f"speedup_{c}_vs_{a.levels[0]}_x": round(
            figures[f"clients_{c}"]["aggregate_tokens_per_s"] / base, 2
        )
        for c in a.levels
    }
    peer = peer_sequential(model, a.peer_requests, a.tokens) if a.peer_requests else None
    peer_tps = peer["tokens"] / peer["wall_s"] if peer else None
    result = {
        "model": "smollm2-135m-instruct",
        "tokens_per_request": a.tokens,
        "threads": threads,
        "max_batch": max(a.levels),
        **figures,
        **speedup,
        "target_speedup_8_vs_1_x": 3.0,
        "peer_transformers_sequential": None
        if not peer
        else {"requests": a.peer_requests, "aggregate_tokens_per_s": round(peer_tps, 2)},
    }
    write_results("serve", result)
    table = markdown_table(
        ["concurrent clients", "aggregate tok/s", "per-client tok/s", "median TTFT s"], rows
    )
    print(table)
    print({k: v for k, v in speedup.items()})
    if peer:
        print(
            f"peer (transformers generate, {a.peer_requests} requests in sequence): "
            f"{peer_tps:.1f} tok/s"
        )
    s8 = speedup.get(f"speedup_8_vs_{a.levels[0]}_x")
    body = (
        f"`bench/serve.py`: the real default model behind `pocketlm serve`'s app on loopback, "
        f"N concurrent streaming `/v1/completions` clients, {a.tokens} tokens each (greedy, "
        f"ignore_eos), {threads} torch threads, median of {a.rounds} rounds. Aggregate = all "
        "completion tokens / wall time from first request to last `[DONE]` (prefill included).\n\n"
        f"{table}\n\n"
        + (f"8 clients vs 1: **{s8}x** (target >= 3x). " if s8 else "")
        + (
            f"Peer from the same run: transformers `generate` on the same weights serving "
            f"{a.peer_requests} requests one after another (what a server without batching "
            f"does): **{peer_tps:.1f} tok/s** aggregate."
            if peer
            else ""
        )
        + "\n\nThe machine is shared (other jobs were running), so absolute figures are noisy; "
        "the ratios come from the same run."
    )
    append_section("Serving throughput (continuous batching)", body)


if __name__ == "__main__":
    main()
