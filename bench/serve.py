"""Serving under load: pocketlm serve against llama.cpp's llama-server on the same GGUF file.

    .venv/bin/python bench/serve.py [--model smollm2-135m-instruct] [--levels 1 4 8 16]
        [--tokens 64] [--rounds 3] [--threads 2] [--context 512]
    .venv/bin/python bench/serve.py --levels 1 2 --tokens 8 --rounds 1 --no-write   # plumbing

Per level N (concurrent clients), two servers run as child processes on loopback, both from
the model's stored GGUF file (ours loads it packed, ``--dtype auto``):

- ours: ``python -m pocketlm.cli serve FILE --max-batch N --context C --threads T``;
- llama.cpp: ``llama-server -m FILE -np N -c N*C -t T`` (N slots of C tokens, continuous
  batching; ``--no-cache-prompt`` and ``cache_prompt: false``, since ours keeps no prompt
  cache and the same prompts come back every round).

Each round sends N streaming ``/v1/completions`` requests at once to one server, then to the
other (A B A B): distinct prompts given as the same token ids to both (tokenized once by
pocketlm, whose ids match llama.cpp's), greedy, ``ignore_eos`` so every request decodes all
--tokens. Aggregate tokens/s = every completion token / wall time from the first request to
the last ``[DONE]`` (prefill included); time to first token = request sent -> first chunk
with text, median over the level's requests. Figures are medians over rounds, with
ours/llama.cpp ratios. Writes bench/results/serve.json and appends a BENCHMARKS.md section
(neither with --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, append_section, llama_bin, machine, markdown_table, write_results
from serve_util import free_port

PROMPTS = [
    f"Write a short story about a {w} who learns to"
    for w in ("cat", "robot", "farmer", "painter", "dragon", "sailor", "teacher", "baker",
              "pilot", "gardener", "miner", "poet", "child", "doctor", "musician", "fox")
]


# -- the two servers ------------------------------------------------------------------------
class Child:
    """A server in a child process; ``with`` waits until /health answers 200, then stops it."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.cmd, self.port, self.log, self.env = cmd, port, log, env
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.cmd[0]} did not answer /health in 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def ours(gguf: Path, n: int, a, log: Path) -> Child:
    port = free_port()
    cmd = [sys.executable, "-m", "pocketlm.cli", "serve", str(gguf), "--port", str(port),
           "--max-batch", str(n), "--max-queue", str(4 * n), "--context", str(a.context),
           "--threads", str(a.threads)]
    return Child(cmd, port, log, env={**os.environ, "PYTHONPATH": str(REPO)})


def peer(exe: Path, gguf: Path, n: int, a, log: Path) -> Child:
    port = free_port()
    cmd = [str(exe), "-m", str(gguf), "-np", str(n), "-c", str(n * a.context), "-t", str(a.threads),
           "--host", "127.0.0.1", "--port", str(port), "--no-cache-prompt", "--no-webui"]
    return Child(cmd, port, log)


def peer_version(exe: Path) -> str:
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=False)
    return " ".join((out.stdout + out.stderr).split()[:8])


# -- the load --------------------------------------------------------------------------------
async def one(client: httpx.AsyncClient, model: str, prompt: list[int], tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            "cache_prompt": False}
    t0 = time.perf_counter()
    first, counted, chunks = None, None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            e = json.loads(line[6:])
            if "error" in e:
                raise RuntimeError(f"{client.base_url}: {e['error']}")
            if (e.get("usage") or {}).get("completion_tokens"):
                counted = e["usage"]["completion_tokens"]
            elif (e.get("timings") or {}).get("predicted_n"):
                counted = e["timings"]["predicted_n"]
            if any(c.get("text") for c in e.get("choices") or []):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - t0
    return {"tokens": counted if counted is not None else chunks, "ttft_s": first}


async def level(url: str, model: str, prompts: list[list[int]], tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, model, p, tokens) for p in prompts))
        wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results)
    if total != len(prompts) * tokens:
        raise RuntimeError(f"{url}: expected {len(prompts) * tokens} tokens, got {total}")
    return {"wall_s": wall, "tokens": total, "tokens_per_s": total / wall,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in results)}


def summary(runs: list[dict]) -> dict:
    return {"aggregate_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
            "ttft_p50_s": round(statistics.median(r["ttft_p50_s"] for r in runs), 4),
            "rounds_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a pulled model (its GGUF file serves both sides)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--rounds", type=int, default=3, help="A B rounds per level; medians")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server (2)")
    ap.add_argument("--context", type=int, default=512, help="context per slot/batch row (512)")
    ap.add_argument("--no-peer", action="store_true", help="ours only")
    ap.add_argument("--no-write", action="store_true",
                    help="print only: no bench/results/serve.json, no BENCHMARKS.md section")
    a = ap.parse_args()

    sys.path.insert(0, str(REPO))
    import pocketlm
    from pocketlm.formats import registry
    from pocketlm.serve.commands import model_id

    gguf = registry.stored_path(a.model)
    if gguf is None:
        sys.exit(f"{a.model} is not pulled (pocketlm pull {a.model})")
    tokenizer = pocketlm.load(gguf).tokenizer  # the same ids go to both servers
    ids = [tokenizer.encode(p) for p in PROMPTS]
    exe = None if a.no_peer else llama_bin("llama-server")
    if exe is None and not a.no_peer:
        print("llama-server not built (bash bench/build_llama_cpp.sh); ours only", file=sys.stderr)
    served = model_id(str(gguf))
    runs = {n: {"ours": [], "llama_cpp": []} for n in a.levels}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.levels:
            prompts = [ids[i % len(ids)] for i in range(n)]
            sides = {"ours": ours(gguf, n, a, Path(tmp) / f"ours-{n}.log")}
            if exe is not None:
                sides["llama_cpp"] = peer(exe, gguf, n, a, Path(tmp) / f"peer-{n}.log")
            urls = {k: c.__enter__() for k, c in sides.items()}
            try:
                for url in urls.values():  # warm-up: kernels built, caches touched
                    asyncio.run(level(url, served, prompts[:1], 4))
                for r in range(a.rounds):
                    for k, url in urls.items():  # A B A B
                        runs[n][k].append(asyncio.run(level(url, served, prompts, a.tokens)))
                        print(f"{n} clients, round {r + 1}, {k}: "
                              f"{runs[n][k][-1]['tokens_per_s']:.1f} tok/s", flush=True)
            finally:
                for c in sides.values():
                    c.__exit__()

    figures, rows = {}, []
    for n in a.levels:
        row = {k: summary(v) for k, v in runs[n].items() if v}
        if "llama_cpp" in row:
            o, p = row["ours"], row["llama_cpp"]
            row["ratio_tokens_per_s_ours_over_llama_cpp"] = round(
                o["aggregate_tokens_per_s"] / p["aggregate_tokens_per_s"], 3)
            row["ratio_ttft_ours_over_llama_cpp"] = round(o["ttft_p50_s"] / p["ttft_p50_s"], 3)
        figures[f"clients_{n}"] = row
        p = row.get("llama_cpp", {})
        rows.append([n, row["ours"]["aggregate_tokens_per_s"], p.get("aggregate_tokens_per_s", "—"),
                     row.get("ratio_tokens_per_s_ours_over_llama_cpp", "—"),
                     row["ours"]["ttft_p50_s"], p.get("ttft_p50_s", "—")])
    result = {"model": a.model, "file": gguf.name, "tokens_per_request": a.tokens,
              "threads": a.threads, "context_per_slot": a.context, "rounds": a.rounds,
              "llama_server": peer_version(exe) if exe else None, **figures,
              "bar_ratio_at_every_level": 1.0}
    table = markdown_table(["clients", "ours tok/s", "llama-server tok/s", "ours/llama.cpp",
                            "ours TTFT p50 s", "llama-server TTFT p50 s"], rows)
    print(f"{machine()['cpu']}, {a.model} ({gguf.name}), {a.threads} threads each")
    print(table)
    if a.no_write:
        return
    write_results("serve", result)
    append_section(
        f"Serving under load: pocketlm serve vs llama-server ({a.model})",
        f"`bench/serve.py`: both servers from the same file `{gguf.name}` (ours packed), "
        f"{a.threads} threads each, N concurrent streaming `/v1/completions` clients with the "
        f"same prompt token ids, {a.tokens} tokens each (greedy, ignore_eos, no prompt cache); "
        f"llama-server `-np N -c {a.context}N` ({result['llama_server']}), ours `--max-batch N "
        f"--context {a.context}`. Rounds alternate ours / llama.cpp; medians of {a.rounds}. "
        "Aggregate = completion tokens / wall time from first request to last `[DONE]` "
        "(prefill included); TTFT = request to first chunk with text, median over clients.\n\n"
        f"{table}\n\nBar: ours/llama.cpp >= 1.0 at every level.")


if __name__ == "__main__":
    main()
