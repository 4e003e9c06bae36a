"""``pocketlm eval``, ``pocketlm energy`` and ``pocketlm report``: thin wrappers over the API."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DEFAULT_TASKS = "wikitext2,lambada,hellaswag,arc_easy,arc_challenge,piqa"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def results_table(results: dict) -> str:
    """The printed summary: one line per task and metric, with standard errors."""
    w = max([14] + [len(t) for t in results["tasks"]])
    mw = max([18] + [len(k) for m in results["tasks"].values() for k in m.get("shown", [])])
    lines = [f"{'task':{w}s} {'metric':{mw}s} {'value':>10s}   {'stderr':>8s}   n"]
    for task, m in results["tasks"].items():
        if "shown" in m:
            shown = m["shown"]
        elif "word_perplexity" in m:
            shown = ["word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"]
        elif "perplexity" in m:
            shown = ["acc", "perplexity"]
        else:
            shown = ["acc", "acc_norm", "acc_bytes"]
        for k in shown:
            se = m.get(f"{k}_stderr")
            lines.append(f"{task:{w}s} {k:{mw}s} {_fmt(m[k]):>10s}   "
                         f"{'± ' + _fmt(se) if se is not None else '':>8s}   {m['n']}")
        if m.get("skipped"):
            lines.append(f"{'':{w}s} skipped {m['skipped']} malformed row(s); "
                         f"first: {m['first_skipped']}")
    s = results["settings"]
    subset = (f"sample {s['sample']} spread over each split" if s.get("sample") else
              f"limit {s['limit'] or 'none'}")
    lines.append(f"(context {s['context']} tokens, WikiText stride {s['stride']}, "
                 f"{subset}, {s['threads']} threads, {s['dtype']})")
    return "\n".join(lines)


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def check_subset(a: argparse.Namespace) -> None:
    """--limit and --sample choose the items two different ways: refuse both, before a load."""
    from pocketlm.errors import InvalidArgument

    if a.limit is not None and a.sample is not None:
        raise InvalidArgument(
            f"--limit {a.limit} and --sample {a.sample}: give one. --limit N scores the first N "
            "items (lm-eval's --limit, to compare item for item); --sample N scores N items "
            "spread over the whole split (for data sorted by label, e.g. Bitext, Banking77)")


def cmd_eval(a: argparse.Namespace) -> None:
    from pocketlm.api import resolve
    from pocketlm.cli import load_from_args
    from pocketlm.errors import InvalidArgument
    from pocketlm.evaluate.custom import is_custom
    from pocketlm.evaluate.run import evaluate, save_card
    from pocketlm.evaluate.taskfile import parse_config
    from pocketlm.evaluate.tasks import parse_tasks
    from pocketlm.formats import huggingface as hf_format

    check_subset(a)
    names = parse_tasks(a.tasks)  # an unknown task or a bad task file fails before the load
    for n in names:
        if is_custom(n) and n.endswith((".yaml", ".yml")):
            parse_config(n, a.trust_task_code)
    kw = {"limit": a.limit, "sample": a.sample, "batch_size": a.batch_size, "context": a.context,
          "stride": a.stride, "data_dir": a.data_dir, "cache_dir": a.cache_dir,
          "use_cache": not a.no_cache, "progress": True, "trust_task_code": a.trust_task_code,
          "num_fewshot": a.num_fewshot}
    if a.endpoint:
        from pocketlm.evaluate.backends import EndpointLM

        name = a.served_model or a.model
        if not name:
            raise InvalidArgument("--endpoint needs the served model's name: --model NAME")
        lm = EndpointLM(a.endpoint, name, api_key=a.api_key or os.environ.get("OPENAI_API_KEY"),
                        concurrency=a.batch_size)
        r = evaluate(None, a.tasks, endpoint=lm, **kw)
    else:
        if not a.model:
            raise InvalidArgument("name a MODEL to evaluate (or --endpoint URL --model NAME)")
        m = load_from_args(a)
        r = evaluate(m, a.tasks, **kw)
    print(results_table(r))
    if a.output:
        print(f"wrote {write_json(a.output, r)}")
    if a.endpoint:
        return
    path = resolve(a.model)
    if path.is_dir() and hf_format.is_hf_folder(path):
        print(f"recorded in {save_card(m, path)}")


def cmd_energy(a: argparse.Namespace) -> None:
    from pocketlm.cli import load_from_args
    from pocketlm.evaluate.energy import measure_generation

    m = load_from_args(a)
    r = measure_generation(m.network, new_tokens=a.new_tokens, batch_size=a.batch_size,
                           grid_g_per_kwh=a.grid_intensity, cpu_watts=a.cpu_watts)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{m.card.name}: {r['joules_per_token']:.3f} J/token, "
          f"{r['g_co2_per_1k_tokens']:.4f} g CO2 per 1,000 tokens "
          f"(grid {r['grid_g_co2_per_kwh']:.0f} g/kWh)")
    print(f"method: {r['method']}")


def cmd_report(a: argparse.Namespace) -> None:
    from pocketlm.evaluate.report import report

    check_subset(a)
    out = report(a.models, a.output, tasks=a.tasks, limit=a.limit, sample=a.sample,
                 pages=a.pages, context=a.context, batch_size=a.batch_size, data_dir=a.data_dir,
                 grid_g_per_kwh=a.grid_intensity, threads=a.threads)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'} and the plots in {out}")


def _add_eval_options(p: argparse.ArgumentParser, tasks_default: str,
                      limit_default: str = "all items") -> None:
    p.add_argument("--tasks", default=tasks_default,
                   help=f"comma-separated tasks, or 'all' ({tasks_default}); also gsm8k, "
                        "task files (FILE.yaml) and ppl:FILE")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="the first N items of each task (pages for wikitext2), as lm-eval's "
                        "--limit: use it to compare item for item with lm-eval, on data in no "
                        f"particular order (default: {limit_default})")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="N items spread evenly over each task's split (items k*size/N, no "
                        "seed: the same N gives the same items): use it for data sorted by "
                        "label, such as the Bitext and Banking77 task files, whose first N "
                        "items may all have one answer. Not with --limit")
    p.add_argument("--batch-size", type=int, default=8,
                   help="items scored together; each item's context still runs once (8)")
    p.add_argument("--context", type=int, default=1024,
                   help="window in tokens; longer contexts lose their oldest tokens (1024)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the task data ($POCKETLM_DATA, else ../shared/data)")


def register(sub) -> None:
    from pocketlm.cli import add_model_args
    from pocketlm.evaluate.tasks import TASKS

    known = "\n".join(f"  {t.name:14s} {t.description}" for t in TASKS.values())
    p = sub.add_parser(
        "eval", help="quality on standard benchmarks (lm-eval compatible)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a model on standard benchmarks with the prompt formats and metrics "
                    "of EleutherAI's lm-evaluation-harness, read from local files. Every item "
                    "is cached, so an interrupted run resumes where it stopped. Results print "
                    "as a table, go to -o JSON, and into card.json when MODEL is a saved folder.",
        epilog=f"tasks:\n{known}\n  {'gsm8k':14s} GSM8K test: lm-eval's prompt, 5-shot, greedy, "
               "strict/flexible exact match\n"
               f"  {'FILE.yaml':14s} a task in lm-evaluation-harness's YAML format over local "
               "json/csv/parquet files\n"
               f"  {'ppl:FILE':14s} perplexity and bits per byte on a .txt/.jsonl/.csv file "
               "(the training data formats)\n\n"
               "examples:\n  pocketlm eval smollm2-135m-instruct "
               "--tasks hellaswag,arc_easy --limit 300 -o results.json\n"
               "  pocketlm eval smollm2-135m-instruct --tasks gsm8k --limit 250\n"
               "  pocketlm eval ./my-finetune --tasks pocketlm/tasks/banking77.yaml,ppl:notes.txt\n"
               "  pocketlm eval ./my-finetune --tasks pocketlm/tasks/bitext_intent.yaml "
               "--sample 100\n"
               "  pocketlm eval --endpoint http://127.0.0.1:8000 --model smollm2-135m-instruct "
               "--tasks gsm8k --limit 50\n\n"
               "--limit or --sample: --limit N keeps the first N items, as lm-eval's --limit\n"
               "does (the way to compare with lm-eval item for item); --sample N keeps N spread\n"
               "evenly over the split. Use --sample on data sorted by label: the first 100 rows\n"
               "of the Bitext file are all cancel_order, so with --limit 100 a model that always\n"
               "answers cancel_order scores 100%.\n\n"
               "A task file field pocketlm does not support is refused by name; '!function' "
               "hooks (Python code in the task's folder) need --trust-task-code.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name, .gguf file or model folder (not with --endpoint)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $POCKETLM_THREADS or all cores)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype for the weights (default float32)")
    _add_eval_options(p, DEFAULT_TASKS)
    g = p.add_argument_group("task files and endpoints")
    g.add_argument("--num-fewshot", type=int, default=None,
                   help="override a task file's num_fewshot (examples drawn seeded, as lm-eval)")
    g.add_argument("--trust-task-code", action="store_true",
                   help="allow '!function' hooks in task files: runs their Python code")
    g.add_argument("--endpoint", default=None, metavar="URL",
                   help="evaluate an OpenAI-compatible server instead of a local model "
                        "(/v1/completions; log-likelihood tasks need echo + logprobs)")
    g.add_argument("--model", dest="served_model", default=None, metavar="NAME",
                   help="with --endpoint: the model name the server serves")
    g.add_argument("--api-key", default=None,
                   help="with --endpoint: bearer token ($OPENAI_API_KEY)")
    p.add_argument("--stride", type=int, default=None,
                   help="WikiText: new tokens per window (default = context: disjoint windows, "
                        "as lm-eval); smaller strides give each token more history")
    p.add_argument("-o", "--output", default=None, help="write the results JSON here")
    p.add_argument("--cache-dir", default=None,
                   help="per-item cache for resuming ($POCKETLM_HOME/eval-cache)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "energy", help="joules per generated token and grams of CO2 per 1,000 tokens",
        description="Generate tokens and measure the energy they take: from the CPU's RAPL "
                    "counters when they are readable, else estimated as CPU power x "
                    "utilisation. The output names the method used.")
    add_model_args(p)
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps to measure (128)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded at once (1)")
    p.add_argument("--grid-intensity", type=float, default=None,
                   help="grid carbon intensity in g CO2/kWh (default: world average 475)")
    p.add_argument("--cpu-watts", type=float, default=None,
                   help="for the estimate: the CPU package's power at full load (TDP) in W "
                        "(default: 15 W per core, at most 150 W)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_energy)

    p = sub.add_parser(
        "report", help="compare models: size, quality, speed, memory, energy; plots",
        description="Evaluate and benchmark each MODEL and write report.md, report.html and "
                    "Pareto plots (quality vs size, quality vs decode speed) into a folder.")
    p.add_argument("models", nargs="+", help="model names, .gguf files or model folders")
    p.add_argument("-o", "--output", default="report", help="output folder (report/)")
    _add_eval_options(p, "wikitext2,hellaswag,arc_easy,piqa",
                      "200 unless --sample is given")
    p.add_argument("--pages", type=int, default=4, help="WikiText-2 test pages to score (4)")
    p.add_argument("--grid-intensity", type=float, default=None,
                   help="grid carbon intensity in g CO2/kWh (default: world average 475)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.set_defaults(func=cmd_report)
