"""Cross-check ``pocketlm eval`` against EleutherAI's lm-evaluation-harness on the same weights.

    .venv/bin/python bench/evaluate.py [--limit 300] [--pages 8] [--skip-peer]
    .venv/bin/python bench/evaluate.py --taskfiles [--taskfile-limit 250] [--skip-peer]
    .venv/bin/python bench/evaluate.py --taskfiles --taskfile-limits gsm8k=250,banking77=40 \
        --endpoint-limit 5 --batch-size 16     # per-task counts; stages in --work add up

Both sides read the same local files (lm-eval through task configs written to a temporary
folder: its own prompt templates, HellaSwag preprocessing, WikiText detokenizer and metric
code, only the dataset path is local), and score the same weights: the default model is
saved with ``Model.save`` and lm-eval's transformers backend (HFLM, fp32, max_length = our
context) loads that folder. The saved tokenizer.json carries the corrected pre-tokenizer
(Digits + ByteLevel, see ../shared/golden/README.md), and the script checks that both
tokenizers give the same ids on every prompt it compares.

``--taskfiles`` runs the task YAMLs shipped in pocketlm/tasks/ (Banking77, Bitext intent,
GSM8K 5-shot) through pocketlm, through lm-eval's ``hf`` backend on the same saved weights and
the same YAMLs (only the data paths made absolute and the task names prefixed, so lm-eval's
own ``gsm8k`` does not shadow ours), and through ``--endpoint`` against our own server started
in this process; per-item agreement, metric differences and the wall time of each side go to
the ``taskfiles`` key of bench/results/evaluate.json.

Writes bench/results/evaluate.json and a section of BENCHMARKS.md. lm-eval is bench-only
(``pip install lm-eval``); nothing in pocketlm or its tests imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # serve_util
from _common import SHARED, append_section, markdown_table, merge_results, write_results

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = SHARED / "data"
SHARED_NOTE = ("AMD EPYC with AVX-512 F/BW/VL/VNNI/BF16, no AMX, 2 cores. Quality runs under "
               "`nice -n 19` on a machine shared with other agents' jobs: wall times are upper "
               "bounds, and ratios between two jobs run at different times are indicative only.\n")
MC_TASKS = ["hellaswag", "arc_easy", "piqa"]

# SmolLM2-135M-Instruct's model card (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct,
# "Evaluation" -> "Instruction model" table; zero-shot, lighteval, bf16 original weights).
PUBLISHED = {
    "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, "
              "'Instruction model' table)",
    "hellaswag": 40.9,
    "arc_average": 37.3,
    "piqa": 66.3,
}

# -- lm-eval task configs pointing at local files ----------------------------------------------
UTILS = '''
from lm_eval.tasks.hellaswag.utils import preprocess
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer, process_results


def hellaswag_docs(dataset):
    def one(doc):
        return {"query": preprocess(doc["query"]),
                "choices": [preprocess(e) for e in doc["endings"]],
                "gold": int(doc["label"])}
    return dataset.map(one)
'''

MC_METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: acc_bytes
    aggregation: mean
    higher_is_better: true
"""


def write_lm_eval_tasks(folder: Path, pages: list[str]) -> None:
    """YAML task configs (lm-eval's own templates) over our local copies of the data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "local_utils.py").write_text(UTILS)
    piqa = folder / "piqa.jsonl"
    labels = (DATA / "piqa/valid-labels.lst").read_text().splitlines()
    with open(piqa, "w") as f:
        rows = (DATA / "piqa/valid.jsonl").read_text().splitlines()
        f.writelines(json.dumps({**json.loads(line), "label": int(label)}) + "\n"
                     for line, label in zip(rows, labels))
    wiki = folder / "wikitext.jsonl"
    with open(wiki, "w") as f:
        f.writelines(json.dumps({"page": p}) + "\n" for p in pages)

    def cfg(name, path, body):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path}\ntest_split: test\n{body}")

    cfg("local_hellaswag", DATA / "hellaswag/hellaswag_val.jsonl",
        "output_type: multiple_choice\nprocess_docs: !function local_utils.hellaswag_docs\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{gold}}"\ndoc_to_choice: "choices"\n'
        + MC_METRICS)
    cfg("local_arc_easy", DATA / "arc/arc_easy_test.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{choices.label.index(answerKey)}}"\n'
        'doc_to_choice: "{{choices.text}}"\n' + MC_METRICS)
    cfg("local_piqa", piqa,
        'output_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        'doc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n' + MC_METRICS)
    cfg("local_wikitext2", wiki,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        "doc_to_target: !function local_utils.wikitext_detokenizer\n"
        "process_results: !function local_utils.process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")


def make_hflm(model_dir: Path, context: int, batch_size: int):
    import torch
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype=torch.float32, device="cpu",
                batch_size=batch_size, max_length=context)


def run_lm_eval_task(lm, task_dir: Path, task: str, limit: int | None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    tm = TaskManager(include_path=str(task_dir))
    r = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, log_samples=True,
                        bootstrap_iters=0)
    return {"results": {k: v for k, v in r["results"][task].items() if isinstance(v, (int, float))},
            "samples": [s["resps"] for s in r["samples"][task]],
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=300, help="first N items of each MC task")
    ap.add_argument("--pages", type=int, default=8, help="first N WikiText-2 test pages")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--skip-peer", action="store_true", help="ours only (no lm-eval)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides (1: the CPU here is shared, and one "
                         "thread is several times faster than two under contention)")
    ap.add_argument("--work", default="/tmp/pocketlm-eval-bench",
                    help="folder for the saved model, lm-eval task configs and finished stages")
    ap.add_argument("--order", default="arc_easy,wikitext2,hellaswag,piqa",
                    help="task order (each finished task is kept if the run is stopped)")
    ap.add_argument("--timing-items", type=int, default=500,
                    help="time a HellaSwag run of this many items, ours only (0 = skip)")
    ap.add_argument("--skip-challenge", action="store_true",
                    help="do not run ARC-Challenge (ours only, for the published ARC average)")
    ap.add_argument("--finish-now", action="store_true",
                    help="write results from the stages finished so far, run nothing new")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke test)")
    ap.add_argument("--taskfiles", action="store_true",
                    help="compare the shipped task YAMLs (pocketlm, lm-eval, our server) instead")
    ap.add_argument("--taskfile-limit", type=int, default=250, help="items per task file (250)")
    ap.add_argument("--taskfile-limits", default="",
                    help="task files: per-task item counts, e.g. gsm8k=250,banking77=60")
    ap.add_argument("--taskfile-only", default="",
                    help="task files: run only these (comma-separated); the report uses all")
    ap.add_argument("--endpoint-limit", type=int, default=0,
                    help="task files: items through our server (0: the same as the direct run)")
    ap.add_argument("--report-only", action="store_true",
                    help="task files: write the figures from the --work stages, run nothing")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="task files: items scored or decoded together, both sides (8)")
    ap.add_argument("--skip-endpoint", action="store_true",
                    help="task files: do not run them through our own server")
    a = ap.parse_args()

    import torch

    import pocketlm
    from pocketlm.evaluate.perplexity import wikitext_pages
    from pocketlm.evaluate.run import evaluate

    # dtype fp32: the GGUF's packed Q4_1 dequantized, the weights lm-eval's side reads too
    model = pocketlm.load("smollm2-135m-instruct", dtype=torch.float32, threads=a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.taskfiles:
        # Both sides run the same fp32 weights: lm-eval's hf backend reads them from a Hugging
        # Face folder written from the dequantized model.
        model_dir = work / "model-hf-fp32"
        if not (model_dir / "config.json").is_file():
            from pocketlm.formats.export import write_hf

            write_hf(model, model_dir, dtype="fp32", force=True)
        taskfile_bench(a, model, model_dir)
        return
    pages = wikitext_pages((DATA / "wikitext-2-raw/wiki.test.raw").read_text())[: a.pages]

    # Each stage (one task, one side) is saved as it finishes, so a run that is stopped keeps
    # what it measured and a re-run with the same --work folder continues.
    stage_file = work / f"stages-{a.limit}-{a.pages}-{a.context}.json"
    stages = json.loads(stage_file.read_text()) if stage_file.is_file() else {}

    def save_stages():
        tmp = stage_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stages))
        os.replace(tmp, stage_file)

    lm = None
    order = a.order.split(",")
    for t in order if not a.finish_now else []:
        limit = a.pages if t == "wikitext2" else a.limit
        if f"ours:{t}" not in stages:
            r = evaluate(model, t, limit=limit, context=a.context, use_cache=False,
                         details=True, record=False)
            stages[f"ours:{t}"] = {"tasks": r["tasks"][t], "items": r["items"][t]}
            save_stages()
        if a.skip_peer or f"peer:{t}" in stages:
            continue
        if lm is None:
            model_dir = work / "model-hf-fp32"
            if not (model_dir / "config.json").is_file():  # packed GGUF weights, dequantized
                from pocketlm.formats.export import write_hf

                write_hf(model, model_dir, dtype="fp32", force=True)
            write_lm_eval_tasks(work / "tasks", pages)
            lm = make_hflm(model_dir, a.context, 8)
        stages[f"peer:{t}"] = run_lm_eval_task(lm, work / "tasks", f"local_{t}",
                                               None if t == "wikitext2" else a.limit)
        stages["peer_version"] = __import__("lm_eval").__version__
        if t != "wikitext2":  # same token ids on both sides for every context?
            from pocketlm.evaluate.tasks import load_task

            items = load_task(t).items[: a.limit]
            stages[f"tok:{t}"] = [sum(model.encode(i.context) != lm.tok_encode(i.context)
                                      for i in items), len(items)]
        save_stages()
    if "ours:arc_challenge" not in stages and not a.skip_challenge:
        r = evaluate(model, "arc_challenge", limit=a.limit, context=a.context, use_cache=False,
                     record=False)
        stages["ours:arc_challenge"] = {"tasks": r["tasks"]["arc_challenge"]}
        save_stages()

    if a.timing_items and f"timing:hellaswag:{a.timing_items}" not in stages and not a.finish_now:
        t0 = time.perf_counter()
        r = evaluate(model, "hellaswag", limit=a.timing_items, context=a.context,
                     use_cache=False, record=False)
        stages[f"timing:hellaswag:{a.timing_items}"] = {
            "items": a.timing_items, "seconds": time.perf_counter() - t0,
            "acc": r["tasks"]["hellaswag"]["acc"], "acc_norm": r["tasks"]["hellaswag"]["acc_norm"],
            "acc_norm_stderr": r["tasks"]["hellaswag"]["acc_norm_stderr"]}
        save_stages()
    if "energy" not in stages:
        from pocketlm.evaluate.energy import measure_generation

        stages["energy"] = measure_generation(model.network, new_tokens=64)
        save_stages()

    ours = {"tasks": {t: stages[f"ours:{t}"]["tasks"] for t in order if f"ours:{t}" in stages},
            "items": {t: stages[f"ours:{t}"]["items"] for t in order if f"ours:{t}" in stages}}
    peer = {f"local_{t}": stages[f"peer:{t}"] for t in order if f"peer:{t}" in stages}
    figures: dict = {"model": "smollm2-135m-instruct (Q4_1 GGUF dequantized to fp32)",
                     "limit_items": a.limit, "wikitext_pages": len(pages),
                     "context_tokens": a.context, "threads": torch.get_num_threads(),
                     "tasks": {}}
    if peer:
        figures["peer"] = (f"lm-evaluation-harness {stages.get('peer_version')} (HFLM, "
                           "transformers, fp32, same saved weights)")
        figures["peer_seconds"] = {k: v["seconds"] for k, v in peer.items()}
        toks = [stages[k] for k in stages if k.startswith("tok:")]
        figures["tokenizer_mismatched_contexts"] = sum(x[0] for x in toks)
        figures["tokenizer_compared_contexts"] = sum(x[1] for x in toks)
    missing = [t for t in order if f"ours:{t}" not in stages or (not a.skip_peer and
                                                                  f"local_{t}" not in peer)]
    if missing:
        figures["not_completed"] = missing
    MC = [t for t in MC_TASKS if t in ours["tasks"]]

    rows = []
    for t in MC:
        m = ours["tasks"][t]
        entry = {k: m[k] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                   "acc_bytes", "n", "seconds")}
        p = peer.get(f"local_{t}")
        if p:
            entry["peer"] = {k: p["results"][f"{k},none"] for k in ("acc", "acc_norm", "acc_bytes")}
            ours_ll = [r["ll"] for r in ours["items"][t]]
            peer_ll = [[float(x[0][0]) for x in s] for s in p["samples"]]
            diffs = [abs(a_ - b_) for o, q in zip(ours_ll, peer_ll) for a_, b_ in zip(o, q)]
            entry["max_abs_loglikelihood_diff"] = max(diffs)
            entry["mean_abs_loglikelihood_diff"] = sum(diffs) / len(diffs)
            entry["items_with_different_prediction"] = sum(
                max(range(len(o)), key=o.__getitem__) != max(range(len(q)), key=q.__getitem__)
                for o, q in zip(ours_ll, peer_ll))
            for k in ("acc", "acc_norm", "acc_bytes"):
                entry[f"{k}_diff_points"] = 100 * (entry[k] - entry["peer"][k])
        figures["tasks"][t] = entry
        rows.append([t, 100 * m["acc"], 100 * m["acc_norm"],
                     100 * entry["peer"]["acc"] if p else "-",
                     100 * entry["peer"]["acc_norm"] if p else "-",
                     (f"{entry.get('acc_diff_points', float('nan')):+.2f} / "
                      f"{entry.get('acc_norm_diff_points', float('nan')):+.2f}")])
    wiki_rows = []
    if "wikitext2" in ours["tasks"]:
        w = ours["tasks"]["wikitext2"]
        wentry = {k: w[k] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte",
                                    "token_perplexity", "tokens", "words", "pages", "seconds")}
        wentry["tokens_per_s"] = w["tokens"] / w["seconds"]
        pw = peer.get("local_wikitext2")
        if pw:
            pr = pw["results"]
            wentry["peer"] = {k: pr[f"{k},none"] for k in ("word_perplexity", "byte_perplexity",
                                                           "bits_per_byte")}
            wentry["word_perplexity_diff_percent"] = 100 * (
                w["word_perplexity"] / wentry["peer"]["word_perplexity"] - 1)
            wiki_rows = [
                ["word perplexity", w["word_perplexity"], wentry["peer"]["word_perplexity"],
                 f"{wentry['word_perplexity_diff_percent']:+.4f}"],
                ["bits per byte", w["bits_per_byte"], wentry["peer"]["bits_per_byte"],
                 f"{100 * (w['bits_per_byte'] / wentry['peer']['bits_per_byte'] - 1):+.4f}"]]
        figures["tasks"]["wikitext2"] = wentry

    # Published zero-shot scores beside ours. ARC (Average) needs ARC-Challenge too.
    published_rows, comparison = [], {}
    chal = stages.get("ours:arc_challenge", {}).get("tasks")
    if chal:
        figures["tasks"]["arc_challenge"] = {k: chal[k] for k in (
            "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "seconds")}
    cands = []
    if "hellaswag" in ours["tasks"]:
        hs = ours["tasks"]["hellaswag"]
        timing = stages.get(f"timing:hellaswag:{a.timing_items}")
        if timing:  # more items, a smaller standard error
            hs = {**timing, "n": timing["items"]}
        cands.append(("HellaSwag", PUBLISHED["hellaswag"], hs["acc"], hs["acc_norm"], hs["n"]))
    if "arc_easy" in ours["tasks"] and chal:
        ez = ours["tasks"]["arc_easy"]
        cands.append(("ARC (mean of Easy and Challenge)", PUBLISHED["arc_average"],
                      (ez["acc"] + chal["acc"]) / 2, (ez["acc_norm"] + chal["acc_norm"]) / 2,
                      ez["n"]))
    if "piqa" in ours["tasks"]:
        pq = ours["tasks"]["piqa"]
        cands.append(("PIQA", PUBLISHED["piqa"], pq["acc"], pq["acc_norm"], pq["n"]))
    for name, pub, m_acc, m_norm, n in cands:
        comparison[name] = {"published_percent": pub, "ours_acc_percent": 100 * m_acc,
                            "ours_acc_norm_percent": 100 * m_norm, "items": n,
                            "acc_norm_minus_published_points": 100 * m_norm - pub}
        published_rows.append([name, pub, 100 * m_acc, 100 * m_norm,
                               f"{100 * m_norm - pub:+.1f}", n])
    figures["published"] = {**PUBLISHED, "comparison": comparison}
    figures["energy_decode_batch1"] = stages["energy"]
    timing = stages.get(f"timing:hellaswag:{a.timing_items}")
    if timing:
        figures["hellaswag_timing"] = timing
    if "hellaswag" in ours["tasks"]:
        hs_s = ours["tasks"]["hellaswag"]["seconds"]
        figures["hellaswag_seconds_per_item"] = hs_s / ours["tasks"]["hellaswag"]["n"]
        figures["hellaswag_500_items_estimated_s"] = 500 * figures["hellaswag_seconds_per_item"]
    print(json.dumps(figures, indent=2))
    if a.no_write:
        return
    write_results("evaluate", figures)

    body = [(f"Default model (Q4_1 GGUF, fp32 compute), first {a.limit} items of each task "
            f"(WikiText-2: first {len(pages)} test pages), context {a.context}, "
            f"{torch.get_num_threads()} thread(s); peer: {figures.get('peer', 'not run')}, "
            "reading the same local files through task configs that use its own templates, "
            "preprocessing and metric code.\n"),
            markdown_table(["task", "ours acc %", "ours acc_norm %", "lm-eval acc %",
                            "lm-eval acc_norm %", "diff (points) acc / acc_norm"], rows)]
    if missing:
        body.append(f"\nNot completed in this run: {', '.join(missing)}.")
    if wiki_rows:
        body.append("\n" + markdown_table(["WikiText-2", "ours", "lm-eval", "diff %"], wiki_rows))
    if published_rows:
        body.append("\n" + markdown_table(
            ["vs published (model card)", "published %", "ours acc %", "ours acc_norm %",
             "acc_norm - published", "items"], published_rows))
        body.append(
            "\nSource: " + PUBLISHED["source"] + ". Why they differ: the card's figures are "
            "lighteval runs of the original bf16 weights on the full sets; ours use the Q4_1 GGUF "
            "(4-bit weights, dequantized) on the first items only (standard error about 2.5-3 "
            "points at 300 items), our HellaSwag copy lacks lm-eval's ctx_b capitalisation, and "
            "lighteval's prompts and length normalisation differ from lm-eval's.")
    if "hellaswag" in ours["tasks"]:
        n = ours["tasks"]["hellaswag"]["n"]
        body.append(
            f"\nHellaSwag speed: {n} items in {hs_s:.0f} s ({hs_s / n:.2f} s/item, about "
            f"{500 * hs_s / n / 60:.0f} min per 500 items at this load) on "
            f"{torch.get_num_threads()} thread(s) of a CPU shared with other jobs; lm-eval took "
            f"{figures.get('peer_seconds', {}).get('local_hellaswag', float('nan')):.0f} s for the "
            "same items.")
    if timing:
        body.append(f"\nHellaSwag, {timing['items']} items (one run, `evaluate(..., limit="
                    f"{timing['items']})`): {timing['seconds']:.0f} s = "
                    f"{timing['seconds'] / 60:.1f} min ({timing['seconds'] / timing['items']:.2f} "
                    f"s/item); acc_norm {100 * timing['acc_norm']:.1f} ± "
                    f"{100 * timing['acc_norm_stderr']:.1f} %.")
    e = stages["energy"]
    body.append(f"\nEnergy, decode at batch 1 ({e['tokens']} tokens): "
                f"{e['joules_per_token']:.3f} J/token, "
                f"{e['g_co2_per_1k_tokens']:.3f} g CO2 per 1,000 tokens at "
                f"{e['grid_g_co2_per_kwh']:.0f} g/kWh; method: {e['method']}.")
    append_section("Evaluation vs lm-evaluation-harness", "\n".join(body))


# -- task files: pocketlm vs lm-eval vs our own server ----------------------------------------
TASKFILES = ["banking77", "bitext_intent", "gsm8k"]


def lm_eval_copy(src: Path, folder: Path) -> str:
    """The same YAML for lm-eval: data paths absolute, the task renamed pl_<name>."""
    import yaml

    cfg = yaml.safe_load(src.read_text())
    cfg["task"] = "pl_" + cfg["task"]
    cfg["dataset_kwargs"]["data_files"] = {
        k: str(DATA / v) for k, v in cfg["dataset_kwargs"]["data_files"].items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return cfg["task"]


def peer_items(samples: list[dict], output_type: str) -> dict:
    """lm-eval's logged samples -> per-doc prediction (argmax choice, or generated text)."""
    by_doc = {}
    for s in samples:
        resps = s["resps"]
        if output_type == "multiple_choice":
            by_doc[s["doc_id"]] = max(range(len(resps)), key=lambda i: float(resps[i][0][0]))
        else:
            by_doc[s["doc_id"]] = resps[0][0]
    return by_doc


def _limits(a) -> dict[str, int]:
    """Items per task file: --taskfile-limit, or per task from --taskfile-limits."""
    out = {name: a.taskfile_limit for name in TASKFILES}
    for part in filter(None, (a.taskfile_limits or "").split(",")):
        name, _, n = part.partition("=")
        if name not in out or not n.isdigit():
            raise SystemExit(f"--taskfile-limits {part!r}: write TASK=N with TASK one of "
                             f"{', '.join(TASKFILES)}")
        out[name] = int(n)
    return out


def taskfile_bench(a, model, model_dir: Path) -> None:
    from serve_util import ServerThread

    from pocketlm.evaluate.backends import EndpointLM
    from pocketlm.evaluate.custom import TASKS_DIR
    from pocketlm.evaluate.run import evaluate
    from pocketlm.serve.app import create_app

    work = Path(a.work)
    # one stage file for every item count: a stage is "side:task:items", so runs with other
    # limits (a small smoke, the endpoint's smaller count) add to it instead of replacing it
    stage_file = work / "taskfile-stages.json"
    stages = json.loads(stage_file.read_text()) if stage_file.is_file() else {}

    def save():
        tmp = stage_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stages))
        os.replace(tmp, stage_file)

    if a.report_only:
        taskfile_report(a, stages)
        return
    lm = None
    limits = _limits(a)
    only = set(filter(None, (a.taskfile_only or "").split(","))) or set(TASKFILES)
    for name in TASKFILES:
        if name not in only:
            continue
        n = limits[name]
        src = TASKS_DIR / f"{name}.yaml"
        if f"ours:{name}:{n}" not in stages:
            t0 = time.perf_counter()
            r = evaluate(model, str(src) if name != "gsm8k" else "gsm8k", limit=n,
                         data_dir=DATA, batch_size=a.batch_size, use_cache=False, details=True,
                         record=False)
            (task_name, m), = r["tasks"].items()
            stages[f"ours:{name}:{n}"] = {"metrics": m, "seconds": time.perf_counter() - t0,
                                          "predictions": r["items"][task_name]["predictions"],
                                          "batch_size": a.batch_size}
            save()
        if not a.skip_peer and f"peer:{name}:{n}" not in stages:
            if lm is None:
                lm = make_hflm(model_dir, 4096, a.batch_size)  # the scheduler's row length
            peer_name = lm_eval_copy(src, work / "yaml")
            out = run_lm_eval_task_full(lm, work / "yaml", peer_name, n)
            stages[f"peer:{name}:{n}"] = {**out, "batch_size": a.batch_size}
            stages["peer_version"] = __import__("lm_eval").__version__
            save()
        ne = min(n, a.endpoint_limit) if a.endpoint_limit else n
        if not a.skip_endpoint and f"endpoint:{name}:{ne}" not in stages:
            if f"ours:{name}:{ne}" not in stages:  # the direct run on the same items
                t0 = time.perf_counter()
                r = evaluate(model, str(src) if name != "gsm8k" else "gsm8k", limit=ne,
                             data_dir=DATA, batch_size=a.batch_size, use_cache=False,
                             details=True, record=False)
                (task_name, m), = r["tasks"].items()
                stages[f"ours:{name}:{ne}"] = {
                    "metrics": m, "seconds": time.perf_counter() - t0,
                    "predictions": r["items"][task_name]["predictions"],
                    "batch_size": a.batch_size}
                save()
            with ServerThread(create_app({"default": model}, max_batch=a.batch_size,
                                         max_queue=4 * ne)) as url:
                t0 = time.perf_counter()
                try:
                    r = evaluate(None, str(src) if name != "gsm8k" else "gsm8k", limit=ne,
                                 data_dir=DATA, endpoint=EndpointLM(url, "default",
                                                                    concurrency=a.batch_size),
                                 use_cache=False, details=True, record=False)
                    (task_name, m), = r["tasks"].items()
                    stages[f"endpoint:{name}:{ne}"] = {
                        "metrics": m, "seconds": time.perf_counter() - t0,
                        "predictions": r["items"][task_name]["predictions"],
                        "batch_size": a.batch_size}
                except Exception as e:  # noqa: BLE001 (record why, keep the other tasks)
                    stages[f"endpoint:{name}:{ne}"] = {"error": f"{type(e).__name__}: {e}"}
            save()
    taskfile_report(a, stages)


def _largest(stages: dict, side: str, name: str, within: int | None = None) -> int | None:
    """The largest item count with a finished ``side`` stage of task ``name`` (<= within)."""
    counts = [int(k.rsplit(":", 1)[1]) for k in stages
              if k.startswith(f"{side}:{name}:") and "error" not in stages[k]]
    counts = [c for c in counts if within is None or c <= within]
    return max(counts) if counts else None


def taskfile_report(a, stages: dict) -> None:
    """bench/results/evaluate.json ``taskfiles`` and the BENCHMARKS.md section, from the stages:
    per task the largest item count both pocketlm and lm-eval finished, and the endpoint's
    (largest) count compared with the direct run on the same items."""
    figures = {"model": "smollm2-135m-instruct, its Q4_1 GGUF dequantized to an fp32 HF folder "
                        "(both sides)", "machine_note": SHARED_NOTE,
               "threads": __import__("torch").get_num_threads(), "batch_size": a.batch_size, "peer": stages.get("peer_version"), "tasks": {}}
    rows, ep_rows = [], []
    for name in TASKFILES:
        n = _largest(stages, "peer", name) if not a.skip_peer else None
        n = n if n is not None and f"ours:{name}:{n}" in stages else _largest(stages, "ours", name)
        if n is None:
            continue
        ours, peer = stages[f"ours:{name}:{n}"], stages.get(f"peer:{name}:{n}")
        m = ours["metrics"]
        keys = list(m["shown"])
        bs = ours.get("batch_size", a.batch_size)
        entry = {"n": m["n"], "batch_size": bs, "ours": {k: m[k] for k in keys},
                 "ours_seconds": ours["seconds"]}
        if peer:
            pm = peer["results"]
            entry["peer"] = {k: pm.get(k if "," in k else f"{k},none") for k in keys}
            entry["peer_seconds"] = peer["seconds"]
            entry["metric_diff_points"] = {
                k: 100 * (entry["ours"][k] - entry["peer"][k]) for k in keys
                if entry["peer"][k] is not None}
            by_doc = peer_items(peer["samples"], peer["output_type"])
            same = sum(by_doc.get(i) == p for i, p in enumerate(ours["predictions"]))
            entry["items_identical"] = same
            entry["items_identical_percent"] = 100 * same / len(ours["predictions"])
        figures["tasks"][name] = entry
        for k in keys:
            rows.append([name, m["n"], bs, k, 100 * entry["ours"][k],
                         100 * entry["peer"][k] if peer and entry["peer"][k] is not None else "-",
                         f"{entry.get('items_identical_percent', float('nan')):.1f}",
                         f"{ours['seconds']:.0f}", f"{peer['seconds']:.0f}" if peer else "-"])
        ne = _largest(stages, "endpoint", name)
        ep_err = [stages[k]["error"] for k in stages
                  if k.startswith(f"endpoint:{name}:") and "error" in stages[k]]
        if ne is not None and f"ours:{name}:{ne}" in stages:
            ep, direct = stages[f"endpoint:{name}:{ne}"], stages[f"ours:{name}:{ne}"]
            same = sum(x == y for x, y in zip(ep["predictions"], direct["predictions"]))
            entry["endpoint"] = {
                "n": ne, "metrics": {k: ep["metrics"][k] for k in keys},
                "direct_metrics": {k: direct["metrics"][k] for k in keys},
                "seconds": ep["seconds"], "direct_seconds": direct["seconds"],
                "batch_size": ep.get("batch_size", a.batch_size),
                "items_identical_percent": 100 * same / len(direct["predictions"])}
            for k in keys:
                ep_rows.append([name, ne, entry["endpoint"]["batch_size"], k,
                                100 * direct["metrics"][k], 100 * ep["metrics"][k],
                                f"{entry['endpoint']['items_identical_percent']:.1f}",
                                f"{direct['seconds']:.0f}", f"{ep['seconds']:.0f}"])
        elif ep_err:
            entry["endpoint_error"] = ep_err[0]
    print(json.dumps(figures, indent=2))
    if a.no_write:
        return
    merge_results("evaluate", "taskfiles", figures)
    body = [SHARED_NOTE,
            (f"Task YAMLs shipped in `pocketlm/tasks/` (first N items each), default model "
             f"(fp32), {figures['threads']} thread(s), batch as listed (both sides); peer: lm-eval "
             f"{figures['peer'] or 'not run'} `hf` backend on the same saved weights and the "
             "same YAMLs (max_length 4096, as our scheduler's rows). Predictions compared per "
             "item: argmax choice (multiple choice) or the generated text (GSM8K).\n"),
            markdown_table(["task", "N", "batch", "metric", "ours %", "lm-eval %",
                            "items identical %",
                            "ours s", "lm-eval s"], rows)]
    if ep_rows:
        body += [("\nThe same YAMLs through `--endpoint` against `pocketlm serve` started in "
                  "the bench process (its `/v1/completions`: with `echo` + `logprobs` for the "
                  "choices, plain greedy completions with the stop strings for GSM8K; requests in "
                  "flight = batch), against the direct run on "
                  "the same first N items:\n"),
                 markdown_table(["task", "N", "batch", "metric", "direct %", "endpoint %",
                                 "items identical %", "direct s", "endpoint s"], ep_rows)]
    errs = {k: v["endpoint_error"] for k, v in figures["tasks"].items() if "endpoint_error" in v}
    if errs:
        body.append("\nThrough our server failed: "
                    + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in errs.items()))
    append_section("Task files vs lm-evaluation-harness (and through our server)", "\n".join(body))


def run_lm_eval_task_full(lm, task_dir: Path, task: str, limit: int | None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    tm = TaskManager(include_path=str(task_dir))
    r = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, log_samples=True,
                        bootstrap_iters=0)
    samples = r["samples"][task]
    first_filter = samples[0].get("filter") if samples else None
    samples = [s for s in samples if s.get("filter") == first_filter]
    output_type = r["configs"][task]["output_type"]
    return {"results": {k: v for k, v in r["results"][task].items()
                        if isinstance(v, (int, float))},
            "samples": [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in samples],
            "output_type": output_type, "seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
