"""Tasks written in lm-evaluation-harness's YAML format, read from local data files.

The subset of lm-eval's ``TaskConfig`` that describes a task over local files:

- data: ``dataset_path: json|csv|parquet`` with ``dataset_kwargs: {data_files: ...}`` (a path,
  a list, or ``{split: path}``; a bare path or list is the ``train`` split, as Hugging Face
  ``datasets`` names it); ``test_split``, ``validation_split``, ``training_split``,
  ``fewshot_split``. Relative paths are looked up beside the YAML, then in the data folder.
- prompts: ``doc_to_text``, ``doc_to_target``, ``doc_to_choice`` as a column name, a Jinja2
  template (rendered in a sandbox: a template cannot reach Python), or a literal list of
  choices; ``description``, ``target_delimiter`` (" "), ``fewshot_delimiter`` ("\\n\\n"),
  ``num_fewshot`` (examples drawn with ``random.Random(1234).sample`` from the few-shot
  split, one draw per item in item order, as lm-eval's default sampler does; a subset taken
  with ``limit`` or ``sample`` gives each row the examples a full run gives it).
- ``output_type``: ``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``,
  ``generate_until`` (``generation_kwargs``: ``until``, ``max_gen_toks``, ``do_sample:
  false``, ``temperature: 0``).
- ``filter_list`` with ``regex`` (``regex_pattern``, ``group_select``, ``fallback``),
  ``take_first``, ``lowercase``, ``uppercase`` and ``strip``; ``metric_list`` with ``acc``,
  ``acc_norm``, ``exact_match`` (``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``,
  ``regexes_to_ignore``), ``perplexity``, ``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``.

Any other field is refused by name, never ignored. ``!function module.name`` hooks would run
Python from the task's folder, so they are refused unless the caller passes
``trust_code=True`` (``--trust-task-code``).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import importlib.util
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pocketlm.errors import InvalidArgument, PocketError

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
METRICS = {
    "multiple_choice": {"acc", "acc_norm"},
    "loglikelihood": {"acc", "perplexity"},
    "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "generate_until": {"exact_match"},
}
DEFAULT_METRICS = {
    "multiple_choice": ["acc", "acc_norm"],
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "generate_until": ["exact_match"],
}
FIELDS = {
    "task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "process_docs", "doc_to_text",
    "doc_to_target", "doc_to_choice", "description", "target_delimiter", "fewshot_delimiter",
    "num_fewshot", "output_type", "generation_kwargs", "filter_list", "metric_list", "metadata",
    "repeats", "should_decontaminate", "doc_to_decontamination_query",
}
METRIC_KEYS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation",
               "ignore_numbers", "regexes_to_ignore"}
GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature"}
FILTERS = {"regex", "take_first", "lowercase", "uppercase", "strip"}


class TaskFileError(PocketError):
    """A task YAML that is not a task we can run: the message names the file and field."""


@dataclass(frozen=True)
class FunctionRef:
    """A ``!function module.name`` tag, kept unresolved until the user trusts the file."""

    target: str


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


@dataclass
class Request:
    """One item turned into what a backend computes: a context and its continuations, a
    prompt to continue until a stop string, or a whole text to score (rolling)."""

    context: str
    continuations: list[str] = field(default_factory=list)  # with the target delimiter
    target: object = None  # gold index (choice), target string (generate / loglikelihood)
    choices: list[str] = field(default_factory=list)  # without the delimiter
    text: str = ""  # loglikelihood_rolling: the text scored


@dataclass
class TaskFile:
    """A parsed task: its settings, its evaluation rows turned into requests, and skips."""

    name: str
    path: Path
    output_type: str
    metrics: list[dict]
    filters: list[tuple[str, list[dict]]]  # (name, steps); [("none", [])] by default
    until: list[str]
    max_gen_toks: int
    requests: list[Request]
    skipped: int = 0
    first_skipped: str | None = None
    files: list[str] = field(default_factory=list)
    digest: str = ""  # of the YAML text and the data files: part of the cache key
    rows: list[int] = field(default_factory=list)  # each request's row in the test split
    selection: str = ""  # "sampleNofM" when ``sample`` chose the rows: part of the cache key

    def skip(self, where: str, reason: str) -> None:
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = f"{where}: {reason}"


# -- templates ---------------------------------------------------------------------------
def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(
        pattern, repl, s, count=count)
    return env


class _Field:
    """A doc_to_* setting: a column name, a template, a literal, or a trusted function."""

    def __init__(self, name: str, value, env, columns: set[str], where: str):
        self.name, self.value, self.template = name, value, None
        if isinstance(value, str) and value not in columns:
            from jinja2 import TemplateSyntaxError

            try:
                self.template = env.from_string(value)
            except TemplateSyntaxError as e:
                raise TaskFileError(
                    f"{where}: {name} is not a valid Jinja2 template (template line "
                    f"{e.lineno}: {e.message}); fix the template or name a column "
                    f"({', '.join(sorted(columns))})"
                ) from None

    def raw(self, doc: dict):
        v = self.value
        if callable(v):
            return v(doc)
        if isinstance(v, (int, list, dict)):
            return list(v.values()) if isinstance(v, dict) else v
        if self.template is None:
            return doc[v]
        return self.template.render(**doc)


def spread(total: int, n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``range(total)``: ``k * total // n`` for k = 0..n-1,
    every (total/n)-th item from the first. No seed and no shuffle: the same split always gives
    the same items, and a file sorted by label gives every label its share (to within one
    item). All indices when ``n`` is None or at least ``total``."""
    if n is None or n >= total:
        return list(range(total))
    return [k * total // n for k in range(n)]


# -- reading the data ------------------------------------------------------------------------
def _infer(values: list[str]):
    """CSV cells as pandas reads them: a column of whole numbers becomes int, of numbers
    float; an empty cell is None."""
    filled = [v for v in values if v != ""]
    for kind in (int, float):
        try:
            conv = [kind(v) for v in filled]
        except ValueError:
            continue
        it = iter(conv)
        return [next(it) if v != "" else None for v in values]
    return [v if v != "" else None for v in values]


def read_rows(path: Path, kind: str) -> list[dict]:
    """Rows of one data file as dicts. Raises TaskFileError for a file that cannot be read."""
    if kind == "json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TaskFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not all(isinstance(r, dict) for r in rows):
            raise TaskFileError(f"{path}: every row must be a JSON object")
        return rows
    if kind == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            raw = list(csv.DictReader(f))
        if not raw:
            return []
        cols = {k: _infer([r[k] or "" for r in raw]) for k in raw[0]}
        return [{k: cols[k][i] for k in cols} for i in range(len(raw))]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TaskFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                            "or convert the file to JSONL/CSV") from None
    return pq.read_table(path).to_pylist()


def _find(p: str, yaml_dir: Path, data_dir: Path | None) -> Path | None:
    q = Path(p).expanduser()
    for c in ([q] if q.is_absolute() else [yaml_dir / q] + ([data_dir / q] if data_dir else [])):
        if c.is_file():
            return c
    return None


# -- the task file -----------------------------------------------------------------------------
def _resolve_function(ref: FunctionRef, yaml_dir: Path, where: str):
    mod_name, _, fn = ref.target.rpartition(".")
    path = yaml_dir / f"{mod_name.replace('.', '/')}.py"
    if not mod_name or not path.is_file():
        raise TaskFileError(f"{where}: !function {ref.target}: no module {path}")
    spec = importlib.util.spec_from_file_location(f"pocketlm_task_{mod_name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, fn):
        raise TaskFileError(f"{where}: !function {ref.target}: {path} has no {fn!r}")
    return getattr(mod, fn)


def _check_functions(cfg: dict, where: str, trust: bool, yaml_dir: Path) -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, FunctionRef):
            if k not in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"):
                raise TaskFileError(f"{where}: {k}: !function is not supported for this field")
            if not trust:
                raise TaskFileError(
                    f"{where}: {k} is '!function {v.target}', which runs Python code from the "
                    "task's folder; pocketlm refuses it unless you pass --trust-task-code "
                    "(trust_code=True) for a file you have read"
                )
            v = _resolve_function(v, yaml_dir, where)
        out[k] = v
    return out


def parse_config(path: str | Path, trust_code: bool = False) -> tuple[dict, Path]:
    """The YAML as a validated dict. Raises TaskFileError naming the file and field."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.is_file():
        raise TaskFileError(f"no task file at {path}")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise TaskFileError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or "output_type" not in cfg and "doc_to_text" not in cfg:
        raise TaskFileError(f"{where}: not an lm-evaluation-harness task (a mapping with task, "
                            "dataset_path, output_type, doc_to_text, ...)")
    if "include" in cfg or "group" in cfg:
        raise TaskFileError(f"{where}: 'include'/'group' are not supported; write one "
                            "self-contained task per file")
    unknown = sorted(set(cfg) - FIELDS)
    if unknown:
        raise TaskFileError(f"{where}: unsupported field(s) {', '.join(unknown)}; pocketlm reads "
                            f"only: {', '.join(sorted(FIELDS))}")
    for k in ("task", "dataset_path", "doc_to_text", "output_type"):
        if cfg.get(k) is None:
            raise TaskFileError(f"{where}: missing required field '{k}'")
    if cfg["output_type"] not in OUTPUT_TYPES:
        raise TaskFileError(f"{where}: output_type {cfg['output_type']!r} is not one of "
                            f"{', '.join(OUTPUT_TYPES)}")
    if cfg["dataset_path"] not in ("json", "csv", "parquet"):
        raise TaskFileError(
            f"{where}: dataset_path {cfg['dataset_path']!r}: pocketlm reads local files only; use "
            "dataset_path: json (JSONL or a JSON array), csv or parquet with "
            "dataset_kwargs: {data_files: {test: path}}")
    if cfg.get("dataset_name") is not None:
        raise TaskFileError(f"{where}: dataset_name must be empty for local files")
    kw = cfg.get("dataset_kwargs") or {}
    if not isinstance(kw, dict) or set(kw) - {"data_files"} or "data_files" not in kw:
        raise TaskFileError(f"{where}: dataset_kwargs must be {{data_files: ...}} only, got {kw!r}")
    if cfg["output_type"] == "multiple_choice" and cfg.get("doc_to_choice") is None:
        raise TaskFileError(f"{where}: output_type multiple_choice needs doc_to_choice")
    if cfg["output_type"] != "loglikelihood_rolling" and cfg.get("doc_to_target") is None:
        raise TaskFileError(f"{where}: missing required field 'doc_to_target'")
    if cfg.get("repeats", 1) != 1:
        raise TaskFileError(f"{where}: repeats must be 1 (greedy decoding gives one answer)")
    if cfg.get("should_decontaminate"):
        raise TaskFileError(f"{where}: should_decontaminate is not supported; set it to false")
    n = cfg.get("num_fewshot", 0) or 0
    if not isinstance(n, int) or n < 0:
        raise TaskFileError(f"{where}: num_fewshot must be a whole number >= 0, got {n!r}")
    if n and not (cfg.get("fewshot_split") or cfg.get("training_split")
                  or cfg.get("validation_split")):
        raise TaskFileError(f"{where}: num_fewshot {n} needs a fewshot_split to draw from")
    gk = cfg.get("generation_kwargs") or {}
    if set(gk) - GEN_KEYS:
        raise TaskFileError(f"{where}: generation_kwargs: unsupported {sorted(set(gk) - GEN_KEYS)}"
                            f"; pocketlm reads {', '.join(sorted(GEN_KEYS))}")
    if gk.get("do_sample") or gk.get("temperature", 0):
        raise TaskFileError(f"{where}: generation_kwargs: only greedy decoding (do_sample: "
                            "false, temperature: 0) is supported, so scores are reproducible")
    _metrics(cfg, where)
    _filters(cfg, where)
    return _check_functions(cfg, where, trust_code, path.parent), path


def _metrics(cfg: dict, where: str) -> list[dict]:
    ot = cfg["output_type"]
    listed = cfg.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[ot]]
    out = []
    for m in listed:
        if not isinstance(m, dict) or "metric" not in m:
            raise TaskFileError(f"{where}: metric_list entries are {{metric: name, ...}}, got {m!r}")
        if isinstance(m["metric"], FunctionRef) or m["metric"] not in METRICS[ot]:
            raise TaskFileError(f"{where}: metric {m['metric']!r} does not fit output_type {ot}; "
                                f"use one of {', '.join(sorted(METRICS[ot]))}")
        bad = set(m) - METRIC_KEYS
        if bad:
            raise TaskFileError(f"{where}: metric {m['metric']}: unsupported {sorted(bad)}")
        out.append(m)
    return out


def _filters(cfg: dict, where: str) -> list[tuple[str, list[dict]]]:
    fl = cfg.get("filter_list")
    if not fl:
        return [("none", [])]
    if cfg["output_type"] != "generate_until":
        raise TaskFileError(f"{where}: filter_list applies to generate_until tasks only")
    out = []
    for f in fl:
        if not isinstance(f, dict) or "name" not in f or not isinstance(f.get("filter"), list):
            raise TaskFileError(f"{where}: filter_list entries are {{name, filter: [...]}}")
        for step in f["filter"]:
            fn = step.get("function") if isinstance(step, dict) else None
            if fn not in FILTERS:
                raise TaskFileError(f"{where}: filter {f['name']}: function {fn!r} is not "
                                    f"supported; use {', '.join(sorted(FILTERS))}")
            if fn == "regex":
                try:
                    re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
                except re.error as e:
                    raise TaskFileError(f"{where}: filter {f['name']}: bad regex ({e})") from None
        out.append((str(f["name"]), f["filter"]))
    return out


def load_taskfile(
    path: str | Path, data_dir: str | Path | None = None, trust_code: bool = False,
    num_fewshot: int | None = None, limit: int | None = None, sample: int | None = None,
) -> TaskFile:
    """Parse a task YAML and turn its evaluation rows into requests.

    ``limit`` keeps the first N rows (few-shot draws then match lm-eval's ``--limit``);
    ``sample`` keeps N rows spread evenly over the split (``spread``), for files sorted by
    label. Either way a kept row gets the few-shot examples a full run gives it: the seeded
    draws of the rows left out are still made, in order. A row whose template fails is
    skipped and counted (its row number in the message); raises TaskFileError for a bad
    file, a missing data file or a column that is absent, InvalidArgument for both ``limit``
    and ``sample``.
    """
    if limit is not None and sample is not None:
        raise InvalidArgument("give limit (the first N rows) or sample (N rows spread over the "
                              "split), not both")
    if sample is not None and sample < 1:
        raise InvalidArgument(f"sample must be at least 1, got {sample}")
    cfg, path = parse_config(path, trust_code)
    where = str(path)
    yaml_dir = path.parent
    ddir = Path(data_dir).expanduser() if data_dir else None
    files = cfg["dataset_kwargs"]["data_files"]
    if isinstance(files, (str, list)):
        files = {"train": files}
    splits: dict[str, list[Path]] = {}
    for split, ps in files.items():
        found = []
        for p in [ps] if isinstance(ps, str) else ps:
            f = _find(str(p), yaml_dir, ddir)
            if f is None:
                looked = [str(yaml_dir / p)] + ([str(ddir / p)] if ddir else [])
                raise TaskFileError(f"{where}: data_files {split}: no file {p!r} (looked in "
                                    f"{' and '.join(looked)}); fix the path or pass --data-dir")
            found.append(f)
        splits[str(split)] = found
    test = cfg.get("test_split") or cfg.get("validation_split")
    if test is None:
        raise TaskFileError(f"{where}: name the split to score with test_split or validation_split")
    if test not in splits:
        raise TaskFileError(f"{where}: test_split {test!r} is not in data_files ({', '.join(splits)})")

    def rows_of(split: str) -> list[dict]:
        return [r for p in splits[split] for r in read_rows(p, cfg["dataset_path"])]

    docs = rows_of(test)
    if not docs:
        raise TaskFileError(f"{where}: the {test} split ({splits[test][0]}) has no rows")
    if callable(cfg.get("process_docs")):
        docs = list(cfg["process_docs"](docs))
    columns = set(docs[0])
    env = _env()
    ot = cfg["output_type"]
    fs_split = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    n_shot = cfg.get("num_fewshot", 0) or 0 if num_fewshot is None else num_fewshot
    fs_docs = []
    if n_shot:
        if fs_split not in splits:
            raise TaskFileError(f"{where}: fewshot_split {fs_split!r} is not in data_files")
        fs_docs = docs if fs_split == test else rows_of(fs_split)
        if callable(cfg.get("process_docs")) and fs_split != test:
            fs_docs = list(cfg["process_docs"](fs_docs))
    fields = {k: _Field(k, cfg[k], env, columns, where)
              for k in ("doc_to_text", "doc_to_target", "doc_to_choice") if cfg.get(k) is not None}
    tdelim = cfg.get("target_delimiter", " ")
    fdelim = cfg.get("fewshot_delimiter", "\n\n")
    gk = cfg.get("generation_kwargs") or {}
    until = gk.get("until", [fdelim])
    until = [until] if isinstance(until, str) else list(until)
    task = TaskFile(
        name=str(cfg["task"]), path=path, output_type=ot, metrics=_metrics(cfg, where),
        filters=_filters(cfg, where), until=until, max_gen_toks=int(gk.get("max_gen_toks", 256)),
        requests=[], files=[str(p) for ps in splits.values() for p in ps],
    )
    h = hashlib.sha256(path.read_bytes() + f"{n_shot}".encode())
    for p in sorted(set(task.files)):
        h.update(Path(p).read_bytes())
    task.digest = h.hexdigest()[:12]

    def text(doc):
        v = fields["doc_to_text"].raw(doc)
        if isinstance(v, str) and v.isdigit() and "doc_to_choice" in fields:
            return int(v)
        return v

    def target(doc):
        v = fields["doc_to_target"].raw(doc)
        if isinstance(v, str) and fields["doc_to_target"].template is not None:
            if v.isdigit() and "doc_to_choice" in fields:
                return int(v)
            if len(v) >= 2 and v[0] == "[" and v[-1] == "]":
                try:
                    return ast.literal_eval(v)
                except (SyntaxError, ValueError):
                    return v
        return v

    def choices(doc):
        v = fields["doc_to_choice"].raw(doc)
        if isinstance(v, str):
            v = ast.literal_eval(v)
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise ValueError(f"doc_to_choice gave {type(v).__name__}, not a list of strings")
        return [str(c) for c in v]

    def answer_text(doc) -> str:
        a = target(doc)
        if isinstance(a, int) and "doc_to_choice" in fields:
            return choices(doc)[a]
        return str(a[0] if isinstance(a, list) else a)

    desc = _Field("description", cfg.get("description") or "", env, columns, where)
    rnd = random.Random(1234)  # lm-eval's default fewshot_random_seed

    def draw() -> list[dict]:  # one row's draw; its own row, if drawn, is dropped below
        return rnd.sample(fs_docs, n_shot + 1 if fs_docs is docs else n_shot)

    kept = spread(len(docs), sample) if sample else list(range(len(docs)))[: limit or None]
    task.rows = kept
    task.selection = f"sample{sample}of{len(docs)}" if len(kept) < len(docs) and sample else ""
    wanted = set(kept)
    src = splits[test][0].name
    for i, doc in enumerate(docs[: kept[-1] + 1]):
        if i not in wanted:
            if n_shot:  # the draw this row would take, so the rows after it get theirs
                with contextlib.suppress(ValueError):  # too few examples: the kept rows say so
                    draw()
            continue
        row = f"{where}: row {i + 1} of {src}"
        try:
            shots = ""
            if n_shot:
                picked = draw()
                if fs_docs is docs:
                    picked = [x for x in picked if x != doc][:n_shot]
                shots = "".join(f"{text(d)}{tdelim}{answer_text(d)}{fdelim}" for d in picked)
            q = text(doc)
            if ot == "loglikelihood_rolling":
                task.requests.append(Request("", text=str(target(doc) if "doc_to_target" in fields
                                                          else q)))
                continue
            ctx = str(desc.raw(doc)) + shots + str(q)
            if ot == "multiple_choice":
                ch = choices(doc)
                gold = target(doc)
                if isinstance(gold, str):
                    if gold not in ch:
                        raise ValueError(f"target {gold!r} is not one of the {len(ch)} choices")
                    gold = ch.index(gold)
                if not isinstance(gold, int) or not 0 <= gold < len(ch):
                    raise ValueError(f"target {gold!r} does not index the {len(ch)} choices")
                task.requests.append(Request(ctx, [tdelim + c for c in ch], gold, ch))
            elif ot == "loglikelihood":
                t = str(target(doc))
                task.requests.append(Request(ctx, [tdelim + t], t))
            else:
                task.requests.append(Request(ctx, [], target(doc)))
        except Exception as e:  # noqa: BLE001 (a row's template or hook may raise anything;
            # one bad row must not end a long run: count it, go on)
            task.skip(row, f"{type(e).__name__}: {e}")
            task.requests.append(None)
    if all(r is None for r in task.requests):
        raise TaskFileError(f"{where}: no row could be rendered; first failure: "
                            f"{task.first_skipped} (columns: {', '.join(sorted(columns))})")
    return task


# -- filters and exact match (lm-eval's RegexFilter, TakeFirst, exact_match) -------------------
def apply_filter(steps: list[dict], response: str) -> str:
    """One model response through a filter pipeline (one response per item: take_first is
    the identity)."""
    s = response
    for step in steps:
        fn = step["function"]
        if fn == "regex":
            found = re.findall(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), s)
            if found:
                m = found[step.get("group_select", 0)]
                if isinstance(m, tuple):
                    m = [x for x in m if x]
                    m = m[0] if m else step.get("fallback", "[invalid]")
                s = m.strip()
            else:
                s = step.get("fallback", "[invalid]")
        elif fn == "lowercase":
            s = s.lower()
        elif fn == "uppercase":
            s = s.upper()
        elif fn == "strip":
            s = s.strip()
    return s


def exact_match(pred: str, ref: str, metric: dict) -> float:
    """Hugging Face ``evaluate``'s exact_match with lm-eval's options, for one pair."""
    for pat in metric.get("regexes_to_ignore") or []:
        pred, ref = re.sub(pat, "", pred), re.sub(pat, "", ref)
    if metric.get("ignore_case"):
        pred, ref = pred.lower(), ref.lower()
    if metric.get("ignore_punctuation"):
        t = str.maketrans("", "", string.punctuation)
        pred, ref = pred.translate(t), ref.translate(t)
    if metric.get("ignore_numbers"):
        t = str.maketrans("", "", string.digits)
        pred, ref = pred.translate(t), ref.translate(t)
    return float(pred == ref)
