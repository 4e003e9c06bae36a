"""pocketlm serve with a draft: speculative decoding inside the batching scheduler.

A lone request speculates (draft, verify, accept/reject); several decode batched. Tiny random
models: greedy output is exact, so every answer is compared with ``Model.generate`` alone.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_util import ServerThread
from tiny import make_tiny_model

from pocketlm.cli import main
from pocketlm.errors import InvalidArgument
from pocketlm.serve.app import create_app

# repeated text, so prompt lookup has n-grams to draft from
PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat sat on"
N = 32


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def server(tiny):
    """One target served three times: with a model draft (same tokenizer, other weights),
    with prompt lookup, and without a draft."""
    draft = make_tiny_model(seed=5)
    models = {"with-model": tiny, "with-lookup": tiny, "plain": tiny}
    app = create_app(models, max_batch=4, drafts={"with-model": draft, "with-lookup": "lookup"})
    with ServerThread(app) as url:
        yield url, app


def expected(tiny, prompt: str = PROMPT, n: int = N) -> str:
    return tiny.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)


def complete(url, model, prompt=PROMPT, n=N, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
            "ignore_eos": True, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chat(url, model, **extra) -> tuple[list[str], dict]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": N,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    pieces, usage = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                pieces.append(chunk["choices"][0]["delta"]["content"])
            usage = chunk.get("usage") or usage
    return pieces, usage


@pytest.mark.parametrize("model", ["with-model", "with-lookup"])
def test_greedy_is_the_target_alone_and_usage_reports_acceptance(server, tiny, model):
    url, _ = server
    r = complete(url, model)
    assert r["choices"][0]["text"] == expected(tiny)
    assert r["usage"]["completion_tokens"] == N
    spec = r["usage"]["speculative"]
    assert spec["draft"] == model.removeprefix("with-")
    assert spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted"] / spec["drafted"])
    # fewer target passes than tokens: some rounds kept drafts (and each pass gives >= 1 token)
    assert spec["passes"] <= N - 1
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + N


@pytest.mark.parametrize("model", ["with-model", "with-lookup"])
def test_streamed_greedy_is_the_target_alone(server, tiny, model):
    url, _ = server
    pieces, usage = stream_chat(url, model)
    chat = [{"role": "user", "content": PROMPT}]
    assert "".join(pieces) == tiny.chat(chat, max_tokens=N, temperature=0, ignore_eos=True)
    assert len(pieces) > 1  # token by token, not one lump at the end
    assert usage["completion_tokens"] == N
    assert usage["speculative"]["drafted"] > 0


def test_lookup_accepts_drafts_on_repeated_text(server, tiny):
    url, _ = server
    spec = complete(url, "with-lookup")["usage"]["speculative"]
    assert spec["accepted"] > 0
    assert spec["passes"] < N - 1


def test_per_request_switch_and_k(server, tiny):
    url, app = server
    sched = app.state.schedulers["with-model"]
    drafted = sched.spec.drafted
    off = complete(url, "with-model", speculative=False)
    assert off["choices"][0]["text"] == expected(tiny)
    assert "speculative" not in off["usage"]
    assert sched.spec.drafted == drafted  # nothing drafted for it
    k1 = complete(url, "with-model", draft_tokens=1)
    assert k1["choices"][0]["text"] == expected(tiny)
    assert k1["usage"]["speculative"]["drafted"] <= k1["usage"]["speculative"]["passes"]
    assert complete(url, "plain")["choices"][0]["text"] == expected(tiny)


def test_bad_speculation_options_are_400s(server):
    url, _ = server
    base = {"prompt": PROMPT, "max_tokens": 4}
    r = httpx.post(url + "/v1/completions", json={**base, "model": "plain", "speculative": True})
    assert r.status_code == 400
    assert "without a draft" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "speculative"
    r = httpx.post(url + "/v1/completions", json={**base, "model": "with-model", "draft_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "draft_tokens"
    r = httpx.post(url + "/v1/chat/completions", json={
        "model": "with-model", "messages": [{"role": "user", "content": "hi"}],
        "draft_tokens": "lots"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("draft_tokens")


def test_concurrent_requests_are_each_the_target_alone(server, tiny):
    """Batched while several run, speculating again when one is left (its draft's cache
    catching up with the tokens decoded batched)."""
    url, app = server
    prompts = [PROMPT, "hello there, how are you", "abc abc abc abc", "x"]
    lengths = [40, 8, 16, 24]
    sched = app.state.schedulers["with-model"]
    active = []  # sequences active at each step; a short sleep makes the requests overlap
    sched.on_step = lambda n, a: (active.append(a), time.sleep(0.01))
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda pn: complete(url, "with-model", *pn),
                                    zip(prompts, lengths)))
    finally:
        sched.on_step = None
    assert max(active) >= 2 and 1 in active  # batched steps, then speculative rounds alone
    for p, n, r in zip(prompts, lengths, replies):
        assert r["choices"][0]["text"] == expected(tiny, p, n), p
    assert replies[0]["usage"]["speculative"]["drafted"] > 0  # alone for its last 16+ tokens
    metrics = httpx.get(url + "/metrics").text
    assert f'pocketlm_speculative_drafted_tokens_total{{model="with-model"}} {sched.spec.drafted}' in metrics
    assert 'pocketlm_speculative_accepted_tokens_total{model="with-lookup"}' in metrics
    assert 'speculative_drafted_tokens_total{model="plain"}' not in metrics


def test_seeded_sampling_with_a_draft_is_reproducible(server):
    url, _ = server
    a = complete(url, "with-model", temperature=0.9, seed=7)
    b = complete(url, "with-model", temperature=0.9, seed=7)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == N


def test_a_draft_with_another_tokenizer_is_refused_at_start_up(tiny):
    other = make_tiny_model(seed=1)
    other.tokenizer.backend.add_tokens(["<extra>"])
    other.card.name = "other-draft"
    with pytest.raises(InvalidArgument, match="'other-draft' does not share the target"):
        create_app({"tiny": tiny}, drafts={"tiny": other})
    with pytest.raises(InvalidArgument, match="draft tokens"):
        create_app({"tiny": tiny}, drafts={"tiny": "lookup"}, draft_tokens=0)


def test_cli_refuses_the_draft_before_serving(tiny, tmp_path, capsys, monkeypatch):
    target = tiny.save(tmp_path / "target")
    other = make_tiny_model(seed=1)
    other.tokenizer.backend.add_tokens(["<extra>"])
    other = other.save(tmp_path / "other")
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))
    assert main(["serve", str(target), "--draft", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"the draft {str(other)!r} does not share the target 'target''s tokenizer" in err
    assert main(["serve", str(target), "--draft", "lookup", "--draft", "self"]) == 2
    assert "--draft was given 2 times for 1 served" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2():
    from pocketlm.formats import registry

    if registry.stored_path("smollm2-135m-instruct") is None:
        pytest.skip("smollm2-135m-instruct is not pulled")
    import pocketlm

    # as served by default: packed Q4_1 blocks (verification runs through the fused step)
    return pocketlm.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_real_model_served_with_lookup_is_the_model_alone(smollm2):
    msgs = [{"role": "user", "content": "Repeat this list twice: apple, banana, cherry, date."}]
    want = smollm2.chat(msgs, max_tokens=48, temperature=0)
    app = create_app({"smollm2": smollm2}, max_batch=2, drafts={"smollm2": "lookup"})
    with ServerThread(app) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
            "model": "smollm2", "messages": msgs, "max_tokens": 48, "temperature": 0}).json()
    assert r["choices"][0]["message"]["content"] == want
    assert r["usage"]["speculative"]["accepted"] > 0


def test_docs_page_documents_the_speculation_fields(server):
    url, _ = server
    r = httpx.get(url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for field in ("speculative", "draft_tokens", "acceptance_rate", "--draft"):
        assert field in r.text
