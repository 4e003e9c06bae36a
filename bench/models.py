"""The four known models, pocketlm side by side with llama.cpp on the same GGUF file.

    .venv/bin/python bench/models.py [--models a,b] [--threads 2] [--rounds 3]
    .venv/bin/python bench/models.py --quick      # one round, short runs: checks the plumbing

For each of smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, qwen2.5-coder-1.5b-instruct
and gemma-3-270m (pulled into the store; Gemma needs `pocketlm pull gemma-3-270m
--accept-license`):

- ours, in a fresh child process per model and round (so the peak RSS is that model's own, read
  from VmHWM): load time of ``pocketlm.load(name)``, batch-1 decode tokens/s (128 steps after a
  16-token prompt, ``engine.bench.time_decode``), prefill tokens/s (512 tokens,
  ``time_prefill``), peak RSS, KV-cache bytes of that 512-token context.
- llama.cpp: ``llama-bench -n 128`` (decode) and ``-p 512`` (prefill), its peak RSS from the
  kernel's rusage of the child, its load time from ``llama-perplexity``'s perf line.
- rounds alternate A B A B (ours, llama.cpp, per model); medians and ours/llama.cpp ratios.
- WikiText-2 token perplexity on the same text by llama-perplexity's own protocol (the text
  tokenized whole, chunks of --ppl-context tokens, BOS first where the model adds one, the
  second half of each chunk scored), ours vs ``llama-perplexity``; each side also against its
  own reference (ours dequantized to fp32, llama.cpp an F16 file made by ``llama-quantize
  --allow-requantize`` from the same GGUF), where --reference-max-mb allows.
- decode as a share of the memory-bandwidth bound (read bandwidth measured now / file bytes,
  every weight being read once per token).

On a CPU with AMX, build_llama_cpp.sh makes two builds: decode is taken from the native one,
prefill and perplexity from the AVX-512 one (the native build segfaults in batched passes);
the tables say which build gave which figure. Writes bench/results/models.json and appends a
section to BENCHMARKS.md (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    PEER,
    REPO,
    SHARED,
    append_section,
    llama_bin,
    llama_build_label,
    machine,
    markdown_table,
    write_results,
)

MODELS = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
          "qwen2.5-coder-1.5b-instruct"]
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def ppl_text(pages: int) -> str:
    """The first ``pages`` WikiText-2 test articles, raw (as llama.cpp users feed wiki.test.raw)."""
    raw = WIKI.read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = \n", raw, flags=re.MULTILINE)]
    end = starts[pages] if pages < len(starts) else len(raw)
    return raw[:end]


# -- ours, in a child process ---------------------------------------------------------------
def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child_speed(name: str, threads: int, decode_tokens: int, prefill_tokens: int) -> dict:
    """Load, decode, prefill in this fresh process; the figures and this process's peak RSS."""
    import torch

    import pocketlm
    from pocketlm.engine.bench import peak_rss_bytes, time_decode, time_prefill, weight_bytes
    from pocketlm.model.transformer import KVCache

    runtime_rss = current_rss_bytes()  # Python + torch + pocketlm imported, no model yet
    t0 = time.perf_counter()
    m = pocketlm.load(name, threads=threads)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    net = m.network
    step = time_decode(net, new_tokens=decode_tokens)
    prefill_s = time_prefill(net, prefill_tokens, repeats=1)
    cache = KVCache.allocate(net.config, 1, prefill_tokens + 1, net.lm_head.weight.dtype)
    cache_bytes = cache.nbytes
    return {"load_s": load_s, "decode_tokens_per_s": 1 / step,
            "prefill_tokens_per_s": prefill_tokens / prefill_s,
            "peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_load_bytes": rss_after_load,
            "runtime_rss_bytes": runtime_rss,
            "kv_cache_bytes": cache_bytes, "weight_bytes_in_memory": weight_bytes(net),
            "threads": torch.get_num_threads()}


def child_perplexity(name: str, threads: int, text_file: str, n_ctx: int, chunks: int,
                     fp32: bool) -> dict:
    """Token perplexity by llama-perplexity's protocol (see the module docstring)."""
    import torch

    import pocketlm

    m = pocketlm.load(name, threads=threads, dtype=torch.float32 if fp32 else None)
    tok = m.tokenizer
    ids = m.encode(Path(text_file).read_text(encoding="utf-8"))
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    n = min(len(ids) // n_ctx, chunks) if chunks else len(ids) // n_ctx
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.inference_mode():
        for c in range(n):
            chunk = list(ids[c * n_ctx:(c + 1) * n_ctx])
            if bos is not None:
                chunk[0] = bos
            x = torch.tensor([chunk])
            logits = m.network(x)[0, first:n_ctx - 1].float()  # (n_ctx - 1 - first, V)
            target = x[0, first + 1:n_ctx]
            nll -= torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
            count += len(target)
    return {"token_perplexity": math.exp(nll / count), "tokens_scored": count, "chunks": n,
            "text_tokens": len(ids)}


def child_bandwidth() -> dict:
    from _common import read_bandwidth_gbps

    return {"read_bandwidth_gb_per_s": read_bandwidth_gbps()}


def in_child(kind: str, **kwargs) -> dict:
    """Run ``child_<kind>(**kwargs)`` in a fresh interpreter; its result, or {"error": ...}."""
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(kwargs)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        print(f"ours {kind} {kwargs.get('name', '')}: failed: {tail}", file=sys.stderr)
        return {"error": f"exit status {r.returncode}: {tail[-300:]}"}
    return json.loads(lines[-1])


# -- llama.cpp ------------------------------------------------------------------------------
def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit status, wall seconds, peak RSS bytes from the kernel's rusage, stdout+stderr)."""
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return p.returncode, wall, usage.ru_maxrss * 1024, out.read()


def peer_bench(f: Path, threads: int, decode_tokens: int, prefill_tokens: int) -> dict:
    out = {}
    for kind, args, batched in [("decode", ["-p", "0", "-n", str(decode_tokens)], False),
                                ("prefill", ["-p", str(prefill_tokens), "-n", "0"], True)]:
        exe = llama_bin("llama-bench", batched=batched)
        if exe is None:
            return {"error": "llama.cpp not built (bash bench/build_llama_cpp.sh)"}
        rc, _, rss, text = run_measured([str(exe), "-m", str(f), "-t", str(threads), *args,
                                         "-r", "1", "-o", "json"])
        out[f"{kind}_build"] = llama_build_label(exe)
        try:
            start = text.index("[")
            row = json.loads(text[start:text.rindex("]") + 1])[0]
            out[f"{kind}_tokens_per_s"] = row["avg_ts"]
            out[f"{kind}_peak_rss_bytes"] = rss
        except (ValueError, IndexError, KeyError):
            out[f"{kind}_error"] = f"exit status {rc}: {text.strip().splitlines()[-1:]}"
    return out


def peer_perplexity(f: Path, text: Path, threads: int, n_ctx: int, chunks: int) -> dict:
    exe = llama_bin("llama-perplexity", batched=True)
    if exe is None:
        return {"error": "llama.cpp not built (bash bench/build_llama_cpp.sh)"}
    cmd = [str(exe), "-m", str(f), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx),
           "-t", str(threads)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    rc, wall, rss, out = run_measured(cmd)
    row = {"build": llama_build_label(exe), "wall_s": wall, "peak_rss_bytes": rss}
    if m := re.search(r"Final estimate: PPL = ([0-9.]+)", out):
        row["token_perplexity"] = float(m.group(1))
    else:
        row["error"] = f"exit status {rc}: {(out.strip().splitlines() or [''])[-1][-200:]}"
    if m := re.search(r"load time\s*=\s*([0-9.]+) ms", out):
        row["load_s"] = float(m.group(1)) / 1e3
    if m := re.search(r"perplexity over (\d+) chunks, n_ctx=(\d+)", out):
        row["chunks"], row["tokens_scored"] = int(m.group(1)), int(m.group(1)) * (n_ctx - 1 - n_ctx // 2)
    return row


def peer_f16(src: Path, name: str) -> Path | None:
    """An F16 copy of the same (dequantized) weights, llama.cpp's own reference; cached in .peer."""
    quant = llama_bin("llama-quantize")
    if quant is None:
        return None
    f = PEER / f"{name}-F16.gguf"
    if not f.exists():
        tmp = f.with_suffix(".tmp.gguf")
        r = subprocess.run([str(quant), "--allow-requantize", str(src), str(tmp), "F16"],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, f)
    return f


# -- the run --------------------------------------------------------------------------------
def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    return a / b if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--ppl-pages", type=int, default=8, help="WikiText-2 test articles of text")
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-chunks", type=int, default=16, help="at most this many chunks (0: all)")
    ap.add_argument("--reference-max-mb", type=float, default=600,
                    help="fp32/F16 references only for files up to this size (the 1.5B's F16 is 3 GB)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="one round, 8 decode / 64 prefill tokens, 1 chunk, no references, no "
                         "BENCHMARKS.md section: checks the plumbing")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, kwargs = a.child
        print(json.dumps(globals()[f"child_{kind}"](**json.loads(kwargs))))
        return
    if a.quick:
        a.rounds, a.decode_tokens, a.prefill_tokens, a.ppl_chunks = 1, 8, 64, 1
        a.ppl_context, a.reference_max_mb = 128, 0

    sys.path.insert(0, str(REPO))
    from pocketlm.formats import registry

    names = a.models.split(",")
    files = {}
    for n in names:
        if (p := registry.stored_path(n)) is None:
            print(f"{n} is not pulled (pocketlm pull {n}); skipping it", file=sys.stderr)
            continue
        files[n] = p
    PEER.mkdir(exist_ok=True)
    text = PEER / f"wikitext2-test-first{a.ppl_pages}articles.txt"
    text.write_text(ppl_text(a.ppl_pages), encoding="utf-8")
    peer = not a.no_peer and llama_bin("llama-bench") is not None
    if not a.no_peer and not peer:
        print("llama.cpp not built (bash bench/build_llama_cpp.sh); ours only", file=sys.stderr)

    # A B A B: every round runs each model on our side, then on llama.cpp's.
    runs = {n: {"ours": [], "llama_cpp": []} for n in files}
    for r in range(a.rounds):
        for n, f in files.items():
            print(f"round {r + 1}/{a.rounds}: {n}", file=sys.stderr)
            runs[n]["ours"].append(in_child("speed", name=n, threads=a.threads,
                                            decode_tokens=a.decode_tokens,
                                            prefill_tokens=a.prefill_tokens))
            if peer:
                runs[n]["llama_cpp"].append(peer_bench(f, a.threads, a.decode_tokens,
                                                       a.prefill_tokens))

    bw = in_child("bandwidth").get("read_bandwidth_gb_per_s")
    results = {}
    for n, f in files.items():
        size = f.stat().st_size
        ours, theirs = runs[n]["ours"], runs[n]["llama_cpp"]
        row = {"file": str(f), "file_bytes": size, "architecture": registry.KNOWN[n].architecture,
               "quantization": registry.KNOWN[n].quantization, "rounds": a.rounds,
               "ours_load_s": median(ours, "load_s"),
               "ours_peak_rss_bytes": median(ours, "peak_rss_bytes"),
               "ours_kv_cache_bytes": median(ours, "kv_cache_bytes"),
               "ours_weight_bytes_in_memory": median(ours, "weight_bytes_in_memory"),
               "ours_decode_tokens_per_s": median(ours, "decode_tokens_per_s"),
               "ours_prefill_tokens_per_s": median(ours, "prefill_tokens_per_s"),
               "ours_errors": [o["error"] for o in ours if "error" in o]}
        row["ours_runtime_rss_bytes"] = median(ours, "runtime_rss_bytes")
        if row["ours_peak_rss_bytes"] and row["ours_kv_cache_bytes"] is not None:
            row["ours_rss_over_file_plus_cache"] = (
                row["ours_peak_rss_bytes"] / (size + row["ours_kv_cache_bytes"]))
            if row["ours_runtime_rss_bytes"]:  # what the model adds to the bare runtime
                row["ours_model_rss_over_file_plus_cache"] = (
                    (row["ours_peak_rss_bytes"] - row["ours_runtime_rss_bytes"])
                    / (size + row["ours_kv_cache_bytes"]))
        if bw:
            bound = bw * 1e9 / size
            row["bandwidth_bound_decode_tokens_per_s"] = bound
            row["ours_decode_share_of_bandwidth_bound"] = ratio(row["ours_decode_tokens_per_s"], bound)
        ref = size <= a.reference_max_mb * 2**20
        ppl = {"ours": in_child("perplexity", name=n, threads=a.threads, text_file=str(text),
                                n_ctx=a.ppl_context, chunks=a.ppl_chunks, fp32=False)}
        if ref:
            ppl["ours_fp32_reference"] = in_child("perplexity", name=n, threads=a.threads,
                                                  text_file=str(text), n_ctx=a.ppl_context,
                                                  chunks=a.ppl_chunks, fp32=True)
        if peer:
            row["llama_cpp_decode_tokens_per_s"] = median(theirs, "decode_tokens_per_s")
            row["llama_cpp_prefill_tokens_per_s"] = median(theirs, "prefill_tokens_per_s")
            row["llama_cpp_peak_rss_bytes"] = median(theirs, "decode_peak_rss_bytes")
            row["llama_cpp_decode_build"] = next((t["decode_build"] for t in theirs
                                                  if "decode_build" in t), None)
            row["llama_cpp_prefill_build"] = next((t["prefill_build"] for t in theirs
                                                   if "prefill_build" in t), None)
            row["llama_cpp_errors"] = [v for t in theirs for k, v in t.items() if "error" in k]
            row["ratio_decode_ours_over_llama_cpp"] = ratio(row["ours_decode_tokens_per_s"],
                                                            row["llama_cpp_decode_tokens_per_s"])
            row["ratio_prefill_ours_over_llama_cpp"] = ratio(row["ours_prefill_tokens_per_s"],
                                                             row["llama_cpp_prefill_tokens_per_s"])
            if bw:
                row["llama_cpp_decode_share_of_bandwidth_bound"] = ratio(
                    row["llama_cpp_decode_tokens_per_s"], bw * 1e9 / size)
            ppl["llama_cpp"] = peer_perplexity(f, text, a.threads, a.ppl_context, a.ppl_chunks)
            row["llama_cpp_load_s"] = ppl["llama_cpp"].get("load_s")
            if ref and (f16 := peer_f16(f, n)) is not None:
                ppl["llama_cpp_f16_reference"] = peer_perplexity(f16, text, a.threads,
                                                                 a.ppl_context, a.ppl_chunks)
        p = {k: v.get("token_perplexity") for k, v in ppl.items()}
        row["perplexity"] = ppl
        row["ppl_ours_over_llama_cpp"] = ratio(p.get("ours"), p.get("llama_cpp"))
        row["ppl_ours_over_own_fp32"] = ratio(p.get("ours"), p.get("ours_fp32_reference"))
        row["ppl_llama_cpp_over_own_f16"] = ratio(p.get("llama_cpp"), p.get("llama_cpp_f16_reference"))
        row["ppl_references_ours_fp32_over_llama_cpp_f16"] = ratio(
            p.get("ours_fp32_reference"), p.get("llama_cpp_f16_reference"))
        if row["ppl_ours_over_llama_cpp"]:
            row["ppl_agree_within_1_percent"] = abs(row["ppl_ours_over_llama_cpp"] - 1) <= 0.01
        results[n] = row

    settings = {"threads": a.threads, "rounds": a.rounds, "decode_tokens": a.decode_tokens,
                "prefill_tokens": a.prefill_tokens, "ppl_text": str(text), "ppl_context": a.ppl_context,
                "ppl_chunks": a.ppl_chunks, "read_bandwidth_gb_per_s": bw, "quick": a.quick}
    figures = {"settings": settings, "models": results}
    print(json.dumps(figures, indent=2))
    if a.quick:
        return
    write_results("models", figures)
    append_section("The known models: pocketlm vs llama.cpp on the same GGUF (bench/models.py)",
                   report(results, settings))


def _f(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def report(results: dict, s: dict) -> str:
    rows = []
    for n, r in results.items():
        rows.append([n, f"{r['file_bytes'] / 2**20:.0f}", _f(r["ours_load_s"], ".2f"),
                     _f(r.get("llama_cpp_load_s"), ".2f"),
                     _f(r["ours_peak_rss_bytes"] and r["ours_peak_rss_bytes"] / 2**20, ".0f"),
                     _f(r.get("llama_cpp_peak_rss_bytes") and r["llama_cpp_peak_rss_bytes"] / 2**20, ".0f"),
                     _f(r.get("ours_rss_over_file_plus_cache"), ".2f"),
                     _f(r.get("ours_model_rss_over_file_plus_cache"), ".2f"),
                     _f(r["ours_decode_tokens_per_s"], ".1f"),
                     _f(r.get("llama_cpp_decode_tokens_per_s"), ".1f"),
                     _f(r.get("ratio_decode_ours_over_llama_cpp"), ".2f"),
                     _f(r["ours_prefill_tokens_per_s"], ".0f"),
                     _f(r.get("llama_cpp_prefill_tokens_per_s"), ".0f"),
                     _f(r.get("ratio_prefill_ours_over_llama_cpp"), ".2f"),
                     _f(r.get("ours_decode_share_of_bandwidth_bound"), ".0%"),
                     _f(r.get("llama_cpp_decode_share_of_bandwidth_bound"), ".0%")])
    speed = markdown_table(["model", "file MiB", "load s ours", "load s llama.cpp",
                            "peak RSS MiB ours", "llama.cpp", "ours RSS / (file + cache)",
                            "ours (RSS - runtime) / (file + cache)",
                            "decode tok/s ours", "llama.cpp", "ours/llama.cpp",
                            "prefill tok/s ours", "llama.cpp", "ours/llama.cpp",
                            "decode / bandwidth bound ours", "llama.cpp"], rows)
    prows = []
    for n, r in results.items():
        p = {k: v.get("token_perplexity") for k, v in r["perplexity"].items()}
        prows.append([n, _f(p.get("ours"), ".3f"), _f(p.get("llama_cpp"), ".3f"),
                      _f(r.get("ppl_ours_over_llama_cpp"), ".4f"),
                      _f(p.get("ours_fp32_reference"), ".3f"),
                      _f(p.get("llama_cpp_f16_reference"), ".3f"),
                      _f(r.get("ppl_ours_over_own_fp32"), ".4f"),
                      _f(r.get("ppl_llama_cpp_over_own_f16"), ".4f")])
    ppl = markdown_table(["model", "token ppl ours", "llama.cpp", "ours/llama.cpp",
                          "ours fp32 ref", "llama.cpp F16 ref", "ours / own fp32",
                          "llama.cpp / own F16"], prows)
    builds = sorted({(r.get("llama_cpp_decode_build"), r.get("llama_cpp_prefill_build"))
                     for r in results.values()} - {(None, None)})
    build_note = "; ".join(f"decode from the {d} build, prefill and perplexity from the {p} build"
                           for d, p in builds) or "llama.cpp not run"
    m = machine()
    return (f"{m['cpu']}, {s['threads']} threads, {s['rounds']} rounds A B A B (medians); "
            f"decode {s['decode_tokens']} tokens batch 1, prefill {s['prefill_tokens']} tokens. "
            f"llama.cpp: {build_note}. Our peak RSS is each model's own (a fresh process per "
            f"model, VmHWM after load, decode and prefill; cache = the {s['prefill_tokens']}-token "
            f"KV cache); llama.cpp's is llama-bench's decode run (kernel rusage). Bandwidth "
            f"bound = measured read bandwidth ({_f(s['read_bandwidth_gb_per_s'], '.1f')} GB/s) / "
            f"file bytes.\n\n{speed}\n\nWikiText-2 token perplexity, same text "
            f"(`{Path(s['ppl_text']).name}`) and llama-perplexity's protocol on both sides: "
            f"chunks of {s['ppl_context']} tokens (at most {s['ppl_chunks']}), second half "
            f"scored. The bar: ours and llama.cpp agree within 1%.\n\n{ppl}\n")


if __name__ == "__main__":
    main()
