"""The pipeline's figures: export round trips, our exports inside llama.cpp, a recipe end to end.

    python bench/pipeline.py                                  # all three parts, default model
    python bench/pipeline.py --parts roundtrip,llama --pages 0   # whole WikiText-2 test split
    python bench/pipeline.py --parts recipe --recipe customer-support
    python bench/pipeline.py --parts recipe --set distill.tokens=4096 --set evaluate.limit=3
    python bench/pipeline.py --parts ''                           # the section from pipeline.json
    python bench/pipeline.py --parts roundtrip --model tiny/ --samples 4 --seq-len 64 --check

- roundtrip: the model quantized with GPTQ int4, groups of 32, asymmetric, then exported. Max
  |logit difference| over --tokens tokens of WikiText-2 between the source and: our loader on the
  GGUF F16 export, our loader on the GGUF auto (Q4_1) export of the quantized model (vs the
  quantized model), transformers and our loader on the HF fp32 and bf16 exports.
- llama: llama.cpp's own files beside ours, all scored by ``llama-perplexity`` on the same text
  (chunks of --context, second half of each scored) and timed by ``llama-bench`` (decode):
  our F16 export vs ``llama-quantize`` F16 of the source (bar: within 0.1%); our GPTQ int4 g32
  exported as Q4_1 (codes kept) vs ``llama-quantize`` Q4_1 and Q4_0 of that F16 (bar: lower
  perplexity than both), with file sizes side by side.
- recipe: ``pocketlm recipe run`` of --recipe: wall time per step and the summary table
  (quality, size) against the starting model.

Figures go to bench/results/pipeline.json (one key per part) and a section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, append_section, markdown_table, merge_results

PEER_BIN = REPO / ".peer" / "build" / "bin"
TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
VALID = SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"
DEFAULT = "smollm2-135m-instruct"


def _text(pages: int | None) -> str:
    from pocketlm.evaluate.perplexity import wikitext_detokenizer, wikitext_pages

    chosen = wikitext_pages(TEST.read_text(encoding="utf-8"))[:pages] if pages else \
        wikitext_pages(TEST.read_text(encoding="utf-8"))
    return "\n\n".join(wikitext_detokenizer(p) for p in chosen)


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def quantized_model(a, model):
    """GPTQ int4 g32 asymmetric (what --type auto exports as Q4_1), reused from --save-dir."""
    import pocketlm
    from pocketlm.compress import quantize

    keep = Path(a.work) / "gptq-int4-g32"
    if (keep / "config.json").is_file():
        return pocketlm.load(keep)
    t0 = time.perf_counter()
    q = quantize(model, "gptq", 4, 32, sym=False, calibration=str(VALID), samples=a.samples,
                 seq_len=a.seq_len)
    print(f"gptq int4 g32: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    q.save(keep)
    return q


def roundtrip(a) -> dict:
    import torch
    import transformers

    import pocketlm
    from pocketlm.formats.export import write_gguf, write_hf

    model = pocketlm.load(a.model)
    ids = model.encode(_text(1))[: a.tokens]
    work = Path(a.work)
    q = quantized_model(a, model)
    out = {"model": a.model, "tokens": len(ids)}
    ref, qref = model.logits(ids), q.logits(ids)
    out["logit_scale"] = float(ref.abs().max())
    f16 = write_gguf(model, work / "ours-F16.gguf", "f16", force=True)
    out["gguf_f16_vs_source"] = _max_diff(pocketlm.load(f16).logits(ids), ref)
    q41 = write_gguf(q, work / "ours-gptq-Q4_1.gguf", "auto", force=True)
    out["gguf_auto_q4_1_vs_quantized"] = _max_diff(pocketlm.load(q41).logits(ids), qref)
    out["gguf_bytes"] = {"f16": f16.stat().st_size, "gptq_q4_1": q41.stat().st_size}
    for dtype in ("fp32", "bf16"):
        hf = write_hf(model, work / f"hf-{dtype}", dtype, force=True)
        tm = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        with torch.no_grad():
            theirs = tm(torch.tensor([ids])).logits[0]
        out[f"hf_{dtype}_transformers_vs_source"] = _max_diff(theirs, ref)
        out[f"hf_{dtype}_pocketlm_vs_source"] = _max_diff(pocketlm.load(hf).logits(ids), ref)
    return out


def _run(cmd: list[str]) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a llama.cpp tool. Its output goes to a file, not a
    pipe: through capture_output the last log lines (the "Final estimate") were lost."""
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        out.seek(0)
        return rc, out.read()


def _perplexity(f: Path, text: Path, a) -> dict:
    rc, log = _run([str(PEER_BIN / "llama-perplexity"), "-m", str(f), "-f", str(text), "-c",
                    str(a.context), "-b", str(a.context), "-t", str(a.threads)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    row = {"file": f.name, "file_bytes": f.stat().st_size,
           "token_perplexity": float(m.group(1)) if m else None}
    if not m:
        row["error"] = f"exit {rc}: {(log.strip().splitlines() or [''])[-1][-200:]}"
    if not a.no_speed:
        rc, log = _run([str(PEER_BIN / "llama-bench"), "-m", str(f), "-t", str(a.threads),
                        "-p", "0", "-n", "32", "-r", "3", "-o", "json"])
        try:
            row["decode_tokens_per_s"] = json.loads(log[log.index("["):])[0]["avg_ts"]
        except (ValueError, IndexError, KeyError):
            row["decode_tokens_per_s"] = None
    return row


def llama(a) -> dict:
    if not all((PEER_BIN / n).exists() for n in ("llama-quantize", "llama-perplexity",
                                                 "llama-bench")):
        print("llama.cpp not built (bash bench/build_llama_cpp.sh): no llama part", file=sys.stderr)
        return {}
    import pocketlm
    from pocketlm.api import resolve
    from pocketlm.formats.export import write_gguf

    work = Path(a.work)
    model = pocketlm.load(a.model)
    src = resolve(a.model)
    text = work / "wikitext2-test.txt"
    text.write_text(_text(a.pages))
    ours_f16 = write_gguf(model, work / "ours-F16.gguf", "f16", force=True)
    ours_q41 = None if a.no_gptq else write_gguf(quantized_model(a, model),
                                                 work / "ours-gptq-Q4_1.gguf", "auto", force=True)
    # llama.cpp's own F16 of the source: from the GGUF as llama-quantize requantizes it, or
    # from our F16 export for a folder source (llama.cpp's converter needs the HF original)
    base = src if src.suffix == ".gguf" else ours_f16
    theirs = {}
    for qtype in ("F16", "Q4_1", "Q4_0"):
        f = work / f"llama-quantize-{qtype}.gguf"
        inp = base if qtype == "F16" else work / "llama-quantize-F16.gguf"
        subprocess.run([str(PEER_BIN / "llama-quantize"), "--allow-requantize", str(inp), str(f),
                        qtype], check=True, capture_output=True)
        theirs[qtype] = _perplexity(f, text, a)
    out = {"model": a.model, "source_file": str(src), "context": a.context, "pages": a.pages,
           "threads": a.threads, "text_file": str(text),
           "ours_F16": _perplexity(ours_f16, text, a),
           **({"ours_gptq_int4_g32_Q4_1": _perplexity(ours_q41, text, a)} if ours_q41 else {}),
           **{f"llama_cpp_{k}": v for k, v in theirs.items()}}
    f16, mine = out["llama_cpp_F16"]["token_perplexity"], out["ours_F16"]["token_perplexity"]
    if f16 and mine:
        out["f16_relative_difference"] = mine / f16 - 1
    return out


def recipe(a) -> dict:
    from pocketlm.recipes.recipe import parse, run

    r = parse(a.recipe, overrides=a.set, model=None if a.model == DEFAULT else a.model)
    out_dir = Path(a.work) / f"recipe-{r.name}"
    t0 = time.perf_counter()
    rows = run(r, out_dir)
    # a resumed run skips finished steps: the whole recipe's time is the sum of the steps' own
    # times (each step's marker keeps the seconds it took when it ran)
    return {"recipe": a.recipe, "overrides": a.set, "run_dir": str(out_dir),
            "wall_s_this_invocation": time.perf_counter() - t0,
            "wall_s": sum(row.get("seconds") or 0 for row in rows), "steps": rows}


SHARED_NOTE = ("AMD EPYC with AVX-512 F/BW/VL/VNNI/BF16, no AMX, 2 cores. The runs were quality "
               "runs under `nice -n 19` on a machine shared with other agents' jobs: wall times "
               "and decode speeds are upper/lower bounds, and ratios between two jobs run at "
               "different times are indicative only.\n")


def _llama_table(ll: dict, title: str) -> list[str]:
    rows = [[k.replace("_", " "), v.get("file_bytes", 0) / 1e6, v.get("token_perplexity"),
             v.get("decode_tokens_per_s") or "-"] for k, v in ll.items() if isinstance(v, dict)]
    body = [(f"\n{title} (`llama-perplexity -c {ll['context']}`, WikiText-2 test, "
             f"{ll['pages'] or 'all'} pages; `llama-bench` decode, {ll.get('threads', 1)} "
             "thread(s)):\n"),
            markdown_table(["file", "MB", "token ppl", "decode tok/s"], rows)]
    if "f16_relative_difference" in ll:
        body.append(f"\nOur F16 vs llama.cpp's F16: {100 * ll['f16_relative_difference']:+.3f}%"
                    " (bar: within 0.1%).")
    return body


def section(fig: dict) -> None:
    body = [SHARED_NOTE]
    rt = fig.get("roundtrip")
    if rt:
        body.append(f"Round trips on {rt['model']}, {rt['tokens']} tokens of WikiText-2 (max |logit "
                    f"difference|; logits up to {rt['logit_scale']:.1f}):\n")
        body.append(markdown_table(["export", "read by", "vs", "max |Δ logit|"], [
            ["GGUF F16", "pocketlm", "source", rt["gguf_f16_vs_source"]],
            ["GGUF auto (GPTQ int4 g32 → Q4_1)", "pocketlm", "quantized model",
             rt["gguf_auto_q4_1_vs_quantized"]],
            ["HF fp32", "transformers", "source", rt["hf_fp32_transformers_vs_source"]],
            ["HF fp32", "pocketlm", "source", rt["hf_fp32_pocketlm_vs_source"]],
            ["HF bf16", "transformers", "source", rt["hf_bf16_transformers_vs_source"]],
            ["HF bf16", "pocketlm", "source", rt["hf_bf16_pocketlm_vs_source"]],
        ]))
    for key in sorted(k for k in fig if k.startswith("llama")):
        ll = fig[key]
        if ll:
            body += _llama_table(ll, f"In llama.cpp, source {ll.get('model', 'the default model')}")
    rc = fig.get("recipe")
    if rc:
        body.append(f"\nRecipe `{rc['recipe']}` end to end: {rc['wall_s'] / 60:.1f} min (sum of the "
                    "steps' own wall times)"
                    + (f", reduced with `--set {' --set '.join(rc['overrides'])}`"
                       if rc.get("overrides") else "") + ".\n")
        from pocketlm.recipes.recipe import format_summary

        body.append("```\n" + format_summary(rc["steps"]) + "\n```")
    append_section("pipeline: exports and recipes", "\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="roundtrip,llama,recipe")
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--recipe", default="customer-support")
    ap.add_argument("--set", action="append", default=[], metavar="STEP.SETTING=VALUE",
                    help="recipe part: override a step setting (as `pocketlm recipe run --set`)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens for the logit round trips")
    ap.add_argument("--pages", type=int, default=3, help="WikiText-2 test pages (0 = all)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64, help="GPTQ calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="GPTQ window tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for the exports (kept; default: temp)")
    ap.add_argument("--no-speed", action="store_true", help="no llama-bench decode timing")
    ap.add_argument("--no-gptq", action="store_true",
                    help="llama part without our GPTQ Q4_1 (F16 and llama-quantize's files only)")
    ap.add_argument("--no-section", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--check", action="store_true",
                    help="a trial of the script: print the figures, save and append nothing")
    a = ap.parse_args()
    a.pages = a.pages or None
    a.work = a.work or tempfile.mkdtemp(prefix="pocketlm-pipeline-")
    os.makedirs(a.work, exist_ok=True)
    from pocketlm.api import set_threads

    set_threads(a.threads)
    fig = {}
    for part in filter(None, a.parts.split(",")):
        # llama.cpp figures of another source model go beside the default model's
        key = part if part != "llama" or a.model == DEFAULT else f"llama@{Path(a.model).name}"
        fig[key] = {"roundtrip": roundtrip, "llama": llama, "recipe": recipe}[part](a)
        if fig[key] and not a.check:
            merge_results("pipeline", key, fig[key])
        print(json.dumps({key: fig[key]}, indent=2, default=str))
    if not (a.no_section or a.check):
        # the section shows every part measured so far (bench/results/pipeline.json)
        path = REPO / "bench" / "results" / "pipeline.json"
        section({k: v for k, v in json.loads(path.read_text()).items() if k != "machine"})


if __name__ == "__main__":
    main()
