"""``report(models, out)``: one page comparing models on size, quality, speed, memory, energy.

Each model is measured in fresh child processes of its own: one loads it and runs
``pocketlm.engine.bench.bench`` only, and its peak RSS (``VmHWM``, which a spawned process
starts afresh) is the report's memory column, so neither another model nor the evaluation's
batches of logits set it; another runs ``evaluate`` (cached per item, so a re-run is quick)
and ``energy.measure_generation``. One model's caches never flatter the next.

Output folder: ``report.md``, ``report.html``, ``report.json``, and the Pareto plots
``pareto_size.png`` (quality vs size on disk) and ``pareto_speed.png`` (quality vs decode
speed). Quality is the mean ``acc_norm`` of the multiple-choice tasks run, and WikiText-2 word
perplexity when it was run.
"""

from __future__ import annotations

import html
import json
import math
import multiprocessing as mp
import os
from datetime import UTC, datetime
from pathlib import Path

from pocketlm.errors import PocketError

CHOICE_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa")


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_speed_memory(name: str, threads) -> dict:
    """Load one model and time it, nothing else (run in a fresh child of its own).

    The peak RSS is this load and bench alone: no other model, and none of the evaluation's
    batches of logits, which would otherwise set the process's high-water mark.
    """
    from pocketlm.api import load
    from pocketlm.engine.bench import bench, peak_rss_bytes

    m = load(name, threads=threads)
    speed = bench(m.network, prompt_lengths=(128,), new_tokens=32)
    return {"prefill_tokens_per_s": speed["prefill_tokens_per_s"],
            "decode_tokens_per_s": speed["decode_tokens_per_s"],
            "weight_bytes": speed["weight_bytes"], "threads": speed["threads"],
            "peak_rss_bytes": peak_rss_bytes()}


def measure_quality(name: str, tasks: list[str], limit: int | None, sample: int | None,
                    pages: int, context: int, batch_size: int, data_dir, grid, threads) -> dict:
    """Quality and energy of one model (run in a child process of its own)."""
    from pocketlm.api import load, resolve
    from pocketlm.evaluate.energy import measure_generation
    from pocketlm.evaluate.run import evaluate

    path = resolve(name)
    m = load(name, threads=threads)
    label = Path(name).name if Path(name).expanduser().exists() else name
    row = {"model": name, "label": label, "card_name": m.card.name, "path": str(path),
           "disk_bytes": disk_bytes(path), "params": m.config.n_params}
    quality = {}
    for t in tasks:
        wiki = t == "wikitext2"
        r = evaluate(m, t, limit=pages if wiki else limit, sample=None if wiki else sample,
                     context=context, batch_size=batch_size, data_dir=data_dir, progress=False,
                     record=False)
        (metrics,) = r["tasks"].values()  # a task file's results are under its task: name
        quality[t] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    row["quality"] = quality
    energy = measure_generation(m.network, new_tokens=32, grid_g_per_kwh=grid)
    row["joules_per_token"] = energy["joules_per_token"]
    row["g_co2_per_1k_tokens"] = energy["g_co2_per_1k_tokens"]
    row["energy_method"] = energy["method"]
    return row


def measure_model(name: str, tasks: list[str], limit: int | None, sample: int | None,
                  pages: int, context: int, batch_size: int, data_dir, grid, threads) -> dict:
    """Everything the report shows for one model: speed and memory in one fresh child,
    quality and energy in another, so the peak RSS is the model's own."""
    row = _measure_isolated(measure_quality, (name, tasks, limit, sample, pages, context,
                                              batch_size, data_dir, grid, threads))
    row.update(_measure_isolated(measure_speed_memory, (name, threads)))
    return row


def _child(fn, args, conn):
    try:
        conn.send(("ok", fn(*args)))
    except Exception as e:  # noqa: BLE001 - the parent must always get an answer, never hang
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _measure_isolated(fn, args) -> dict:
    """``fn(*args)`` in a fresh spawned interpreter; its result (a PocketError if it failed)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(fn, args, child))
    p.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:  # killed (out of memory, a signal) before it could answer
        status, payload = "error", f"the child process died (exit status {p.exitcode})"
    p.join()
    if status != "ok":
        raise PocketError(f"measuring {args[0]} failed: {payload}")
    return payload


def mean_accuracy(row: dict) -> float | None:
    vals = [row["quality"][t]["acc_norm"] for t in CHOICE_TASKS if t in row["quality"]]
    return 100 * sum(vals) / len(vals) if vals else None


def mean_accuracy_stderr(row: dict) -> float:
    """Standard error of ``mean_accuracy`` (the tasks' errors combined as independent)."""
    ses = [row["quality"][t]["acc_norm_stderr"] for t in CHOICE_TASKS if t in row["quality"]]
    return 100 * math.sqrt(sum(se * se for se in ses)) / len(ses) if ses else 0.0


def pareto(points: list[tuple[float, float]], x_better: str) -> list[int]:
    """Indices of points no other point beats on both axes (y: higher is better)."""
    def beats(a, b):
        ax, ay = a
        bx, by = b
        x_ok = ax <= bx if x_better == "lower" else ax >= bx
        return x_ok and ay >= by and (ax, ay) != (bx, by)

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def plot(rows: list[dict], x_key: str, x_label: str, x_better: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if any(mean_accuracy(r) is not None for r in rows):
        panels.append(("mean acc_norm over " + ", ".join(
            t for t in CHOICE_TASKS if t in rows[0]["quality"]) + " (%)  ↑", mean_accuracy,
            mean_accuracy_stderr))
    if all("wikitext2" in r["quality"] for r in rows):
        panels.append(("WikiText-2 word perplexity  ↓ (axis flipped: up is better)",
                       lambda r: r["quality"]["wikitext2"]["word_perplexity"], None))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, fn, err) in zip(axes[0], panels):
        xs = [x_key(r) for r in rows]
        ys = [fn(r) for r in rows]
        flip = "perplexity" in label
        front = pareto([(x, -y if flip else y) for x, y in zip(xs, ys)], x_better)
        for i, (x, y, r) in enumerate(zip(xs, ys, rows)):
            on = i in front
            if err is not None:
                ax.errorbar([x], [y], yerr=[err(r)], color=colors[i % len(colors)], capsize=4,
                            linewidth=1, alpha=0.6, zorder=2)
            ax.scatter([x], [y], s=90 if on else 55, color=colors[i % len(colors)],
                       edgecolor="black" if on else "none", linewidth=1.2, zorder=3,
                       label=r["model"])
            ax.annotate(r["label"], (x, y), textcoords="offset points",
                        xytext=(7, 6), fontsize=9)
        if len(front) > 1:
            pts = sorted((xs[i], ys[i]) for i in front)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="gray", linewidth=1,
                    zorder=2, label="Pareto front")
        if flip:
            ax.invert_yaxis()
        ax.set_xlabel(x_label)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        lo, hi = min(xs), max(xs)
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.15, 1.0)
        ax.set_xlim(lo - pad, hi + pad * 2)
        spread = [err(r) for r in rows] if err is not None else [0.0] * len(rows)
        ylo = min(y - e for y, e in zip(ys, spread))
        yhi = max(y + e for y, e in zip(ys, spread))
        ypad = (yhi - ylo) * 0.2 or max(abs(yhi) * 0.05, 0.5)
        ax.set_ylim((yhi + ypad, ylo - ypad) if flip else (ylo - ypad, yhi + ypad))
    fig.suptitle(title + "   (outlined: on the Pareto front; bars: ± 1 standard error)",
                 fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def _task_label(t: str) -> str:
    """A task's column name: a task file (path/to/bitext_intent.yaml) by its file's stem."""
    return Path(t).stem if t.endswith((".yaml", ".yml")) else t


def _table(rows: list[dict], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "size on disk (MB)", "params (M)"]
    for t in tasks:
        header.append("WikiText-2 word ppl ↓" if t == "wikitext2" else
                      "LAMBADA acc %" if t == "lambada" else f"{_task_label(t)} acc_norm %")
    header += ["prefill tok/s", "decode tok/s", "peak RSS (MiB)", "J/token", "g CO2/1k tok"]
    out = []
    for r in rows:
        line = [r["label"], f"{r['disk_bytes'] / 1e6:.1f}",
                f"{r['params'] / 1e6:.3g}"]
        for t in tasks:
            q = r["quality"][t]
            if t == "wikitext2":
                line.append(f"{q['word_perplexity']:.2f}")
            else:
                k = "acc" if t == "lambada" else "acc_norm"
                line.append(f"{100 * q[k]:.1f} ± {100 * q.get(k + '_stderr', math.nan):.1f}")
        line += [f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                 f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['joules_per_token']:.3f}",
                 f"{r['g_co2_per_1k_tokens']:.4f}"]
        out.append(line)
    return header, out


def report(
    models: list[str],
    out: str | Path = "report",
    tasks: str | list[str] = "wikitext2,hellaswag,arc_easy,piqa",
    limit: int | None = None,
    sample: int | None = None,
    pages: int = 4,
    context: int = 1024,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    grid_g_per_kwh: float | None = None,
    threads: int | None = None,
) -> Path:
    """Measure every model and write the comparison page into ``out``; returns the folder.

    The first ``limit`` items of each task but WikiText-2 (200 when neither ``limit`` nor
    ``sample`` is given), or ``sample`` items spread evenly over each (``evaluate``'s
    ``sample``: for task files sorted by label); ``pages`` WikiText-2 pages. Raises
    InvalidArgument (unknown task, both ``limit`` and ``sample``), ModelNotFound,
    DataMissing, or PocketError naming the model whose measurement failed.
    """
    from pocketlm.errors import InvalidArgument
    from pocketlm.evaluate import custom
    from pocketlm.evaluate.energy import WORLD_GRID_G_PER_KWH
    from pocketlm.evaluate.tasks import parse_tasks, task_paths

    if limit is not None and sample is not None:
        raise InvalidArgument(f"report: limit {limit} and sample {sample}: give one (limit: "
                              "the first N items; sample: N spread over each task)")
    for k, v in (("limit", limit), ("sample", sample)):
        if v is not None and v < 1:
            raise InvalidArgument(f"report: {k} must be at least 1, got {v}")
    if sample is None and limit is None:
        limit = 200
    names = parse_tasks(tasks)
    for t in names:  # missing data or a bad task file fails before any model loads
        if not custom.is_custom(t):
            task_paths(t, data_dir)
        elif not t.startswith("ppl:"):
            custom.load(t, data_dir, False, None, 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure_model(m, names, limit, sample, pages, context, batch_size, data_dir,
                          grid_g_per_kwh, threads) for m in models]
    grid = WORLD_GRID_G_PER_KWH if grid_g_per_kwh is None else grid_g_per_kwh

    plot(rows, lambda r: r["disk_bytes"] / 1e6, "size on disk (MB)  ← smaller is better", "lower",
         out / "pareto_size.png", "Quality vs size")
    plot(rows, lambda r: r["decode_tokens_per_s"], "decode speed, batch 1 (tokens/s)  → faster",
         "higher", out / "pareto_speed.png", "Quality vs decode speed")
    header, table = _table(rows, names)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    subset = (f"{sample} items spread evenly over each task" if sample else
              f"the first {limit} items of each task")
    settings = (f"{subset}, {pages} WikiText-2 test pages, "
                f"context up to {context} tokens; speed: 128-token prefill and 32 decode steps on "
                f"{rows[0]['threads']} thread(s); energy: {rows[0]['energy_method']}, grid "
                f"{grid:.0f} g CO2/kWh. Accuracies are ± one standard error.")

    md = [f"# pocketlm report\n\n_{when}_\n\n{settings}\n",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in table]
    md += ["", "![quality vs size](pareto_size.png)", "",
           "![quality vs decode speed](pareto_speed.png)", ""]
    _write(out / "report.md", "\n".join(md))

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in table)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pocketlm report</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ddd; padding: .35rem .6rem; text-align: right; }}
th {{ background: #f4f4f4; }} td:first-child, th:first-child {{ text-align: left; }}
tr:nth-child(even) td {{ background: #fafafa; }}
img {{ max-width: 100%; border: 1px solid #eee; margin: .5rem 0; }}
.note {{ color: #555; }}
</style></head><body>
<h1>pocketlm report</h1><p class="note">{html.escape(when)}<br>{html.escape(settings)}</p>
<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>
<h2>Quality vs size</h2><img src="pareto_size.png" alt="quality vs size">
<h2>Quality vs decode speed</h2><img src="pareto_speed.png" alt="quality vs decode speed">
</body></html>
"""
    _write(out / "report.html", page)
    _write(out / "report.json", json.dumps({"settings": settings, "models": rows}, indent=2))
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
