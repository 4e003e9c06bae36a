"""Recipes: a YAML list of steps (load, finetune, distill, prune, quantize, evaluate, report,
export, save), each calling the Python API function of the same name, each step's output in its
own folder ``OUT/NN-step`` with its card.

    steps:
      - load: {model: smollm2-135m-instruct}
      - quantize: {method: gptq, bits: 4, group_size: 32}
      - evaluate: {tasks: wikitext2, limit: 4}
      - export: {format: gguf, type: auto}

The settings a step takes are the parameters of the function it calls (``quantize`` ->
``pocketlm.compress.quantize.quantize``; ``finetune`` -> ``train.steps.finetune`` plus
``TrainSettings`` and ``load_data``'s), read from their signatures, so the YAML, the Python API
and the CLI cannot disagree. A recipe is checked whole before anything runs: an unknown step,
a setting the function does not take or of the wrong type, a missing file are refused with the
line and what was expected.

Each step has a *key*: a hash of the previous step's key, the step's settings, the contents of
the files it reads and the pocketlm version (the first step's: the source model's bytes). A
step whose folder holds a finished marker with the same key is skipped; one whose marker says
it was running continues from its own checkpoints (training's ``last.pt``, GPTQ's finished
layers). A failing step stops the recipe naming it; every finished step's output stays.
Relative paths are read from the recipe's folder; ``{data}`` is pocketlm's data folder
(``$POCKETLM_DATA``, else ``shared/data``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import PocketError

MARKER = "recipe-step.json"
SHIPPED = Path(__file__).parent


class RecipeError(PocketError):
    """A recipe that is malformed, or a step of it that failed."""


# -- the schema: the API functions' own signatures ----------------------------------------------
@dataclass
class Param:
    name: str
    annotation: object
    default: object  # inspect.Parameter.empty: required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        t = _type_name(self.annotation)
        return f"{self.name} ({t}, required)" if self.required else f"{self.name} ({t}, default {self.default!r})"


def _params(fn, skip: set[str], rename: dict | None = None) -> dict[str, Param]:
    hints = typing.get_type_hints(fn)
    if isinstance(fn, type):  # a dataclass: its fields
        fields = {f.name: (f.default if f.default is not dataclasses.MISSING else
                           inspect.Parameter.empty) for f in dataclasses.fields(fn)}
    else:
        fields = {n: p.default for n, p in inspect.signature(fn).parameters.items()}
    out = {}
    for name, default in fields.items():
        if name in skip:
            continue
        shown = (rename or {}).get(name, name)
        out[shown] = Param(shown, hints.get(name, object), default)
    return out


def _data_params() -> dict[str, Param]:
    from pocketlm.train.data import load_data

    return _params(load_data, {"tokenizer"}, {"paths": "data", "eval_paths": "eval_data"})


def _train_params() -> dict[str, Param]:
    from pocketlm.train.trainer import TrainSettings

    return _params(TrainSettings, {"resume", "progress", "memory_check", "fsdp"})


@dataclass
class StepKind:
    name: str
    doc: str
    schema: typing.Callable[[], dict[str, Param]]
    makes_model: bool  # writes a new model folder the next steps start from


def _schema_load():
    return {"model": Param("model", str, inspect.Parameter.empty),
            "dtype": Param("dtype", str, "float32")}


def _schema_finetune():
    from pocketlm.train.steps import finetune

    return {**_params(finetune, {"model", "data", "out", "settings", "base_model"}),
            **_train_params(), **_data_params()}


def _schema_distill():
    from pocketlm.train.steps import distill

    own = _params(distill, {"teacher", "student", "data", "out", "settings", "cache_path"})
    return {"student": Param("student", str, inspect.Parameter.empty),
            "teacher": Param("teacher", str | None, None), **own, **_train_params(),
            **_data_params()}


def _schema_of(module: str, fn: str, skip: set[str]):
    def schema():
        import importlib

        return _params(getattr(importlib.import_module(module), fn), skip)
    return schema


def _schema_report():
    from pocketlm.evaluate.report import report

    return {"models": Param("models", list[str] | None, None), **_params(report, {"models", "out"})}


STEPS = {s.name: s for s in [
    StepKind("load", "start from a model (name, .gguf or folder)", _schema_load, True),
    StepKind("finetune", "train.steps.finetune: all weights or LoRA", _schema_finetune, True),
    StepKind("distill", "train.steps.distill: a student learns the current model", _schema_distill,
             True),
    StepKind("prune", "compress.prune.prune: unstructured / N:M",
             _schema_of("pocketlm.compress.prune", "prune", {"model", "progress", "inplace"}), True),
    StepKind("prune_structured", "compress.structured.prune_structured: heads, channels, layers",
             _schema_of("pocketlm.compress.structured", "prune_structured", {"model", "progress"}),
             True),
    StepKind("quantize", "compress.quantize.quantize: rtn, gptq, awq",
             _schema_of("pocketlm.compress.quantize", "quantize",
                        {"model", "checkpoint_dir", "progress"}), True),
    StepKind("evaluate", "evaluate.run.evaluate: quality, recorded on the model's card",
             _schema_of("pocketlm.evaluate.run", "evaluate",
                        {"model", "progress", "record", "details", "cache_dir"}), False),
    StepKind("report", "evaluate.report.report: the comparison table of the models so far",
             _schema_report, False),
    StepKind("export", "formats.export.export: GGUF or Hugging Face",
             _schema_of("pocketlm.formats.export", "export", {"model", "out", "force"}), False),
    StepKind("save", "save the current model to a folder of your choice",
             lambda: {"path": Param("path", str, inspect.Parameter.empty)}, False),
]}
PATH_SETTINGS = {"data", "eval_data", "calibration", "data_dir", "path"}
MODEL_SETTINGS = {"model", "teacher"}
# evaluate's and report's ``tasks``: built-in names, and task files (*.yaml) read, like the
# paths above, from the recipe's folder (a shipped recipe names ../tasks/bitext_intent.yaml)
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def _type_name(t) -> str:
    return getattr(t, "__name__", None) if isinstance(t, type) else str(t).replace("typing.", "")


def _type_ok(value, t) -> bool:
    if t is object or t is typing.Any:
        return True
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(t))
    if t is type(None):
        return value is None
    if origin in (list, tuple) or t in (list, tuple):
        if isinstance(value, str):
            return True  # "a,b" or one item: the functions take either
        args = typing.get_args(t)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or t is dict:
        return isinstance(value, dict)
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is str or t is Path:
        return isinstance(value, str)
    if isinstance(t, type):
        return isinstance(value, t)
    return True


# -- reading a recipe ---------------------------------------------------------------------------
@dataclass
class Step:
    index: int  # 1-based
    kind: str
    settings: dict
    line: int
    lines: dict = field(default_factory=dict)  # setting -> line

    @property
    def folder_name(self) -> str:
        return f"{self.index:02d}-{self.kind}"


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    steps: list[Step]


def find(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of a shipped one (``quick`` -> pocketlm/recipes/quick.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED / f"{Path(str(name_or_path)).stem}.yaml"
    if "/" not in str(name_or_path) and shipped.is_file():
        return shipped
    known = ", ".join(sorted(x.stem for x in SHIPPED.glob("*.yaml")))
    raise RecipeError(f"no recipe file at {p.resolve()}; shipped recipes: {known}")


def parse(path: str | Path, overrides: list[str] | None = None, model: str | None = None) -> Recipe:
    """Read and check a recipe (see the module docstring); raises RecipeError with the line.

    ``overrides`` are ``STEP.SETTING=VALUE`` (STEP a step name or its number, VALUE YAML);
    ``model`` replaces the first step's model."""
    import yaml

    path = find(path)
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    where = f"{path.name}"
    if root is None or not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{where}: a recipe is a mapping with a 'steps' list")
    top = {k.value: v for k, v in root.value}
    unknown = set(top) - {"name", "description", "steps"}
    if unknown:
        k = next(k for k, _ in root.value if k.value in unknown)
        raise RecipeError(f"{where} line {k.start_mark.line + 1}: unknown key {k.value!r}; a "
                          "recipe has name, description and steps")
    steps_node = top.get("steps")
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise RecipeError(f"{where}: 'steps' must be a non-empty list of steps")
    steps = []
    for i, item in enumerate(steps_node.value, 1):
        line = item.start_mark.line + 1
        if isinstance(item, yaml.ScalarNode):
            kind, settings_node = item.value, None
        elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            kind, settings_node = item.value[0][0].value, item.value[0][1]
        else:
            raise RecipeError(f"{where} line {line}: a step is `- NAME: {{settings}}` (one name "
                              f"per list item); steps are {', '.join(STEPS)}")
        settings, lines = {}, {}
        if isinstance(settings_node, yaml.MappingNode):
            for k, v in settings_node.value:
                settings[k.value] = yaml.safe_load(yaml.serialize(v))
                lines[k.value] = k.start_mark.line + 1
        elif settings_node is not None and not (isinstance(settings_node, yaml.ScalarNode)
                                                and settings_node.value in ("", "null", "~")):
            raise RecipeError(f"{where} line {line}: the settings of {kind!r} must be a mapping")
        steps.append(Step(i, kind, settings, line, lines))
    name = top["name"].value if "name" in top else path.stem
    desc = top["description"].value if "description" in top else ""
    recipe = Recipe(path, name, desc, steps)
    _apply_overrides(recipe, overrides or [], model)
    check(recipe)
    return recipe


def _apply_overrides(recipe: Recipe, overrides: list[str], model: str | None) -> None:
    import yaml

    if model is not None:
        if recipe.steps[0].kind != "load":
            raise RecipeError(f"--model: {recipe.path.name} does not start with a load step")
        recipe.steps[0].settings["model"] = model
        recipe.steps[0].lines["model"] = 0
    for o in overrides:
        target, sep, value = o.partition("=")
        step, dot, key = target.partition(".")
        if not sep or not dot:
            raise RecipeError(f"--set {o!r}: write STEP.SETTING=VALUE, e.g. quantize.bits=8")
        match = [s for s in recipe.steps if s.kind == step or str(s.index) == step]
        if not match:
            raise RecipeError(f"--set {o!r}: no step {step!r} in {recipe.path.name}")
        for s in match:
            s.settings[key] = yaml.safe_load(value)
            s.lines[key] = 0


def check(recipe: Recipe) -> None:
    """Every step known, every setting taken by its function and of its type, files present."""
    where = recipe.path.name
    if recipe.steps[0].kind != "load":
        raise RecipeError(f"{where} line {recipe.steps[0].line}: the first step must be "
                          "`- load: {model: NAME}` (the model the recipe starts from)")
    for s in recipe.steps:
        at = f"{where} line {s.line}"
        if s.kind not in STEPS:
            near = difflib.get_close_matches(s.kind, list(STEPS), 1)
            raise RecipeError(f"{at}: unknown step {s.kind!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; steps are {', '.join(STEPS)}")
        if s.kind == "load" and s.index > 1:
            raise RecipeError(f"{at}: load only comes first")
        schema = STEPS[s.kind].schema()
        for key, value in s.settings.items():
            kat = f"{where} line {s.lines.get(key) or s.line}" if s.lines.get(key) else (
                f"{where} (override)")
            if key not in schema:
                near = difflib.get_close_matches(key, list(schema), 1)
                raise RecipeError(
                    f"{kat}: {s.kind} has no setting {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + "; it takes: " + "; ".join(p.describe() for p in schema.values()))
            p = schema[key]
            if not _type_ok(value, p.annotation):
                raise RecipeError(f"{kat}: {s.kind}.{key} = {value!r} is a "
                                  f"{type(value).__name__}; expected {_type_name(p.annotation)}")
        missing = [p.name for p in schema.values() if p.required and p.name not in s.settings]
        if missing:
            raise RecipeError(f"{at}: {s.kind} needs {', '.join(missing)}: "
                              + "; ".join(schema[m].describe() for m in missing))
        for key in PATH_SETTINGS & set(s.settings):
            if key == "path" or s.settings[key] is None:
                continue
            for f in _as_list(s.settings[key]):
                p = resolve_path(recipe, f)
                if not p.exists():
                    raise RecipeError(f"{where} line {s.lines.get(key) or s.line}: {s.kind}."
                                      f"{key}: no file at {p}")
        for key in MODEL_SETTINGS & set(s.settings):
            v = s.settings[key]
            if v is not None and not _is_model_name(v) and not resolve_path(recipe, v).exists():
                raise RecipeError(f"{where} line {s.lines.get(key) or s.line}: {s.kind}.{key}: "
                                  f"{v!r} is neither a known model (pocketlm list --known) nor "
                                  f"a file or folder ({resolve_path(recipe, v)})")
        if s.settings.get("tasks") is not None:
            _check_tasks(recipe, s, f"{where} line {s.lines.get('tasks') or s.line}")
        if s.settings.get("limit") is not None and s.settings.get("sample") is not None:
            line = s.lines.get("sample") or s.lines.get("limit")
            raise RecipeError(
                f"{where} line {line or s.line}: {s.kind} has both limit and sample; give one "
                "(limit: the first N items, as lm-eval's --limit; sample: N spread over the "
                f"split, for data sorted by label). With --set, also set {s.kind}.limit=null "
                f"or {s.kind}.sample=null")


def _task_names(tasks) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    return [n.strip() for n in names if n.strip()]


def _task_files(recipe: Recipe, step: Step) -> list[Path]:
    """The task files a step's ``tasks`` names, resolved from the recipe's folder."""
    return [resolve_path(recipe, n) for n in _task_names(step.settings.get("tasks") or [])
            if n.endswith(TASK_FILE_SUFFIXES)]


def _task_data(recipe: Recipe, step: Step, path: Path) -> list[Path]:
    """The data files a task file reads, found as ``load_taskfile`` finds them (beside the
    YAML, else in the step's data_dir or pocketlm's data folder); TaskFileError if absent."""
    from pocketlm.evaluate.taskfile import TaskFileError, parse_config
    from pocketlm.evaluate.tasks import default_data_dir

    cfg, _ = parse_config(path, bool(step.settings.get("trust_task_code")))
    ddir = step.settings.get("data_dir")
    ddir = resolve_path(recipe, ddir) if ddir else default_data_dir()
    files = cfg["dataset_kwargs"]["data_files"]
    files = files.values() if isinstance(files, dict) else [files]
    out = []
    for f in (x for v in files for x in _as_list(v)):
        found = [c for c in (path.parent / f, ddir / f) if c.is_file()]
        if not found:
            raise TaskFileError(f"{path}: data_files: no file {f!r} (looked in {path.parent} "
                                f"and {ddir})")
        out.append(found[0])
    return out


def _check_tasks(recipe: Recipe, step: Step, at: str) -> None:
    """Built-in task names known, task files present and valid, their data files present."""
    from pocketlm.errors import InvalidArgument
    from pocketlm.evaluate.tasks import parse_tasks

    builtin = [n for n in _task_names(step.settings["tasks"])
               if not n.endswith(TASK_FILE_SUFFIXES)]
    try:
        if builtin:
            parse_tasks(builtin)
    except InvalidArgument as e:
        raise RecipeError(f"{at}: {step.kind}.tasks: {e}") from None
    for path in _task_files(recipe, step):
        if not path.is_file():
            raise RecipeError(f"{at}: {step.kind}.tasks: no task file at {path} (task files "
                              "are read from the recipe's folder)")
        try:
            _task_data(recipe, step, path)
        except PocketError as e:
            raise RecipeError(f"{at}: {step.kind}.tasks: {e}") from None


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _is_model_name(v: str) -> bool:
    from pocketlm.api import _HUB_ID
    from pocketlm.formats import registry

    return v in registry.KNOWN or bool(_HUB_ID.match(v)) and not Path(v).exists()


def resolve_path(recipe: Recipe, value: str) -> Path:
    from pocketlm.evaluate.tasks import default_data_dir

    p = Path(str(value).replace("{data}", str(default_data_dir()))).expanduser()
    return p if p.is_absolute() else (recipe.path.parent / p).resolve()


# -- keys ---------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(x for x in path.rglob("*") if x.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir() and f.name in ("card.json", "README.md", MARKER) or ".lock" in f.name:
            continue
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def resolved_settings(recipe: Recipe, step: Step) -> dict:
    """The settings as the function gets them: paths made absolute, models resolved."""
    out = {}
    for k, v in step.settings.items():
        if k in PATH_SETTINGS and v is not None and k != "path":
            v = [str(resolve_path(recipe, x)) for x in v] if isinstance(v, list) else str(
                resolve_path(recipe, v))
        elif k == "path" or k in MODEL_SETTINGS and v is not None and not _is_model_name(v):
            v = str(resolve_path(recipe, v))
        elif k == "tasks" and v is not None:  # task files: absolute, the rest as written
            names = [str(resolve_path(recipe, n)) if n.endswith(TASK_FILE_SUFFIXES) else n
                     for n in _task_names(v)]
            v = ",".join(names) if isinstance(v, str) else names
        out[k] = v
    return out


def step_key(recipe: Recipe, step: Step, previous: str) -> str:
    """What a step's output depends on: the previous key, settings, file contents, version."""
    import pocketlm

    settings = resolved_settings(recipe, step)
    files = {}
    for k in (PATH_SETTINGS - {"path", "data_dir"}) & set(settings):
        for f in _as_list(settings[k] or []):
            files[f] = _sha256(Path(f))
    for task in _task_files(recipe, step):  # a changed task file (or its data) re-runs
        files[str(task)] = _sha256(task)
        for f in _task_data(recipe, step, task):
            files[str(f)] = _sha256(f)
    for k in MODEL_SETTINGS & set(settings):
        v = settings[k]
        if v is None:
            continue
        from pocketlm.formats import registry

        files[v] = registry.KNOWN[v].sha256 if v in registry.KNOWN else (
            _sha256(Path(v)) if Path(v).exists() else v)
    blob = json.dumps({"previous": previous, "step": step.kind, "settings": settings,
                       "files": files, "pocketlm": pocketlm.__version__}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _outputs(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MARKER, "card.json", "README.md")
            and "checkpoint" not in p.parts[len(folder.parts):][0]}


def status(folder: Path, key: str) -> str:
    """'done' (skip), 'interrupted' (continue from its checkpoints) or 'new'."""
    m = read_marker(folder)
    if not m or m.get("key") != key:
        return "new"
    if m.get("status") == "done":
        outs = _outputs(folder)
        if all(outs.get(k) == v for k, v in m.get("outputs", {}).items()):
            return "done"
        return "new"
    return "interrupted"


def plan(recipe: Recipe, out: Path) -> list[tuple[Step, str, str]]:
    """(step, key, status) for every step, computed without running anything."""
    rows, key = [], ""
    for s in recipe.steps:
        key = step_key(recipe, s, key)
        rows.append((s, key, "source" if s.kind == "load" else status(out / s.folder_name, key)))
    return rows


def _write_marker(folder: Path, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(folder / MARKER)


# -- running ------------------------------------------------------------------------------------
@dataclass
class _State:
    model: object = None  # the current Model, loaded when a step needs it
    folder: Path | None = None  # where it is saved (None: the source, not copied)
    source: str = ""
    dtype: str = "float32"  # the load step's: steps train and quantize from full precision
    models: list[str] = field(default_factory=list)  # every model so far, for report

    def get(self):
        if self.model is None:
            import torch

            from pocketlm.api import load

            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]
            self.model = load(str(self.folder) if self.folder else self.source, dtype=dtype)
        return self.model


def _split(settings: dict, schema: dict) -> dict:
    return {k: v for k, v in settings.items() if k in schema}


def _train_inputs(settings: dict, tokenizer, resume: bool):
    from pocketlm.train.data import load_data
    from pocketlm.train.trainer import TrainSettings

    d = _split(settings, _data_params())
    paths = d.pop("data")
    if "eval_data" in d:
        d["eval_paths"] = d.pop("eval_data")
    data = load_data(paths, tokenizer, **d)
    ts = TrainSettings(**_split(settings, _train_params()), resume=resume)
    return data, ts


def _record_data_hashes(model, settings: dict, folder: Path) -> None:
    """The training files' sha256 on the card's last step, so its README names the data."""
    files = [f for k in ("data", "eval_data") for f in _as_list(settings.get(k) or [])]
    model.card.steps[-1]["settings"]["data_sha256"] = {f: _sha256(Path(f)) for f in files}
    if (folder / "card.json").is_file():
        model.card.save(folder, model.config)


def _run_step(recipe: Recipe, step: Step, state: _State, folder: Path, resume: bool, log):
    s = resolved_settings(recipe, step)
    kind = step.kind
    if kind == "finetune":
        from pocketlm.train.steps import finetune

        model = state.get()
        data, ts = _train_inputs(s, model.tokenizer, resume)
        own = _split(s, _params(finetune, {"model", "data", "out", "settings", "base_model"}))
        tuned = finetune(model, data, folder, ts, base_model=state.source, **own)
        _record_data_hashes(tuned, s, folder)
        return tuned
    if kind == "distill":
        from pocketlm.api import load
        from pocketlm.train.distill import make_student
        from pocketlm.train.steps import distill

        teacher = load(s["teacher"]) if s.get("teacher") else state.get()
        data, ts = _train_inputs(s, teacher.tokenizer, resume)
        student = make_student(s["student"], teacher, seed=ts.seed)
        own = _split(s, _params(distill, {"teacher", "student", "data", "out", "settings",
                                          "cache_path"}))
        out = distill(teacher, student, data, folder, ts, **own)
        _record_data_hashes(out, s, folder)
        if teacher.card.license and teacher.card.license not in out.card.all_licenses():
            out.card.licenses.append(teacher.card.license)  # the teacher's terms travel
            out.save(folder)
        return out
    if kind in ("prune", "prune_structured", "quantize"):
        model = state.get()
        if kind == "quantize":
            from pocketlm.compress.quantize import quantize

            new = quantize(model, **s, checkpoint_dir=str(folder / "checkpoint"))
        elif kind == "prune":
            from pocketlm.compress.prune import prune

            new = prune(model, **s)
        else:
            from pocketlm.compress.structured import prune_structured

            new = prune_structured(model, **s)
        new.save(folder)
        return new
    if kind == "evaluate":
        from pocketlm.evaluate.run import evaluate
        from pocketlm.lock import output_lock

        model = state.get()
        results = evaluate(model, **s, progress=True, record=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if state.folder is not None:  # the model's own card records what was measured
            with output_lock(state.folder):
                model.card.save(state.folder, model.config)
        return None
    if kind == "report":
        from pocketlm.evaluate.report import report

        models = s.pop("models", None) or state.models
        report(models, folder, **s)
        return None
    if kind == "export":
        import copy

        from pocketlm.formats.export import export

        model = state.get()
        fmt = s.get("format", "gguf")
        target = folder / (f"{recipe.name}.gguf" if fmt == "gguf" else "hf")
        folder.mkdir(parents=True, exist_ok=True)
        export(model, target, **s, force=True)
        if fmt == "gguf":
            card = copy.deepcopy(model.card)
            card.steps.append({"step": "export", "settings": {"format": "gguf", **s}})
            card.save(folder, model.config)
        return None
    if kind == "save":
        model = state.get()
        model.save(s["path"])
        return None
    raise AssertionError(kind)


def run(recipe: Recipe, out: str | Path, log=print) -> list[dict]:
    """Run ``recipe`` into ``out`` (skipping unchanged steps, continuing an interrupted one);
    returns one summary row per step. Raises RecipeError naming a step that failed (finished
    steps stay), OutputLocked while another run writes ``out``."""
    from pocketlm.lock import output_lock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with output_lock(out):
        steps = plan(recipe, out)
        state = _State()
        n = len(steps)
        for step, key, st in steps:
            folder = out / step.folder_name
            shown = ", ".join(f"{k}={v}" for k, v in step.settings.items())
            if step.kind == "load":
                s = resolved_settings(recipe, step)
                state.source, state.dtype = s["model"], s.get("dtype", "float32")
                state.models.append(s["model"])
                log(f"[{step.index}/{n}] load {s['model']}")
                rows.append({"step": step.folder_name, "status": "source", "seconds": 0.0})
                continue
            if st == "done":
                log(f"[{step.index}/{n}] {step.kind}: unchanged, skipped ({folder})")
                m = read_marker(folder)
            else:
                if st == "new" and folder.exists():
                    shutil.rmtree(folder)  # made from other inputs: start clean
                verb = "continuing (interrupted earlier)" if st == "interrupted" else "running"
                log(f"[{step.index}/{n}] {step.kind} {shown}: {verb}")
                _write_marker(folder, {"key": key, "status": "running", "step": step.kind,
                                       "started": time.time()})
                t0 = time.perf_counter()
                try:
                    new = _run_step(recipe, step, state, folder, st == "interrupted", log)
                except KeyboardInterrupt:
                    log(f"interrupted in step {step.index} ({step.kind}); run the recipe again "
                        "to continue from this step's checkpoints")
                    raise
                except Exception as e:
                    raise RecipeError(
                        f"step {step.index} ({step.kind}, line {step.line}) failed: {e}. The "
                        f"finished steps are kept in {out}; fix the cause and run the recipe "
                        "again to continue from this step") from e
                m = {"key": key, "status": "done", "step": step.kind,
                     "seconds": round(time.perf_counter() - t0, 1), "outputs": _outputs(folder),
                     "finished": time.time()}
                _write_marker(folder, m)
                if new is not None:
                    state.model = new
            if STEPS[step.kind].makes_model:
                state.folder = folder
                state.models.append(str(folder))
                if st == "done":
                    state.model = None  # loaded from its folder when a later step needs it
            rows.append(_summary_row(step, folder, m, st, state))
        _write_summary(out, recipe, rows)
    return rows


def _summary_row(step: Step, folder: Path, marker: dict, st: str, state: _State) -> dict:
    row = {"step": step.folder_name, "status": "skipped" if st == "done" else "ran",
           "seconds": marker.get("seconds")}
    if STEPS[step.kind].makes_model:
        w = [p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file()]
        row["size_mb"] = round(sum(p.stat().st_size for p in w) / 1e6, 2)
        try:
            from pocketlm.model.config import ModelConfig

            cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
            row["params_m"] = round(cfg.n_params / 1e6, 2)
        except (OSError, KeyError, ValueError, PocketError):
            pass
    if step.kind == "evaluate" and (folder / "results.json").is_file():
        res = json.loads((folder / "results.json").read_text())["tasks"]
        row["quality"] = {t: {k: m[k] for k in ("word_perplexity", "acc_norm", "acc")
                              if isinstance(m.get(k), (int, float))} for t, m in res.items()}
    if step.kind == "export":
        files = [p for p in folder.rglob("*") if p.suffix in (".gguf", ".safetensors")]
        row["size_mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 2)
    return row


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'step':22s} {'status':8s} {'time':>8s} {'size MB':>8s} {'params M':>8s}  quality"]
    for r in rows:
        q = "; ".join(f"{t} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items())
                      for t, m in (r.get("quality") or {}).items())
        sec = r.get("seconds")
        lines.append(f"{r['step']:22s} {r['status']:8s} {(f'{sec:.0f}s' if sec else '-'):>8s} "
                     f"{r.get('size_mb', '-')!s:>8s} {r.get('params_m', '-')!s:>8s}  {q}")
    return "\n".join(lines)


def _write_summary(out: Path, recipe: Recipe, rows: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps({"recipe": str(recipe.path), "name": recipe.name,
                                                  "steps": rows}, indent=2, default=str))
    md = [f"# {recipe.name}", "", recipe.description, "", "```", format_summary(rows), "```", ""]
    (out / "summary.md").write_text("\n".join(md))


def describe(recipe: Recipe, out: Path) -> str:
    """What ``recipe show`` prints: each step, its settings, and whether it would run."""
    words = {"source": "start from", "done": "skip (unchanged)",
             "interrupted": "continue (interrupted)", "new": "run"}
    lines = [f"{recipe.name}: {recipe.description}".rstrip(": "), f"output: {out}", ""]
    for step, key, st in plan(recipe, out):
        shown = ", ".join(f"{k}={v}" for k, v in step.settings.items()) or "defaults"
        lines.append(f"  {step.index:2d}. {step.kind:16s} {words[st]:24s} {shown}")
        lines.append(f"      -> {out / step.folder_name if step.kind != 'load' else '(source)'}"
                     f"  [key {key}]")
    return "\n".join(lines)


def default_out(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


if __name__ == "__main__":  # pragma: no cover
    print(describe(parse(sys.argv[1]), Path("runs")))
