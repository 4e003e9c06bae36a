"""Shared by bench scripts: write results JSON and append a dated section to BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared"


PEER = REPO / ".peer"


def llama_bin(name: str, batched: bool = False) -> Path | None:
    """A llama.cpp binary built by bench/build_llama_cpp.sh, or None if it is not built.

    ``batched=True`` (prefill, perplexity) prefers the non-AMX AVX-512 build, which exists only
    on AMX CPUs, where the native build segfaults in batched passes; otherwise the native one.
    """
    for build in (["build-avx512", "build"] if batched else ["build"]):
        path = PEER / build / "bin" / name
        if path.is_file():
            return path
    return None


def read_bandwidth_gbps(mb: int = 512) -> float:
    """This machine's read bandwidth now (GB/s): the best of 10 sums over a buffer far beyond
    cache, on torch's threads."""
    import torch

    a = torch.ones(mb * 1024 * 1024 // 4)
    best = 0.0
    for _ in range(10):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def llama_build_label(path: Path) -> str:
    """Which build a llama.cpp binary came from, for the tables."""
    return {"build": "native (GGML_NATIVE=ON)",
            "build-avx512": "AVX-512 VNNI/BF16/VBMI, no AMX (GGML_NATIVE=OFF)"}.get(
        path.parent.parent.name, str(path))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=False,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": commit, "date": datetime.now(UTC).isoformat(timespec="seconds")}


def write_results(name: str, figures: dict) -> Path:
    """bench/results/NAME.json, written atomically; keys should carry their units."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **figures}, indent=2))
    os.replace(tmp, path)
    return path


def append_section(title: str, body: str) -> None:
    """Append '## YYYY-MM-DD — title' and body (Markdown) to BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    if not path.exists():
        path.write_text("# Benchmarks\n\nEach section is appended by a script in `bench/`; "
                        "figures are medians of side-by-side runs on the machine named.\n")
    m = machine()
    day = m["date"][:10]
    with open(path, "a") as f:
        f.write(f"\n## {day} — {title}\n\n_{m['cpu']}, {m['cores']} cores, commit {m['commit']}_\n\n"
                f"{body.strip()}\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def alternate(fns: dict, rounds: int = 3) -> dict:
    """Run each callable in turn, A B A B ..., `rounds` times; median seconds of each."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def merge_results(name: str, key: str, figures: dict) -> None:
    """Read-modify-write bench/results/NAME.json, replacing only ``key`` (scripts share files)."""
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.pop("machine", None)
    data[key] = figures
    write_results(name, data)


def read_results(name: str, key: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get(key, {}) if path.is_file() else {}


def wikitext_perplexity(model, a) -> dict:
    """WikiText-2 test perplexity through the evaluator (a.pages, a.context, a.stride)."""
    from pocketlm.evaluate.run import evaluate

    t0 = time.perf_counter()
    r = evaluate(model, "wikitext2", limit=a.pages, context=a.context, stride=a.stride,
                 use_cache=False, record=False, progress=True)["tasks"]["wikitext2"]
    return {"word_perplexity": r["word_perplexity"], "token_perplexity": r["token_perplexity"],
            "tokens_scored": r["tokens"], "eval_s": time.perf_counter() - t0}


def decode_ab(networks: dict, tokens: int, rounds: int) -> dict:
    """Seconds per decode step of each network, alternating A B A B; medians."""
    from pocketlm.engine.bench import time_decode

    times = {k: [] for k in networks}
    for _ in range(rounds):
        for k, net in networks.items():
            times[k].append(time_decode(net, new_tokens=tokens))
    return {k: statistics.median(v) for k, v in times.items()}
