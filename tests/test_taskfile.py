"""lm-eval task files: the YAML subset, prompts and few-shot draws as lm-eval builds them,
filters and exact match, bad files, and every shipped task loaded and run on a tiny model."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from pocketlm.evaluate import evaluate
from pocketlm.evaluate.custom import TASKS_DIR
from pocketlm.evaluate.taskfile import TaskFileError, apply_filter, exact_match, load_taskfile

SHIPPED = sorted(TASKS_DIR.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def folder(tmp_path):
    rows = [{"q": f"what is {i} plus {i}", "a": str(2 * i), "label": i % 3} for i in range(8)]
    write(tmp_path / "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path / "train.jsonl", "".join(
        json.dumps({"q": f"train {i}", "a": i, "label": i % 3}) + "\n" for i in range(10)))
    return tmp_path


MC = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: test.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{q}}\\nAnswer:"
doc_to_target: label
doc_to_choice: ["red", "green", "blue"]
"""


def test_multiple_choice_requests_follow_lm_eval(folder):
    task = load_taskfile(write(folder / "mc.yaml", MC))
    r = task.requests[4]
    assert r.context == "Question: what is 4 plus 4\nAnswer:"
    assert r.continuations == [" red", " green", " blue"] and r.target == 1
    assert task.output_type == "multiple_choice" and len(task.requests) == 8


def test_fewshot_draws_are_lm_evals_seeded_sample_in_item_order(folder):
    text = MC.replace("    test: test.jsonl", "    test: test.jsonl\n    train: train.jsonl") + (
        "fewshot_split: train\nnum_fewshot: 2\ntarget_delimiter: \" => \"\n"
        "fewshot_delimiter: \"\\n--\\n\"\ndescription: \"Colours.\\n\"\n")
    task = load_taskfile(write(folder / "fs.yaml", text), limit=3)
    train = [{"q": f"train {i}", "a": i, "label": i % 3} for i in range(10)]
    rnd = random.Random(1234)
    colours = ["red", "green", "blue"]
    for i, r in enumerate(task.requests):
        shots = rnd.sample(train, 2)
        expect = "Colours.\n" + "".join(
            f"Question: {d['q']}\nAnswer: => {colours[d['label']]}\n--\n" for d in shots)
        assert r.context == expect + f"Question: what is {i} plus {i}\nAnswer:"
    assert len(task.requests) == 3


def test_fewshot_from_the_test_split_never_shows_the_item_itself(folder):
    text = MC + "fewshot_split: test\nnum_fewshot: 7\n"
    task = load_taskfile(write(folder / "self.yaml", text))
    for i, r in enumerate(task.requests):
        assert f"what is {i} plus {i}\nAnswer: " not in r.context.rsplit("\n\n", 1)[0]
        assert r.context.count("Question:") == 8


def test_string_targets_and_templated_choices(folder):
    text = MC.replace("doc_to_target: label", 'doc_to_target: "{{ [\'red\',\'green\',\'blue\'][label] }}"'
                      ).replace('doc_to_choice: ["red", "green", "blue"]',
                                "doc_to_choice: \"{{ ['red', 'green', 'blue'] }}\"")
    task = load_taskfile(write(folder / "s.yaml", text))
    assert [r.target for r in task.requests[:4]] == [0, 1, 2, 0]


@pytest.mark.parametrize("change, message", [
    (("doc_to_choice: [", "doc_to_choices: ["), "unsupported field(s) doc_to_choices"),
    (("output_type: multiple_choice", "output_type: ranking"), "output_type 'ranking'"),
    (("doc_to_target: label\n", ""), "missing required field 'doc_to_target'"),
    (("dataset_path: json", "dataset_path: super_glue"), "local files only"),
    (("test.jsonl", "nope.jsonl"), "no file 'nope.jsonl'"),
    (("doc_to_text: \"Question: {{q}}", "doc_to_text: \"Question: {{q"),
     "doc_to_text is not a valid Jinja2 template (template line 2"),
    (("doc_to_target: label", "doc_to_target: label\nmetric_list:\n  - metric: exact_match"),
     "metric 'exact_match' does not fit output_type multiple_choice"),
    (("doc_to_target: label", "doc_to_target: colour"), "target 'colour' is not one of the 3 choices"),
    (("{{q}}", "{{question}}"), "'question' is undefined"),
])
def test_bad_task_files_name_the_field(folder, change, message):
    with pytest.raises(TaskFileError, match=re.escape(message)):
        load_taskfile(write(folder / "bad.yaml", MC.replace(*change)))


def test_not_a_task_and_a_missing_file(folder, tmp_path):
    with pytest.raises(TaskFileError, match="not an lm-evaluation-harness task"):
        load_taskfile(write(folder / "x.yaml", "- just\n- a list\n"))
    with pytest.raises(TaskFileError, match="no task file at"):
        load_taskfile(tmp_path / "absent.yaml")


def test_a_row_whose_template_fails_is_counted_with_its_row_number(folder):
    rows = (folder / "test.jsonl").read_text().splitlines()
    rows[2] = json.dumps({"a": "1", "label": 0})  # no "q"
    (folder / "test.jsonl").write_text("\n".join(rows) + "\n")
    task = load_taskfile(write(folder / "mc.yaml", MC))
    assert task.skipped == 1 and task.requests[2] is None
    assert "row 3 of test.jsonl" in task.first_skipped and "'q' is undefined" in task.first_skipped


def test_function_hooks_are_refused_unless_trusted(folder):
    write(folder / "utils.py", "def text(doc):\n    return 'Q: ' + doc['q']\n")
    text = MC.replace('doc_to_text: "Question: {{q}}\\nAnswer:"', "doc_to_text: !function utils.text")
    path = write(folder / "fn.yaml", text)
    with pytest.raises(TaskFileError, match="--trust-task-code"):
        load_taskfile(path)
    assert load_taskfile(path, trust_code=True).requests[1].context == "Q: what is 1 plus 1"


def test_templates_are_sandboxed(folder):
    text = MC.replace('"Question: {{q}}\\nAnswer:"', '"{{ q.__class__.__mro__[1].__subclasses__() }}"')
    with pytest.raises(TaskFileError, match="no row could be rendered.*unsafe"):
        load_taskfile(write(folder / "evil.yaml", text))


def test_gsm8k_filters_and_exact_match_as_lm_eval(shared_data):
    task = load_taskfile(TASKS_DIR / "gsm8k.yaml", shared_data, limit=2)
    strict, flexible = (steps for _, steps in task.filters)
    metric = task.metrics[0]
    out = "She has 3 + 4 = 7 apples.\n#### 7"
    assert apply_filter(strict, out) == "7" and apply_filter(flexible, out) == "7"
    assert apply_filter(strict, "so the answer is $1,250.") == "[invalid]"
    assert apply_filter(flexible, "so the answer is $1,250.") == "$1,250."
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,250"
    assert exact_match("$1,250.", ref, metric) == 1.0
    assert exact_match("1251", ref, metric) == 0.0
    r = task.requests[0]
    assert r.context.count("Question:") == 6 and r.context.endswith("\nAnswer:")
    assert task.until == ["Question:", "</s>", "<|im_end|>"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_task_loads_and_runs(path, shared_data, tiny_model, tmp_path):
    assert len(SHIPPED) >= 3
    task = load_taskfile(path, shared_data, limit=2)
    assert task.skipped == 0 and len(task.requests) == 2
    if task.output_type == "generate_until":  # the tiny model's window is 256 tokens
        short = write(tmp_path / path.name, path.read_text().replace("num_fewshot: 5",
                      "num_fewshot: 0").replace('  do_sample', '  max_gen_toks: 8\n  do_sample'))
        path = short
    r = evaluate(tiny_model, str(path), limit=2, data_dir=shared_data, cache_dir=tmp_path / "c",
                 progress=False)
    (m,) = r["tasks"].values()
    assert m["n"] == 2
    for k in m["shown"]:
        assert 0.0 <= m[k] <= 1.0


def test_loglikelihood_and_rolling_tasks_score_what_a_plain_pass_gives(folder, tiny_model):
    import torch

    ll_yaml = MC.replace("output_type: multiple_choice", "output_type: loglikelihood").replace(
        'doc_to_choice: ["red", "green", "blue"]\n', "").replace("doc_to_target: label",
                                                                  'doc_to_target: "{{a}}"')
    r = evaluate(tiny_model, str(write(folder / "ll.yaml", ll_yaml)), use_cache=False,
                 progress=False, details=True)
    tok = tiny_model.tokenizer
    for i, row in enumerate(r["items"]["toy_mc"]["rows"]):
        ctx = tok.encode(f"Question: what is {i} plus {i}\nAnswer:")
        whole = tok.encode(f"Question: what is {i} plus {i}\nAnswer: {2 * i}")
        lp = torch.log_softmax(tiny_model.logits(whole).double(), dim=-1)
        want = sum(float(lp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
        assert row["ll"][0] == pytest.approx(want, rel=1e-5)
    m = r["tasks"]["toy_mc"]
    assert m["perplexity"] == pytest.approx(
        math.exp(-sum(x["ll"][0] for x in r["items"]["toy_mc"]["rows"]) / 8), rel=1e-9)
    roll = ("task: toy_roll\ndataset_path: json\ndataset_kwargs: {data_files: {test: test.jsonl}}\n"
            "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\n"
            "doc_to_target: \"{{q}}\"\n")
    r = evaluate(tiny_model, str(write(folder / "roll.yaml", roll)), use_cache=False,
                 progress=False, limit=2)
    m = r["tasks"]["toy_roll"]
    texts = [f"what is {i} plus {i}" for i in range(2)]
    lls = []
    for t in texts:
        ids = [tok.eos_id] + tok.encode(t)
        lp = torch.log_softmax(tiny_model.logits(ids).double(), dim=-1)
        lls.append(sum(float(lp[j - 1, ids[j]]) for j in range(1, len(ids))))
    nbytes = sum(len(t.encode()) for t in texts)
    assert m["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-5)
    assert m["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / 10), rel=1e-5)  # 5 words each


def test_csv_and_parquet_rows_read_as_lm_eval_reads_them(tmp_path):
    from pocketlm.evaluate.taskfile import read_rows

    (tmp_path / "t.csv").write_text("text,n,x\nhello,1,0.5\n\"a, b\",2,\n")
    assert read_rows(tmp_path / "t.csv", "csv") == [{"text": "hello", "n": 1, "x": 0.5},
                                                    {"text": "a, b", "n": 2, "x": None}]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["x", "y"], "label": [0, 1]}), tmp_path / "t.parquet")
    assert read_rows(tmp_path / "t.parquet", "parquet") == [{"text": "x", "label": 0},
                                                            {"text": "y", "label": 1}]
