"""The benchmark tasks: where their data lives, how each item becomes text, how it is scored.

Formats follow EleutherAI's lm-evaluation-harness (v0.4) task configs, so our numbers can be
checked against it item by item:

- ``hellaswag``: context = ``preprocess(query)``, choices = ``preprocess(ending)``, continuation
  ``" " + choice`` (lm-eval ``hellaswag.yaml`` + ``utils.preprocess``: strip, " [title]" -> ". ",
  drop ``[...]`` tags, collapse double spaces). Our copy of the data was already cleaned this way
  when it was converted, except that lm-eval capitalises ``ctx_b`` and this file cannot (the
  ``ctx_a``/``ctx_b`` split is gone), so a query may differ from lm-eval's in one letter's case.
- ``arc_easy``, ``arc_challenge``: ``"Question: {question}\\nAnswer:"`` + ``" " + choice``
  (lm-eval ``arc_easy.yaml``); gold = ``choices.label.index(answerKey)``.
- ``piqa``: ``"Question: {goal}\\nAnswer:"`` + ``" " + sol`` (lm-eval ``piqa.yaml``).
- ``lambada``: lm-eval ``lambada_openai``: context = all but the last ``" "``-separated word,
  continuation = ``" " + last word``; acc = greedy decoding reproduces it, perplexity =
  ``exp(-mean log-likelihood)``.
- ``wikitext2``: see ``perplexity.py``.

Multiple-choice metrics (lm-eval ``ConfigurableTask.process_results``): ``acc`` = argmax of the
summed log-likelihood; ``acc_norm`` = argmax of log-likelihood / ``len(choice)`` in characters
(what lm-eval computes under that name; the same as bytes for ASCII text); ``acc_bytes`` =
argmax of log-likelihood / UTF-8 bytes of the choice. Standard errors are the sample standard
deviation / sqrt(n), as lm-eval reports them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import InvalidArgument, PocketError


class DataMissing(PocketError):
    """A task's data file is not where it was looked for."""


@dataclass
class Choice:
    """One multiple-choice item: a shared context and its candidate continuations."""

    context: str
    choices: list[str]  # without the leading space; the scorer adds the " " delimiter
    gold: int


@dataclass
class Cloze:
    """One LAMBADA item: a context and the target continuation (with its leading space)."""

    context: str
    target: str


@dataclass
class Loaded:
    """Items read from a task's files, plus the rows that could not be used."""

    items: list
    skipped: int = 0
    first_skipped: str | None = None  # "file:line: reason"
    files: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = f"{where}: {reason}"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "choice", "cloze" or "rolling"
    files: tuple[str, ...]  # relative to the data folder
    expected: str  # the format a user must supply, shown when a file is missing
    description: str


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("wikitext2", "rolling", ("wikitext-2-raw/wiki.test.raw",),
                 "the raw WikiText-2 test file (UTF-8 text, ' = Title = ' headings, "
                 "byte-identical to wikitext-2-raw-v1.zip's wiki.test.raw)",
                 "WikiText-2 raw test: token/word perplexity and bits per byte"),
        TaskSpec("lambada", "cloze", ("lambada/lambada_test.jsonl",),
                 'JSONL, one {"text": "..."} per line (OpenAI\'s lambada_test.jsonl)',
                 "LAMBADA (OpenAI): last-word accuracy and perplexity"),
        TaskSpec("hellaswag", "choice", ("hellaswag/hellaswag_val.jsonl",),
                 'JSONL, one {"query": str, "endings": [4 str], "label": int} per line',
                 "HellaSwag validation: 4-way sentence completion"),
        TaskSpec("arc_easy", "choice", ("arc/arc_easy_test.jsonl",),
                 'JSONL in the allenai/ai2_arc schema: {"question": str, "choices": '
                 '{"text": [...], "label": [...]}, "answerKey": str}',
                 "ARC-Easy test: grade-school science, 3-5 choices"),
        TaskSpec("arc_challenge", "choice", ("arc/arc_challenge_test.jsonl",),
                 'JSONL in the allenai/ai2_arc schema: {"question": str, "choices": '
                 '{"text": [...], "label": [...]}, "answerKey": str}',
                 "ARC-Challenge test: the harder ARC questions"),
        TaskSpec("piqa", "choice", ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
                 'valid.jsonl with {"goal", "sol1", "sol2"} per line, and valid-labels.lst '
                 "with 0 or 1 on the matching line",
                 "PIQA validation: physical commonsense, 2 choices"),
    ]
}


def default_data_dir() -> Path:
    """$POCKETLM_DATA, else the ``shared/data`` folder beside this repository."""
    env = os.environ.get("POCKETLM_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """"a,b" or ["a", "b"] -> task names, in order: built-in names, ``gsm8k``, task-file
    paths (``*.yaml``) and ``ppl:FILE``. Raises InvalidArgument for anything else."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(TASKS)
    from pocketlm.evaluate.custom import GENERATIVE, is_custom

    unknown = [n for n in names if n not in TASKS and not is_custom(n)]
    if unknown or not names:
        known = "\n".join(f"  {t.name:14s} {t.description}" for t in TASKS.values())
        known += "".join(f"\n  {g:14s} (generative, lm-eval's prompt, 5-shot)" for g in GENERATIVE)
        raise InvalidArgument(
            f"unknown task(s) {unknown or names}; known tasks (or 'all'), a task file "
            f"(path ending .yaml) or ppl:FILE:\n{known}"
        )
    return list(dict.fromkeys(names))


def task_paths(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """The files task ``name`` reads; raises DataMissing naming the path and format."""
    spec = TASKS[name]
    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    paths = [base / f for f in spec.files]
    for p in paths:
        if not p.is_file():
            raise DataMissing(
                f"{name}: no data file at {p}. Expected {spec.expected}. Pass --data-dir "
                f"(or set $POCKETLM_DATA) to the folder that holds {spec.files[0]}"
            )
    return paths


# -- lm-eval's text preparation ----------------------------------------------------------
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow ``[title]``/``[step]`` markers and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


# -- loaders -------------------------------------------------------------------------------
def _jsonl(path: Path, loaded: Loaded):
    """(line number, object) for each parseable line; bad lines are counted as skipped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                loaded.skip(f"{path.name}:{n}", f"not valid JSON ({e.msg})")


def _is_str_list(x, min_len: int = 2) -> bool:
    return isinstance(x, list) and len(x) >= min_len and all(isinstance(s, str) and s for s in x)


def load_hellaswag(paths: list[Path]) -> Loaded:
    out = Loaded([], files=[str(p) for p in paths])
    for n, d in _jsonl(paths[0], out):
        where = f"{paths[0].name}:{n}"
        if not isinstance(d, dict) or not isinstance(d.get("query"), str) or not d["query"].strip():
            out.skip(where, "missing or empty 'query'")
        elif not _is_str_list(d.get("endings")):
            out.skip(where, "'endings' must be a list of at least 2 non-empty strings")
        elif not isinstance(d.get("label"), int) or not 0 <= d["label"] < len(d["endings"]):
            out.skip(where, f"'label' must index 'endings', got {d.get('label')!r}")
        else:
            out.items.append(Choice(hellaswag_preprocess(d["query"]),
                                    [hellaswag_preprocess(e) for e in d["endings"]], d["label"]))
    return out


def load_arc(paths: list[Path]) -> Loaded:
    out = Loaded([], files=[str(p) for p in paths])
    for n, d in _jsonl(paths[0], out):
        where = f"{paths[0].name}:{n}"
        ch = d.get("choices") if isinstance(d, dict) else None
        if not isinstance(d, dict) or not isinstance(d.get("question"), str):
            out.skip(where, "missing 'question'")
        elif not isinstance(ch, dict) or not _is_str_list(ch.get("text")) or not isinstance(
            ch.get("label"), list
        ) or len(ch["label"]) != len(ch["text"]):
            out.skip(where, "'choices' must be {'text': [...], 'label': [...]} of equal length")
        elif d.get("answerKey") not in ch["label"]:
            out.skip(where, f"answerKey {d.get('answerKey')!r} is not one of {ch['label']}")
        else:
            out.items.append(Choice(qa_prompt(d["question"]), list(ch["text"]),
                                    ch["label"].index(d["answerKey"])))
    return out


def load_piqa(paths: list[Path]) -> Loaded:
    out = Loaded([], files=[str(p) for p in paths])
    labels = paths[1].read_text(encoding="utf-8", errors="replace").splitlines()
    rows = list(_jsonl(paths[0], out))
    if len(labels) != len(rows) + out.skipped:
        raise InvalidArgument(
            f"piqa: {paths[1]} has {len(labels)} labels but {paths[0]} has "
            f"{len(rows) + out.skipped} rows; the two files must match line for line"
        )
    for n, d in rows:
        where = f"{paths[0].name}:{n}"
        label = labels[n - 1].strip()
        fields = ("goal", "sol1", "sol2")
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in fields):
            out.skip(where, "needs string fields 'goal', 'sol1' and 'sol2'")
        elif not d["sol1"] or not d["sol2"]:
            out.skip(where, "an empty solution")
        elif label not in ("0", "1"):
            out.skip(where, f"label {label!r} on line {n} of {paths[1].name} is not 0 or 1")
        else:
            out.items.append(Choice(qa_prompt(d["goal"]), [d["sol1"], d["sol2"]], int(label)))
    return out


def load_lambada(paths: list[Path]) -> Loaded:
    out = Loaded([], files=[str(p) for p in paths])
    for n, d in _jsonl(paths[0], out):
        text = d.get("text") if isinstance(d, dict) else None
        if not isinstance(text, str) or " " not in text.strip():
            out.skip(f"{paths[0].name}:{n}", "needs a 'text' string of at least two words")
            continue
        words = text.split(" ")  # lm-eval splits on single spaces, not on any whitespace
        if not words[-1] or not " ".join(words[:-1]):
            out.skip(f"{paths[0].name}:{n}", "the text ends (or starts) with a space")
            continue
        out.items.append(Cloze(" ".join(words[:-1]), " " + words[-1]))
    return out


def load_wikitext(paths: list[Path]) -> Loaded:
    from pocketlm.evaluate.perplexity import wikitext_pages

    text = paths[0].read_text(encoding="utf-8", errors="replace")
    return Loaded(wikitext_pages(text), files=[str(paths[0])])


LOADERS = {
    "wikitext2": load_wikitext,
    "lambada": load_lambada,
    "hellaswag": load_hellaswag,
    "arc_easy": load_arc,
    "arc_challenge": load_arc,
    "piqa": load_piqa,
}


def load_task(name: str, data_dir: str | Path | None = None) -> Loaded:
    """Read task ``name``'s items. Raises InvalidArgument (unknown task) or DataMissing."""
    parse_tasks([name])
    return LOADERS[name](task_paths(name, data_dir))
