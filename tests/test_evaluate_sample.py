"""``--sample N``: N items spread over a split sorted by label, beside ``--limit N`` (the
first N, lm-eval's meaning). A model that always gives the first answer scores 100% on the
first items of a sorted file and its true share on a sample; the two subsets never share
cached items; a sampled item gets the few-shot examples a full run gives it; recipes take
``sample`` and the shipped ones use it for the domain task."""

from __future__ import annotations

import csv
import json

import pytest

from pocketlm.errors import InvalidArgument
from pocketlm.evaluate import evaluate
from pocketlm.evaluate import run as run_mod
from pocketlm.evaluate.taskfile import load_taskfile, spread

INTENTS = ["cancel_order", "get_refund", "track_order", "review"]


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def sorted_task(tmp_path):
    """A Bitext-like CSV sorted by intent, 4 rows per intent, and a 2-shot task file over it
    that draws its examples from the same file (as bitext_intent.yaml does)."""
    with open(tmp_path / "support.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "intent"])
        for intent in INTENTS:
            for k in range(4):
                w.writerow([f"please help with {intent.replace('_', ' ')} number {k}", intent])
    return write(tmp_path / "intent.yaml", (
        "task: toy_intent\ndataset_path: csv\n"
        "dataset_kwargs: {data_files: {test: support.csv}}\n"
        "output_type: multiple_choice\ntest_split: test\nfewshot_split: test\nnum_fewshot: 2\n"
        'doc_to_text: "Request: {{instruction}}\\nIntent:"\ndoc_to_target: "{{intent}}"\n'
        f"doc_to_choice: {json.dumps(INTENTS)}\n"))


class AlwaysFirst:
    """A backend that always prefers the first choice, like a model that answers every
    request with cancel_order."""

    base, model = "http://fake", "always-first"

    def __init__(self):
        self.scored = 0

    def check(self) -> None:
        pass

    def loglikelihood(self, items):
        self.scored += len(items)
        return [[(0.0 if j == 0 else -5.0, False) for j in range(len(conts))]
                for _, conts in items]


def test_spread_is_every_len_over_n_th_item():
    assert spread(16, 4) == [0, 4, 8, 12]
    assert spread(10, 3) == [0, 3, 6]
    assert spread(5, 5) == spread(5, 9) == spread(5, None) == [0, 1, 2, 3, 4]


def test_limit_sees_one_intent_and_sample_sees_all(sorted_task, tmp_path):
    first = load_taskfile(sorted_task, limit=4)
    spread_ = load_taskfile(sorted_task, sample=4)
    assert {INTENTS[r.target] for r in first.requests} == {"cancel_order"}
    assert first.rows == [0, 1, 2, 3] and spread_.rows == [0, 4, 8, 12]
    assert [INTENTS[r.target] for r in spread_.requests] == INTENTS

    lm = AlwaysFirst()
    kw = {"endpoint": lm, "use_cache": False, "progress": False}
    assert evaluate(None, str(sorted_task), limit=4, **kw)["tasks"]["toy_intent"]["acc"] == 1.0
    r = evaluate(None, str(sorted_task), sample=4, **kw)
    m = r["tasks"]["toy_intent"]
    assert m["acc"] == 0.25 and m["n"] == 4  # its true share: one intent in four
    assert r["settings"]["sample"] == 4 and r["settings"]["limit"] is None


def test_a_sampled_item_gets_the_examples_a_full_run_gives_it(sorted_task):
    full = load_taskfile(sorted_task)
    for subset in (load_taskfile(sorted_task, sample=4), load_taskfile(sorted_task, sample=5),
                   load_taskfile(sorted_task, limit=4)):
        for row, req in zip(subset.rows, subset.requests):
            assert req.context == full.requests[row].context
            assert req.context.count("Request:") == 3  # 2 shots + the item
    assert load_taskfile(sorted_task, sample=5).rows == [0, 3, 6, 9, 12]


def test_limit_and_sample_runs_never_share_cached_items(sorted_task, tiny_model, tmp_path,
                                                         monkeypatch):
    cache = tmp_path / "cache"
    kw = {"cache_dir": cache, "progress": False, "details": True}
    by_limit = evaluate(tiny_model, str(sorted_task), limit=4, **kw)
    sampled = evaluate(tiny_model, str(sorted_task), sample=4, **kw)
    assert sampled["tasks"]["toy_intent"]["resumed_items"] == 0  # not limit's rows 0-3
    full = evaluate(tiny_model, str(sorted_task), use_cache=False, progress=False, details=True)
    rows = sampled["items"]["toy_intent"]
    assert rows["split_rows"] == [0, 4, 8, 12]
    for row, got in zip(rows["split_rows"], rows["rows"]):  # the same numbers as a full run
        assert got["ll"] == pytest.approx(full["items"]["toy_intent"]["rows"][row]["ll"],
                                          rel=1e-6)
    assert by_limit["items"]["toy_intent"]["rows"][3]["ll"] == pytest.approx(
        full["items"]["toy_intent"]["rows"][3]["ll"], rel=1e-6)
    names = sorted(p.name for p in cache.rglob("*.jsonl"))
    assert len(names) == 2 and sum("-sample4of16" in n for n in names) == 1

    # again: each run reads its own file, and scores nothing
    lm_calls = []
    real = run_mod.scoring.score_choices
    monkeypatch.setattr(run_mod.scoring, "score_choices",
                        lambda net, items: lm_calls.append(len(items)) or real(net, items))
    again = evaluate(tiny_model, str(sorted_task), sample=4, **kw)
    assert again["tasks"]["toy_intent"]["resumed_items"] == 4 and lm_calls == []
    assert again["tasks"]["toy_intent"]["acc"] == sampled["tasks"]["toy_intent"]["acc"]


def test_builtin_tasks_sample_too_and_keep_their_own_cache(tiny_model, tmp_path):
    rows = [{"query": f"Cooking: step {i}. he", "label": i // 3,
             "endings": ["cuts.", "stirs.", "tastes.", "serves."]} for i in range(12)]
    write(tmp_path / "data/hellaswag/hellaswag_val.jsonl",
          "".join(json.dumps(r) + "\n" for r in rows))
    kw = {"data_dir": tmp_path / "data", "cache_dir": tmp_path / "c", "progress": False,
          "details": True}
    evaluate(tiny_model, "hellaswag", limit=4, **kw)
    r = evaluate(tiny_model, "hellaswag", sample=4, **kw)
    assert r["tasks"]["hellaswag"]["resumed_items"] == 0
    assert [x["row"] for x in r["items"]["hellaswag"]] == [0, 3, 6, 9]
    full = evaluate(tiny_model, "hellaswag", data_dir=tmp_path / "data", use_cache=False,
                    progress=False, details=True)
    for x in r["items"]["hellaswag"]:
        assert x["ll"] == pytest.approx(full["items"]["hellaswag"][x["row"]]["ll"], rel=1e-6)
    # a sample as large as the split is the whole split: it shares the full run's file
    whole = evaluate(tiny_model, "hellaswag", sample=50, **kw)
    assert whole["tasks"]["hellaswag"]["n"] == 12
    assert whole["tasks"]["hellaswag"]["resumed_items"] == 4  # limit's rows 0-3 are the same


def test_ppl_files_sample_their_records(tiny_model, tmp_path):
    docs = [f"document number {i} is about {w}." for i, w in enumerate("abcdef")]
    write(tmp_path / "notes.txt", "\n\n".join(docs) + "\n")
    write(tmp_path / "picked.txt", "\n\n".join(docs[i] for i in spread(6, 3)) + "\n")
    kw = {"use_cache": False, "progress": False}
    got = evaluate(tiny_model, f"ppl:{tmp_path / 'notes.txt'}", sample=3, **kw)["tasks"]
    want = evaluate(tiny_model, f"ppl:{tmp_path / 'picked.txt'}", **kw)["tasks"]
    assert got["ppl:notes.txt"]["tokens"] == want["ppl:picked.txt"]["tokens"]
    assert got["ppl:notes.txt"]["loglikelihood"] == pytest.approx(
        want["ppl:picked.txt"]["loglikelihood"], rel=1e-6)


def test_limit_with_sample_is_refused(tiny_model, sorted_task):
    with pytest.raises(InvalidArgument, match="limit 4 and sample 4: give one"):
        evaluate(tiny_model, str(sorted_task), limit=4, sample=4, use_cache=False)
    with pytest.raises(InvalidArgument, match="sample must be at least 1"):
        evaluate(tiny_model, str(sorted_task), sample=0, use_cache=False)


# -- the command line ---------------------------------------------------------------------------
def test_cli_sample_prints_and_writes_the_spread_subset(sorted_task, tiny_model, tmp_path,
                                                        capsys):
    from pocketlm.cli import main

    folder = tiny_model.save(tmp_path / "tiny")
    out = tmp_path / "r.json"
    assert main(["eval", str(folder), "--tasks", str(sorted_task), "--sample", "4",
                 "--cache-dir", str(tmp_path / "c"), "-o", str(out), "--threads", "1"]) == 0
    assert "sample 4 spread over each split" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["settings"]["sample"] == 4 and r["tasks"]["toy_intent"]["n"] == 4
    card = json.loads((folder / "card.json").read_text())
    assert card["metrics"]["toy_intent"]["sample"] == 4


def test_cli_limit_with_sample_fails_before_loading_and_says_which_to_use(capsys):
    from pocketlm.cli import main

    assert main(["eval", "no-such-model", "--tasks", "hellaswag", "--limit", "4",
                 "--sample", "4"]) == 2
    err = capsys.readouterr().err
    assert "--limit 4 and --sample 4: give one" in err
    assert "first N items" in err and "sorted by label" in err
    assert "no-such-model" not in err  # refused before any load was tried
    assert main(["report", "a", "b", "--limit", "4", "--sample", "4"]) == 2
    assert "give one" in capsys.readouterr().err


def test_cli_help_says_when_to_use_limit_and_when_sample(capsys):
    from pocketlm.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sample N" in text and "--limit N" in text
    assert "compare item for item with lm-eval" in text
    assert "data sorted by label" in text and "cancel_order" in text


# -- recipes ------------------------------------------------------------------------------------
def test_recipe_steps_take_sample_and_refuse_it_with_limit(tmp_path):
    from pocketlm.recipes.recipe import SHIPPED, RecipeError, parse, resolved_settings

    task = SHIPPED.parent / "tasks" / "bitext_intent.yaml"
    recipe = write(tmp_path / "r.yaml", (
        "steps:\n  - load: {model: smollm2-135m-instruct}\n"
        f"  - evaluate: {{tasks: \"wikitext2,{task}\", sample: 40}}\n"
        "  - report: {tasks: hellaswag, sample: 40, pages: 1}\n"))
    r = parse(recipe)
    assert resolved_settings(r, r.steps[1])["sample"] == 40
    assert r.steps[2].settings == {"tasks": "hellaswag", "sample": 40, "pages": 1}
    with pytest.raises(RecipeError, match=r"line 3: evaluate has both limit and sample; give one"):
        parse(recipe, ["evaluate.limit=10"])
    assert parse(recipe, ["evaluate.limit=10", "evaluate.sample=null"]).steps[1].settings[
        "limit"] == 10
    with pytest.raises(RecipeError, match="expected int"):
        parse(recipe, ["report.sample=many"])


@pytest.mark.parametrize("name", ["customer-support", "quick"])
def test_shipped_recipes_sample_the_domain_task(name):
    from pocketlm.recipes.recipe import parse

    recipe = parse(name)
    for step in (s for s in recipe.steps if s.kind in ("evaluate", "report")):
        assert "bitext_intent.yaml" in step.settings["tasks"]
        assert step.settings.get("sample") and "limit" not in step.settings, step


def test_report_step_with_sample_writes_its_table(tmp_path):
    from tiny import make_tiny_model

    from pocketlm.recipes.recipe import SHIPPED, parse, run

    folder = make_tiny_model().save(tmp_path / "tiny")
    task = SHIPPED.parent / "tasks" / "bitext_intent.yaml"
    recipe = write(tmp_path / "r.yaml", (
        "steps:\n  - load: {model: smollm2-135m-instruct}\n"
        f"  - evaluate: {{tasks: \"{task}\", sample: 2, context: 128}}\n"
        f"  - report: {{tasks: \"wikitext2,{task}\", sample: 2, pages: 1, context: 128}}\n"))
    rows = run(parse(recipe, model=str(folder)), tmp_path / "run")
    assert [r["status"] for r in rows] == ["source", "ran", "ran"]
    assert 0 <= rows[1]["quality"]["bitext_intent"]["acc_norm"] <= 1
    md = (tmp_path / "run" / "03-report" / "report.md").read_text()
    assert "2 items spread evenly over each task, 1 WikiText-2 test pages" in md
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "| bitext_intent acc_norm % |" in header and "WikiText-2 word ppl" in header
    (model,) = json.loads((tmp_path / "run" / "03-report" / "report.json").read_text())["models"]
    assert model["quality"][str(task)]["n"] == 2 and model["quality"]["wikitext2"]["n"] == 1
