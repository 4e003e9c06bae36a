"""Running lm-eval task files (``taskfile.py``), GSM8K and ``ppl:FILE`` on a backend.

Every item's raw result (log-likelihoods, or the generated text) is cached as soon as its
batch finishes, so a long run resumes; metrics are computed from the cached rows, so a
changed filter or metric never needs the model again.
"""

from __future__ import annotations

import math
from pathlib import Path

from pocketlm.errors import InvalidArgument
from pocketlm.evaluate.taskfile import TaskFile, apply_filter, exact_match, load_taskfile

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
GENERATIVE = {"gsm8k": TASKS_DIR / "gsm8k.yaml"}  # built-in tasks written as task files


def is_custom(name: str) -> bool:
    return name in GENERATIVE or name.startswith("ppl:") or name.endswith((".yaml", ".yml"))


def _stderr(xs: list[float]) -> float:
    from pocketlm.evaluate.run import _stderr

    return _stderr(xs)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


# -- task files ---------------------------------------------------------------------------------
def load(name: str, data_dir, trust_code: bool, num_fewshot: int | None, limit: int | None,
         sample: int | None = None):
    if name.startswith("ppl:"):
        return PplTask(name[4:])
    path = GENERATIVE.get(name, name)
    if data_dir is None:
        from pocketlm.evaluate.tasks import default_data_dir

        data_dir = default_data_dir()
    return load_taskfile(path, data_dir, trust_code=trust_code, num_fewshot=num_fewshot,
                         limit=limit, sample=sample)


def run_taskfile(lm, task: TaskFile, cache, bar, batch_size: int) -> None:
    """Compute every request not yet in ``cache``; rows {"i", "ll": [...], "greedy": [...]}
    or {"i", "text"}."""
    todo = [i for i, r in enumerate(task.requests) if r is not None and i not in cache.done]
    bar.update(len(task.requests) - len(todo))
    if task.output_type == "generate_until":
        def done(i, text):
            cache.add([{"i": i, "text": text}])
            bar.update(1)

        lm.generate({i: task.requests[i].context for i in todo}, task.until, task.max_gen_toks,
                    done)
        return
    if task.output_type == "loglikelihood_rolling":
        for i in todo:
            text = task.requests[i].text
            ll, n = rolling_ll(lm, text)
            cache.add([{"i": i, "ll": ll, "tokens": n, "words": len(_words(text)),
                        "bytes": len(text.encode("utf-8"))}])
            bar.update(1)
        return
    # longest first: a truthful ETA, and similar lengths share a batch
    todo.sort(key=lambda i: -len(task.requests[i].context) - max(
        len(c) for c in task.requests[i].continuations))
    for s in range(0, len(todo), batch_size):
        batch = todo[s : s + batch_size]
        out = lm.loglikelihood([(task.requests[i].context, task.requests[i].continuations)
                                for i in batch])
        cache.add([{"i": i, "ll": [x[0] for x in o], "greedy": [x[1] for x in o]}
                   for i, o in zip(batch, out)])
        bar.update(len(batch))


def _words(text: str) -> list[str]:
    import re

    return re.split(r"\s+", text)


def rolling_ll(lm, text: str) -> tuple[float, int]:
    """Summed log-likelihood of a whole text (lm-eval's loglikelihood_rolling) and its tokens."""
    from pocketlm.evaluate.backends import EndpointLM
    from pocketlm.evaluate.run import prefix_token

    if isinstance(lm, EndpointLM):
        vals, n = lm.text_logprobs(text)
        return sum(vals), n
    ids = lm.tokenizer.encode(text)
    if not ids:
        return 0.0, 0
    full = [prefix_token(lm.tokenizer)] + ids
    return sum(lm.token_logprobs(full, [False] + [True] * len(ids))), len(ids)


def taskfile_metrics(task: TaskFile, rows: dict[int, dict]) -> dict:
    """lm-eval's per-item metrics and their means and standard errors, plus per-item
    predictions under ``"predictions"`` (what the agreement check compares)."""
    ids = [i for i, r in enumerate(task.requests) if r is not None]
    out: dict = {}
    preds = []
    if task.output_type == "loglikelihood_rolling":
        rs = [rows[i] for i in ids]
        ll = sum(r["ll"] for r in rs)
        words, nbytes, toks = (sum(r[k] for r in rs) for k in ("words", "bytes", "tokens"))
        out = {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
               "bits_per_byte": -ll / nbytes / math.log(2),
               "token_perplexity": math.exp(-ll / max(toks, 1)), "tokens": toks}
        return out | {"shown": [m["metric"] for m in task.metrics] + ["token_perplexity"]}
    shown = []
    for m in task.metrics:
        name = m["metric"]
        for fname, steps in task.filters:
            key = name if fname == "none" else f"{name},{fname}"
            vals = []
            for i in ids:
                req, r = task.requests[i], rows[i]
                if task.output_type == "multiple_choice":
                    lls = r["ll"]
                    if name == "acc":
                        pick = _argmax(lls)
                    else:  # acc_norm: per character of the choice, without the delimiter
                        pick = _argmax([x / len(c) for x, c in zip(lls, req.choices)])
                    vals.append(float(pick == req.target))
                elif task.output_type == "loglikelihood":
                    vals.append(float(r["greedy"][0]) if name == "acc" else r["ll"][0])
                else:
                    pred = apply_filter(steps, r["text"])
                    vals.append(exact_match(pred, str(req.target), m))
            if name == "perplexity":
                out[key] = math.exp(-_mean(vals))
            else:
                out[key], out[f"{key}_stderr"] = _mean(vals), _stderr(vals)
            shown.append(key)
    for i in ids:
        r = rows[i]
        if task.output_type == "multiple_choice":
            preds.append(_argmax(r["ll"]))
        elif task.output_type == "generate_until":
            preds.append(r["text"])
        else:
            preds.append(r["ll"][0])
    return out | {"shown": shown, "predictions": preds}


# -- ppl:FILE -----------------------------------------------------------------------------------
class PplTask:
    """Perplexity on any file the training data loader reads: plain text (documents split at
    blank lines), JSONL or CSV with text, prompt/response or messages columns. Text records
    are scored whole; the others on the tokens training would learn (the responses)."""

    output_type = "ppl"

    def __init__(self, path: str):
        from pocketlm.train.data import read_records

        if not path:
            raise InvalidArgument("ppl: needs a file, e.g. --tasks ppl:notes.txt")
        self.path = Path(path).expanduser()
        self.fmt, self.records = read_records(self.path)
        self.name = f"ppl:{self.path.name}"
        self.skipped, self.first_skipped = 0, None
        self.files = [str(self.path)]
        import hashlib

        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]

    def __len__(self) -> int:
        return len(self.records)


def run_ppl(lm, task: PplTask, cache, bar) -> None:
    from pocketlm.evaluate.backends import EndpointLM
    from pocketlm.train.data import encode_record

    todo = [i for i in range(len(task.records)) if i not in cache.done]
    bar.update(len(task.records) - len(todo))
    for i in todo:
        rec = task.records[i]
        if "text" in rec:
            text = rec["text"]
            ll, n = rolling_ll(lm, text)
        elif isinstance(lm, EndpointLM):
            raise InvalidArgument(f"{task.path}: through --endpoint, ppl: scores text files only "
                                  "(prompt/response records need the model's tokenizer)")
        else:
            enc = encode_record(rec, lm.tokenizer)
            ids, mask = list(enc.ids), list(enc.target)
            vals = lm.token_logprobs(ids, mask) if len(ids) > 1 else []
            n = len(vals)
            ll = sum(vals)
            text = lm.tokenizer.decode([t for t, m in zip(ids, mask) if m])
        cache.add([{"i": i, "ll": ll, "tokens": n, "words": len(_words(text.strip())),
                    "bytes": len(text.encode("utf-8"))}])
        bar.update(1)


def ppl_metrics(rows: list[dict]) -> dict:
    ll = sum(r["ll"] for r in rows)
    toks, words, nbytes = (sum(r[k] for r in rows) for k in ("tokens", "words", "bytes"))
    if toks == 0:
        raise InvalidArgument("the file has no tokens to score")
    return {"token_perplexity": math.exp(-ll / toks), "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / nbytes), "bits_per_byte": -ll / nbytes / math.log(2),
            "loglikelihood": ll, "tokens": toks, "words": words, "bytes": nbytes,
            "shown": ["token_perplexity", "word_perplexity", "bits_per_byte"]}
