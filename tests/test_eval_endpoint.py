"""``evaluate(endpoint=...)``: a task run against an OpenAI-compatible server gives the
direct run's results — generation and log-likelihoods (echo + logprobs) through our own
``serve``, log-likelihoods through a stand-in echoing server too — and an unreachable or
unsuitable server is named."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from serve_util import ServerThread, free_port

import pocketlm
from pocketlm.evaluate import evaluate
from pocketlm.evaluate.backends import EndpointError, EndpointLM
from pocketlm.serve.app import create_app

pytestmark = pytest.mark.integration

GEN = """task: toy_gen
dataset_path: json
dataset_kwargs: {data_files: {test: test.jsonl}}
output_type: generate_until
test_split: test
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 8, do_sample: false}
"""
MC = """task: toy_mc
dataset_path: json
dataset_kwargs: {data_files: {test: test.jsonl}}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{q}}\\nAnswer:"
doc_to_target: 1
doc_to_choice: ["red", "green light", "blue sky"]
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("endpoint")
    rows = [{"q": "the cat " * (i % 3) + f"number {i}?", "a": "x"} for i in range(6)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "gen.yaml").write_text(GEN)
    (d / "mc.yaml").write_text(MC)
    return d


@pytest.fixture(scope="module")
def tiny():
    from tiny import make_tiny_model

    return make_tiny_model()


@pytest.fixture(scope="module")
def our_server(tiny):
    with ServerThread(create_app({"tiny": tiny}, max_batch=4)) as url:
        yield url


def echo_app(model):
    """A minimal completions server with echo + logprobs (what llama-server and vLLM offer),
    computing every prompt token's log-prob with ``model``."""
    from fastapi import FastAPI

    app = FastAPI()
    tok = model.tokenizer

    @app.get("/v1/models")
    def models():
        return {"data": [{"id": "tiny"}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        enc = tok.backend.encode(body["prompt"], add_special_tokens=False)
        ids = list(enc.ids)
        with torch.inference_mode():
            lp = torch.log_softmax(model.logits(ids).double(), dim=-1)
        names = [f"t{i}" for i in ids]
        token_lps = [None] + [float(lp[j - 1, ids[j]]) for j in range(1, len(ids))]
        tops = [None] + [{f"t{int(lp[j - 1].argmax())}": float(lp[j - 1].max())}
                         for j in range(1, len(ids))]
        return {"choices": [{"text": body["prompt"], "logprobs": {
            "tokens": names, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": [a for a, _ in enc.offsets]}}]}

    return app


def test_a_generative_task_through_our_server_equals_the_direct_run(tiny, our_server, tasks):
    direct = evaluate(tiny, str(tasks / "gen.yaml"), use_cache=False, progress=False,
                      record=False, details=True)
    lm = EndpointLM(our_server, "tiny", concurrency=4)
    served = evaluate(None, str(tasks / "gen.yaml"), endpoint=lm, use_cache=False,
                      progress=False, details=True)
    assert served["items"]["toy_gen"]["predictions"] == direct["items"]["toy_gen"]["predictions"]
    assert served["tasks"]["toy_gen"]["exact_match"] == direct["tasks"]["toy_gen"]["exact_match"]
    assert served["model"] == f"tiny @ {our_server}/v1"


def assert_same_log_likelihoods(direct, served, task):
    d, s = direct["items"][task]["rows"], served["items"][task]["rows"]
    assert len(d) == len(s) > 0
    for a, b in zip(d, s):
        assert b["ll"] == pytest.approx(a["ll"], rel=1e-4, abs=1e-4)
        assert b["greedy"] == a["greedy"]
    for metric in ("acc", "acc_norm"):
        assert served["tasks"][task][metric] == direct["tasks"][task][metric]


@pytest.mark.parametrize("which", ["ours", "stand-in"])
def test_log_likelihoods_through_an_echoing_server_equal_the_direct_run(tiny, tasks, our_server,
                                                                         which):
    direct = evaluate(tiny, str(tasks / "mc.yaml"), use_cache=False, progress=False,
                      record=False, details=True)
    with ServerThread(echo_app(tiny)) if which == "stand-in" else nullcontext(our_server) as url:
        served = evaluate(None, str(tasks / "mc.yaml"), endpoint=EndpointLM(url, "tiny"),
                          use_cache=False, progress=False, details=True)
    assert_same_log_likelihoods(direct, served, "toy_mc")


SHIPPED_MC = sorted(p for p in (Path(pocketlm.__file__).parent / "tasks").glob("*.yaml")
                    if "output_type: multiple_choice" in p.read_text())


@pytest.mark.parametrize("task_file", SHIPPED_MC, ids=lambda p: p.stem)
def test_shipped_multiple_choice_tasks_through_our_server_equal_the_direct_run(task_file):
    """The same YAML, the same weights: ``--endpoint`` against our own serve scores every
    choice of every item as the direct run does (a context long enough for the few-shot
    prompts, so neither side truncates)."""
    from tiny import make_tiny_model

    from pocketlm.evaluate.tasks import DataMissing

    model = make_tiny_model(seed=1, max_seq_len=2048)
    try:
        direct = evaluate(model, str(task_file), limit=3, use_cache=False, progress=False,
                          record=False, details=True)
    except DataMissing as e:
        pytest.skip(str(e))
    with ServerThread(create_app({"tiny": model}, max_batch=4)) as url:
        served = evaluate(None, str(task_file), limit=3, endpoint=EndpointLM(url, "tiny"),
                          use_cache=False, progress=False, details=True)
    (task,) = direct["tasks"]
    assert_same_log_likelihoods(direct, served, task)


def test_a_server_without_echo_is_named_with_what_log_likelihood_tasks_need(tiny, tasks):
    need = "need a server whose /v1/completions supports echo"
    with ServerThread(plain_app()) as url, pytest.raises(EndpointError, match=need):
        evaluate(None, str(tasks / "mc.yaml"), endpoint=EndpointLM(url, "tiny"),
                 use_cache=False, progress=False)


def plain_app():
    """A completions server that ignores echo and logprobs (as some servers do)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": [{"id": "tiny"}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        return {"choices": [{"text": "x", "logprobs": None}]}

    return app


def test_unreachable_endpoint_and_unknown_model_are_named(our_server, tasks):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EndpointError, match=f"cannot reach {url}/v1/models"):
        evaluate(None, str(tasks / "gen.yaml"), endpoint=EndpointLM(url, "tiny"), progress=False)
    with pytest.raises(EndpointError, match="does not serve model 'gpt-9'; it serves tiny"):
        evaluate(None, str(tasks / "gen.yaml"), endpoint=EndpointLM(our_server, "gpt-9"),
                 progress=False)


def test_builtin_log_likelihood_tasks_need_a_local_model(our_server):
    from pocketlm.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="hellaswag: built-in log-likelihood tasks"):
        evaluate(None, "hellaswag", endpoint=EndpointLM(our_server, "tiny"), progress=False)


def test_cli_endpoint_run(our_server, tasks, capsys):
    from pocketlm.cli import main

    rc = main(["eval", "--endpoint", our_server, "--model", "tiny", "--tasks",
               str(tasks / "gen.yaml"), "--no-cache"])
    assert rc == 0 and "exact_match" in capsys.readouterr().out
    assert main(["eval", "--endpoint", our_server, "--tasks", str(tasks / "gen.yaml")]) == 2
    assert "--model NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_banking77_on_the_real_model_through_our_server_equals_the_direct_run(default_model):
    """SmolLM2-135M on the shipped banking77 YAML (77 choices an item): the same per-choice
    log-likelihoods and accuracy through ``serve`` as directly."""
    task_file = Path(pocketlm.__file__).parent / "tasks" / "banking77.yaml"
    direct = evaluate(default_model, str(task_file), limit=1, use_cache=False, progress=False,
                      record=False, details=True)
    with ServerThread(create_app({"smollm2": default_model})) as url:
        served = evaluate(None, str(task_file), limit=1, endpoint=EndpointLM(url, "smollm2"),
                          use_cache=False, progress=False, details=True)
    assert_same_log_likelihoods(direct, served, "banking77")
