"""Recipes: shipped YAMLs validate against the step functions' signatures, bad recipes are
refused with the line, quick.yaml runs end to end on a tiny model, re-runs skip and resume."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from tiny import make_tiny_model

import pocketlm
from pocketlm.lock import OutputLocked
from pocketlm.recipes.recipe import SHIPPED, STEPS, RecipeError, describe, parse, plan, run

# quick.yaml's settings cut down to what a 2-layer model of width 64 needs
TINY = ["finetune.steps=3", "finetune.eval_rows=4", "quantize.samples=4", "quantize.seq_len=64",
        "evaluate.sample=1", "evaluate.context=128"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model().save(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = parse(path)
    assert recipe.steps[0].kind == "load" and len(recipe.steps) >= 4
    assert path.read_text().startswith(f"# pocketlm recipe run {path.stem}")  # says how to run it
    assert {s.kind for s in recipe.steps} <= set(STEPS)


DOMAIN_RECIPES = ("customer-support", "quick")  # the recipes that specialise on bitext


@pytest.mark.parametrize("name", DOMAIN_RECIPES)
def test_domain_recipes_evaluate_on_the_domain_task(name, shared_data):
    from pocketlm.evaluate.taskfile import load_taskfile
    from pocketlm.recipes.recipe import resolved_settings

    recipe = parse(name)
    measured = [s for s in recipe.steps if s.kind in ("evaluate", "report")]
    assert [s.kind for s in measured].count("evaluate") >= 2  # before and after
    for step in measured:
        tasks = resolved_settings(recipe, step)["tasks"].split(",")
        files = [t for t in tasks if t.endswith(".yaml")]
        assert len(files) == 1 and len(tasks) >= 2, step  # the domain task beside general ones
        task = load_taskfile(files[0], shared_data, limit=1)  # resolves, and its data is there
        assert task.name == "bitext_intent" and len(task.requests[0].continuations) == 27
    if name == "customer-support":
        assert measured[-1].kind == "report"  # its table has the domain column (see below)


def test_task_files_are_checked_before_anything_runs(tmp_path):
    head = "steps:\n  - load: {model: smollm2-135m-instruct}\n"
    msg = _bad(tmp_path, head + "  - evaluate: {tasks: \"wikitext2,nowhere.yaml\"}\n")
    assert "line 3" in msg and "no task file at" in msg and str(tmp_path / "nowhere.yaml") in msg
    msg = _bad(tmp_path, head + "  - report: {tasks: wikitxt2}\n")
    assert "line 3" in msg and "report.tasks" in msg and "unknown task(s) ['wikitxt2']" in msg
    (tmp_path / "t.yaml").write_text(
        "task: t\ndataset_path: csv\ndataset_kwargs: {data_files: {test: missing.csv}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: x\ndoc_to_target: y\n"
        "doc_to_choice: [a, b]\n")
    msg = _bad(tmp_path, head + "  - evaluate: {tasks: t.yaml}\n")
    assert "line 3" in msg and "no file 'missing.csv'" in msg


def _bad(tmp_path, body: str) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(RecipeError) as e:
        parse(f)
    return str(e.value)


def test_bad_recipes_are_refused_with_the_line(tmp_path):
    head = "steps:\n  - load: {model: smollm2-135m-instruct}\n"
    msg = _bad(tmp_path, head + "  - quantise: {bits: 4}\n")
    assert "line 3" in msg and "unknown step 'quantise'" in msg and "'quantize'" in msg
    msg = _bad(tmp_path, head + "  - quantize:\n      method: gptq\n      bitz: 4\n")
    assert "line 5" in msg and "no setting 'bitz'" in msg and "'bits'" in msg
    assert "bits (int, default 8)" in msg  # the expected settings come from quantize's signature
    msg = _bad(tmp_path, head + "  - quantize: {bits: four}\n")
    assert "quantize.bits = 'four' is a str; expected int" in msg
    msg = _bad(tmp_path, head + "  - finetune: {data: nowhere.csv, steps: 2}\n")
    assert "line 3" in msg and "no file at" in msg and "nowhere.csv" in msg
    msg = _bad(tmp_path, head + "  - distill: {data: bad.yaml}\n")
    assert "distill needs student" in msg
    assert "first step must be" in _bad(tmp_path, "steps:\n  - quantize: {bits: 4}\n")
    assert "unknown key 'step'" in _bad(tmp_path, "step: []\n")


def test_quick_recipe_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = parse("quick", TINY, model=str(tiny_folder))
    rows = run(recipe, out)
    assert [r["status"] for r in rows] == ["source"] + ["ran"] * 5
    gguf = out / "06-export" / "quick.gguf"
    exported = pocketlm.load(gguf, dtype=torch.float32)
    quantized = pocketlm.load(out / "04-quantize")
    ids = quantized.encode("the cat in the hat")
    assert (exported.logits(ids) - quantized.logits(ids)).abs().max() < 1e-2  # codes kept (Q4_1)
    card = json.loads((out / "04-quantize" / "card.json").read_text())
    assert [s["step"] for s in card["steps"]] == ["finetune", "quantize"]
    assert "wikitext2" in card["metrics"]  # the evaluate after it recorded on this card
    for folder in ("03-finetune", "04-quantize", "06-export"):
        assert "## Lineage" in (out / folder / "README.md").read_text()
    readme = (out / "04-quantize" / "README.md").read_text()
    assert "bitext_customer_support_4514.csv" in readme and "sha256" in readme  # data, hashed
    quality = rows[4]["quality"]["wikitext2"]["word_perplexity"]
    assert quality == card["metrics"]["wikitext2"]["word_perplexity"]
    for row in (rows[1], rows[4]):  # both evaluations measured the domain too
        assert 0 <= row["quality"]["bitext_intent"]["acc_norm"] <= 1
    assert card["metrics"]["bitext_intent"]["n"] == 1
    assert "bitext_intent" in (out / "04-quantize" / "README.md").read_text()
    assert (out / "summary.md").is_file() and rows[3]["size_mb"] < rows[2]["size_mb"]

    # nothing changed: every step is skipped
    again = run(parse("quick", TINY, model=str(tiny_folder)), out)
    assert [r["status"] for r in again[1:]] == ["skipped"] * 5
    # a changed quantize setting re-runs quantize and what follows it, not the finetune
    changed = parse("quick", TINY + ["quantize.bits=8", "quantize.group_size=0"],
                    model=str(tiny_folder))
    assert "skip (unchanged)" in describe(changed, out)
    states = [st for _, _, st in plan(changed, out)]
    assert states == ["source", "done", "done", "new", "new", "new"]


def test_failed_step_stops_keeps_and_resumes(tiny_folder, tmp_path, monkeypatch):
    import importlib

    q = importlib.import_module("pocketlm.compress.quantize")  # the module, not the function
    out = tmp_path / "run"
    real = q.quantize

    @functools.wraps(real)  # the same signature: it is the recipe's schema
    def broken(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(q, "quantize", broken)
    with pytest.raises(RecipeError, match=r"step 4 \(quantize, line \d+\) failed: simulated"):
        run(parse("quick", TINY, model=str(tiny_folder)), out)
    assert (out / "03-finetune" / "config.json").is_file()  # the finished steps stay
    recipe = parse("quick", TINY, model=str(tiny_folder))
    assert [st for _, _, st in plan(recipe, out)][3] == "interrupted"
    monkeypatch.setattr(q, "quantize", real)
    rows = run(recipe, out)
    assert [r["status"] for r in rows[1:]] == ["skipped", "skipped", "ran", "ran", "ran"]


def test_second_run_on_one_folder_is_refused(tiny_folder, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    hold = ("import sys, time\nfrom pocketlm.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"is being written by pid {p.pid}"):
            run(parse("quick", TINY, model=str(tiny_folder)), out)
        assert not (out / "02-evaluate").exists()  # refused before any step ran
    finally:
        p.kill()
        p.wait()


def test_report_step_shows_the_domain_task(tiny_folder, tmp_path):
    recipe_file = tmp_path / "r.yaml"
    task = SHIPPED.parent / "tasks" / "bitext_intent.yaml"
    recipe_file.write_text(
        "steps:\n  - load: {model: smollm2-135m-instruct}\n"
        f"  - report: {{tasks: \"wikitext2,{task}\", limit: 1, pages: 1, context: 128}}\n")
    rows = run(parse(recipe_file, model=str(tiny_folder)), tmp_path / "run")
    assert [r["status"] for r in rows] == ["source", "ran"]
    md = (tmp_path / "run" / "02-report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "| bitext_intent acc_norm % |" in header
    (model,) = json.loads((tmp_path / "run" / "02-report" / "report.json").read_text())["models"]
    assert model["quality"][str(task)]["n"] == 1
