"""``evaluate(model, tasks)``: run the tasks, cache every item, aggregate, record on the card.

    >>> import pocketlm
    >>> from pocketlm.evaluate import evaluate
    >>> m = pocketlm.load("smollm2-135m-instruct")
    >>> r = evaluate(m, "hellaswag,arc_easy", limit=100)   # the first 100, as lm-eval --limit
    >>> r["tasks"]["hellaswag"]["acc_norm"]
    >>> r = evaluate(m, "pocketlm/tasks/bitext_intent.yaml", sample=100)  # 100 spread evenly

Each scored item is appended to a cache file (JSON lines) as soon as its batch finishes; a run
that is interrupted and started again with the same model and settings picks up where it
stopped. The cache is keyed by a fingerprint of the weights and tokenizer, the task and the
settings that change scores (context window and stride), so a changed model never reuses
stale numbers. A ``sample`` run keeps its items in a file of its own (``-sampleNofM``): its row
numbers count the sampled items, so they never mix with a full or ``limit`` run's.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from pocketlm.errors import InvalidArgument
from pocketlm.evaluate import perplexity, scoring
from pocketlm.evaluate.taskfile import spread
from pocketlm.evaluate.tasks import TASKS, Choice, load_task, parse_tasks

log = logging.getLogger(__name__)

TASK_VERSION = 1  # bump when a format or metric changes, so old caches are not reused


# -- model identity and the per-item cache -----------------------------------------------------
def fingerprint(model) -> str:
    """A short hash of the weights (exact per-tensor sums), shapes, dtype and tokenizer."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.network.state_dict().items():
            t64 = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{t64.sum().item():.12e}"
                     f"{t64.abs().sum().item():.12e}{t64.flatten()[:16].tolist()}".encode())
    tok = model.tokenizer
    h.update(f"{tok.vocab_size}{tok.bos_id}{tok.eos_id}".encode())
    h.update(json.dumps(tok.encode("The 12 quick brown foxes ½ jumped\n\n3 times."),).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    from pocketlm.formats.registry import home

    return home() / "eval-cache"


class ItemCache:
    """Append-only JSON-lines file of {"i": index, ...result} per finished item."""

    def __init__(self, path: Path | None):
        self.path = path
        self.done: dict[int, dict] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.done[int(row["i"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut short by an interruption: that item is redone
        self._f = None

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.done[r["i"]] = r
        if self.path is None:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._f.write("".join(json.dumps(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# -- turning text into scorer requests ---------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation,
    the whole string is encoded once and split after the context's own token count."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def prefix_token(tokenizer) -> int:
    """The token an empty context (and each WikiText page) is conditioned on: BOS, else EOS."""
    tid = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tid is None:
        raise InvalidArgument("the tokenizer has neither a BOS nor an EOS token to start from")
    return tid


def _request(tokenizer, context: str, continuations: list[str], window: int):
    """Token ids for one item: (context_ids, [continuation_ids]), fitted into ``window``.

    As in lm-eval, the model sees ``(context + continuation)[-(window + 1):][:-1]``: a long
    context loses its oldest tokens. Every choice shares the context encoding (lm-eval encodes
    the context on its own too), so it is computed once per item.
    """
    pairs = [encode_pair(tokenizer, context, c) if context else None for c in continuations]
    if not context:
        ctx = [prefix_token(tokenizer)]
        conts = [tokenizer.encode(c) for c in continuations]
    else:
        ctx = pairs[0][0]
        conts = [p[1] for p in pairs]
    if any(not c for c in conts):
        raise ValueError("a continuation encodes to no tokens")
    longest = max(len(c) for c in conts)
    if longest > window:
        raise ValueError(f"a continuation of {longest} tokens is longer than the window {window}")
    keep = window + 1 - longest
    return ctx[-keep:], conts


def _stderr(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like numpy


def choice_metrics(items: list[Choice], rows: list[dict]) -> dict:
    """acc, acc_norm (per character), acc_bytes (per UTF-8 byte) and their standard errors."""
    acc, norm, byt = [], [], []
    for item, r in zip(items, rows):
        lls = r["ll"]
        acc.append(float(_argmax(lls) == item.gold))
        norm.append(float(_argmax([x / len(c) for x, c in zip(lls, item.choices)]) == item.gold))
        byt.append(float(_argmax([x / len(c.encode()) for x, c in zip(lls, item.choices)])
                         == item.gold))
    out = {}
    for k, v in (("acc", acc), ("acc_norm", norm), ("acc_bytes", byt)):
        out[k] = sum(v) / len(v) if v else float("nan")
        out[f"{k}_stderr"] = _stderr(v)
    return out


def cloze_metrics(rows: list[dict]) -> dict:
    acc = [float(r["greedy"]) for r in rows]
    lls = [r["ll"] for r in rows]
    return {
        "acc": sum(acc) / len(acc) if acc else float("nan"),
        "acc_stderr": _stderr(acc),
        "perplexity": math.exp(-sum(lls) / len(lls)) if lls else float("nan"),
    }


# -- the runners -------------------------------------------------------------------------------
def _progress(total: int, desc: str, unit: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, dynamic_ncols=True,
                smoothing=0.1)


def _run_items(model, name, items, cache, window, batch_size, show):
    """Score choice/cloze items not yet in the cache, batching items of similar length."""
    tok = model.tokenizer
    todo = [i for i in range(len(items)) if i not in cache.done]
    reqs = {}
    for i in todo:
        it = items[i]
        conts = [" " + c for c in it.choices] if isinstance(it, Choice) else [it.target]
        reqs[i] = _request(tok, it.context, conts, window)
    # Longest first: the slowest batches come early (a truthful ETA), and similar lengths
    # share a batch so little compute goes to padding.
    todo.sort(key=lambda i: -(len(reqs[i][0]) + max(len(c) for c in reqs[i][1])))
    bar = _progress(len(items), name, "item", show)
    bar.update(len(items) - len(todo))
    try:
        for s in range(0, len(todo), batch_size):
            batch = todo[s : s + batch_size]
            scored = scoring.score_choices(model.network, [reqs[i] for i in batch])
            rows = []
            for i, sc in zip(batch, scored):
                if isinstance(items[i], Choice):
                    rows.append({"i": i, "ll": [x.logprob for x in sc],
                                 "tokens": [x.n_tokens for x in sc]})
                else:
                    rows.append({"i": i, "ll": sc[0].logprob, "greedy": sc[0].greedy,
                                 "tokens": sc[0].n_tokens})
            cache.add(rows)
            bar.update(len(batch))
    finally:
        bar.close()


def _run_rolling(model, pages, cache, window, stride, batch_size, show):
    tok = model.tokenizer
    prefix = prefix_token(tok)
    todo = [i for i in range(len(pages)) if i not in cache.done]
    encoded = {i: tok.encode(perplexity.wikitext_detokenizer(pages[i])) for i in todo}
    total = sum(len(v) for v in encoded.values())
    bar = _progress(total, "wikitext2", "tok", show)
    try:
        for i in todo:
            windows = list(perplexity.rolling_windows(encoded[i], prefix, window, stride))
            ll = 0.0
            for s in range(0, len(windows), batch_size):
                chunk = windows[s : s + batch_size]
                ll += sum(x.logprob for x in scoring.score_windows(model.network, chunk))
                bar.update(sum(n for _, n in chunk))
            words, nbytes = perplexity.page_counts(pages[i])
            cache.add([{"i": i, "ll": ll, "tokens": len(encoded[i]), "words": words,
                        "bytes": nbytes}])
    finally:
        bar.close()


def evaluate(*args, **kwargs) -> dict:  # signature and docstring: _evaluate's (below)
    from pocketlm.kernels import fp32_products

    with fp32_products():  # scores as lm-eval's fp32 backend gives them (see kernels)
        return _evaluate(*args, **kwargs)


def _evaluate(
    model,
    tasks: str | list[str] = "wikitext2,lambada,hellaswag,arc_easy,arc_challenge,piqa",
    limit: int | None = None,
    sample: int | None = None,
    batch_size: int = 8,
    context: int = 1024,
    stride: int | None = None,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    record: bool = True,
    details: bool = False,
    trust_task_code: bool = False,
    num_fewshot: int | None = None,
    endpoint=None,
) -> dict:
    """Evaluate ``model`` on ``tasks``; returns {"model", "settings", "tasks": {name: metrics}}.

    ``limit`` takes the first N items of each task (pages for wikitext2), as lm-eval's
    ``--limit`` does: use it to compare item for item with lm-eval. ``sample`` takes N items
    spread evenly over the whole split instead (items ``k * len // N``, k = 0..N-1; no seed,
    so a run is reproducible): use it for a file sorted by label, whose first N items may all
    share one answer (Bitext, Banking77). Task files' few-shot examples are the same for an
    item whichever subset it is in.

    ``context`` is the window in tokens (capped at the model's) and ``stride`` the tokens each
    WikiText window adds (default ``context``: disjoint windows, as lm-eval). Items are cached
    under ``cache_dir`` (default ``$POCKETLM_HOME/eval-cache``) so an interrupted run resumes.
    With ``record`` the metrics are added to ``model.card``; with ``details`` the per-item
    log-likelihoods are returned too, under ``results["items"][task]`` (with each item's
    ``row`` in the split; for a task file, a list ``split_rows``).

    Besides the built-in names, ``tasks`` may hold ``gsm8k`` (generative, 5-shot), paths to
    lm-eval task YAMLs (``taskfile.py``; ``trust_task_code`` allows their ``!function`` hooks,
    ``num_fewshot`` overrides theirs) and ``ppl:FILE`` (perplexity on any text/JSONL/CSV file).
    With ``endpoint`` (a ``backends.EndpointLM``) those run against a server instead, and
    ``model`` may be None.

    Raises InvalidArgument for an unknown task or bad setting (both ``limit`` and ``sample``
    among them), DataMissing for a missing data file (the message names the path and the
    expected format), TaskFileError for a bad task file, EndpointError for an unreachable or
    unsuitable endpoint.
    """
    from pocketlm.evaluate import custom
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise InvalidArgument(f"limit must be at least 1, got {limit}")
    if sample is not None and sample < 1:
        raise InvalidArgument(f"sample must be at least 1, got {sample}")
    if limit is not None and sample is not None:
        raise InvalidArgument(f"limit {limit} and sample {sample}: give one. limit takes the "
                              "first N items (lm-eval's --limit), sample N spread over the split "
                              "(for files sorted by label)")
    if batch_size < 1:
        raise InvalidArgument(f"batch size must be at least 1, got {batch_size}")
    if model is None and endpoint is None:
        raise InvalidArgument("evaluate needs a model or an endpoint")
    builtin = [n for n in names if not custom.is_custom(n)]
    if endpoint is not None and builtin:
        raise InvalidArgument(f"{', '.join(builtin)}: built-in log-likelihood tasks run on a "
                              "local model; through --endpoint run gsm8k, task files (.yaml) "
                              "or ppl:FILE")
    window = min(context, (model.config.max_seq_len if model else 1 << 30) - 1)
    if window < 2:
        raise InvalidArgument(f"context must be at least 2 tokens, got {context}")
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise InvalidArgument(f"stride must be between 1 and the context ({window}), got {stride}")
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if endpoint is not None:
        fp = hashlib.sha256(f"{endpoint.base}|{endpoint.model}".encode()).hexdigest()[:16]
        fp = fp if use_cache else None
        who, dtype = f"{endpoint.model} @ {endpoint.base}", "endpoint"
        endpoint.check()
    else:
        fp = fingerprint(model) if use_cache else None
        who = model.card.name or model.card.source
        dtype = str(model.network.lm_head.weight.dtype).replace("torch.", "")

    results: dict = {
        "model": who,
        "settings": {"context": window, "stride": stride, "limit": limit, "sample": sample,
                     "batch_size": batch_size, "threads": torch.get_num_threads(),
                     "dtype": dtype, "fingerprint": fp},
        "tasks": {},
    }
    # fail on missing data or a bad task file before any work
    loaded = {n: custom.load(n, data_dir, trust_task_code, num_fewshot, limit, sample)
              if custom.is_custom(n) else load_task(n, data_dir) for n in names}
    if any(custom.is_custom(n) for n in names):
        from pocketlm.evaluate.backends import LocalLM

        lm = endpoint or LocalLM(model, window, batch_size)
    for name in names:
        if custom.is_custom(name):
            _run_custom(lm, name, loaded[name], results, cache_root, fp, window, batch_size,
                        progress, details, record, limit, sample, model)
            continue
        data = loaded[name]
        rows_kept, selection = _subset(len(data.items), limit, sample)
        items = [data.items[i] for i in rows_kept]
        if data.skipped:
            log.warning("%s: skipped %d malformed row(s); first: %s", name, data.skipped,
                        data.first_skipped)
        if not items:
            raise InvalidArgument(f"{name}: no usable items in {', '.join(data.files)}")
        key = f"{name}-v{TASK_VERSION}-ctx{window}" + (f"-s{stride}" if name == "wikitext2" else "")
        key += f"-{selection}" if selection else ""
        cache = ItemCache(cache_root / fp / f"{key}.jsonl" if use_cache else None)
        resumed = sum(1 for i in range(len(items)) if i in cache.done)
        t0 = time.perf_counter()
        kind = TASKS[name].kind
        try:
            if kind == "rolling":
                _run_rolling(model, items, cache, window, stride, min(batch_size, 4), progress)
            else:
                _run_items(model, name, items, cache, window, batch_size, progress)
        finally:
            cache.close()
        rows = [cache.done[i] for i in range(len(items))]
        if kind == "rolling":
            metrics = perplexity.perplexity_metrics(rows)
            metrics.update(context=window, stride=stride)
        elif kind == "cloze":
            metrics = cloze_metrics(rows)
        else:
            metrics = choice_metrics(items, rows)
        metrics.update(n=len(items), skipped=data.skipped, first_skipped=data.first_skipped,
                       seconds=time.perf_counter() - t0, resumed_items=resumed)
        results["tasks"][name] = metrics
        if details:
            results.setdefault("items", {})[name] = [r | {"row": j} for r, j in
                                                     zip(rows, rows_kept)]
        if record:
            model.card.add_metric(name, {k: v for k, v in metrics.items() if k != "first_skipped"}
                                  | {"limit": limit, "sample": sample})
    return results


def _subset(total: int, limit: int | None, sample: int | None) -> tuple[list[int], str]:
    """The rows a run keeps, and what the cache key adds for them: "" for the first N (their
    rows are a full run's), "sampleNofM" for a spread sample of N out of M."""
    if sample and sample < total:
        return spread(total, sample), f"sample{sample}of{total}"
    return list(range(total))[: limit or None], ""


def _run_custom(lm, name, task, results, cache_root, fp, window, batch_size, show, details,
                record, limit, sample, model) -> None:
    """One task file, gsm8k or ppl:FILE: run what the cache lacks, then compute metrics."""
    from pocketlm.evaluate import custom

    is_ppl = isinstance(task, custom.PplTask)
    if is_ppl:
        kept, selection = _subset(len(task.records), limit, sample)
        task.records = [task.records[i] for i in kept]
    else:
        kept, selection = task.rows, task.selection
    n = len(task.records) if is_ppl else len(task.requests)
    if task.skipped:
        log.warning("%s: skipped %d row(s); first: %s", name, task.skipped, task.first_skipped)
    key = f"{task.name.replace(':', '_').replace('/', '_')}-{task.digest}-ctx{window}"
    key += f"-{selection}" if selection else ""
    cache = ItemCache(cache_root / fp / f"{key}.jsonl" if fp else None)
    resumed = sum(1 for i in range(n) if i in cache.done)
    t0 = time.perf_counter()
    bar = _progress(n, task.name, "item", show)
    try:
        if is_ppl:
            custom.run_ppl(lm, task, cache, bar)
        else:
            custom.run_taskfile(lm, task, cache, bar, batch_size)
    finally:
        bar.close()
        cache.close()
    if is_ppl:
        metrics = custom.ppl_metrics([cache.done[i] for i in range(n)])
    else:
        metrics = custom.taskfile_metrics(task, cache.done)
    preds = metrics.pop("predictions", None)
    metrics.update(n=n - task.skipped, skipped=task.skipped, first_skipped=task.first_skipped,
                   seconds=time.perf_counter() - t0, resumed_items=resumed, files=task.files)
    results["tasks"][task.name] = metrics
    if details:
        results.setdefault("items", {})[task.name] = {
            "predictions": preds, "rows": [cache.done.get(i) for i in range(n)],
            "split_rows": kept}
    if record and model is not None:
        model.card.add_metric(task.name, {k: v for k, v in metrics.items()
                                          if k not in ("first_skipped", "shown", "files")}
                              | {"limit": limit, "sample": sample})


def save_card(model, folder: str | Path) -> Path:
    """Write ``model.card`` (card.json and its README.md, each temp file + rename) into a
    saved model folder, so the README never lags the metrics just measured."""
    model.card.save(folder, model.config)
    return Path(folder) / "card.json"


evaluate.__doc__ = _evaluate.__doc__
evaluate.__signature__ = inspect.signature(_evaluate)
