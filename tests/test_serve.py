"""pocketlm serve, driven by the official openai client against a real uvicorn server.

Most tests use a tiny random model: its text is gibberish, but greedy output is exact, so
the server's answers are compared with ``Model.generate`` on the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from serve_util import ServerThread
from tiny import make_tiny_model

from pocketlm.serve.app import create_app

CHAT = [{"role": "user", "content": "Tell me about the weather."}]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def server(tiny):
    app = create_app({"tiny": tiny}, max_batch=8, max_queue=64)
    with ServerThread(app) as url:
        yield url, app


def client(url, key="unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **kw)


def slow_steps(app, seconds: float, name: str = "tiny") -> None:
    """Make every decode step of the scheduler take at least ``seconds`` (load shaping)."""
    app.state.schedulers[name].on_step = lambda n, active: time.sleep(seconds)


def test_models_health_and_metrics(server):
    url, _ = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok", "models": ["tiny"]}
    client(url).completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
    text = httpx.get(url + "/metrics").text
    assert 'pocketlm_requests_total{route="/v1/completions",code="200"}' in text
    assert 'pocketlm_queue_length{model="tiny"} 0' in text
    assert "pocketlm_request_duration_seconds_bucket" in text
    assert 'pocketlm_completion_tokens_total{model="tiny"}' in text


def test_chat_greedy_equals_model_chat(server, tiny):
    url, _ = server
    r = client(url).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=24, temperature=0
    )
    expected = tiny.chat(CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tiny.chat_prompt(CHAT))
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_chat_stream_equals_non_stream(server, tiny):
    url, _ = server
    c = client(url)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == tiny.chat(CHAT, max_tokens=24, temperature=0)
    finals = [
        ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_completions_stream_and_not(server, tiny):
    url, _ = server
    c = client(url)
    expected = tiny.generate("Once upon a time", max_tokens=20, temperature=0)
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    assert r.choices[0].text == expected
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True
        )
    )
    assert streamed == expected
    # a batch of prompts, and token-id prompts
    r = c.completions.create(model="tiny", prompt=["the cat", "a dog"], max_tokens=8, temperature=0)
    assert [ch.text for ch in r.choices] == tiny.generate(
        ["the cat", "a dog"], max_tokens=8, temperature=0
    )
    r = c.completions.create(
        model="tiny", prompt=tiny.encode("the cat"), max_tokens=8, temperature=0
    )
    assert r.choices[0].text == tiny.generate("the cat", max_tokens=8, temperature=0)


def test_default_max_tokens_for_completions_is_16(server):
    r = client(server[0]).completions.create(model="tiny", prompt="hello", temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_logprobs_match_the_model(server, tiny):
    url, _ = server
    prompt = "the cat sat"
    first = torch.log_softmax(tiny.logits(tiny.encode(prompt))[-1].float(), -1)
    r = client(url).completions.create(
        model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=3
    )
    got = r.choices[0].logprobs
    assert got.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)
    assert len(got.tokens) == 2 and got.text_offset[0] == 0
    # chat: top_logprobs are the model's own top-k at the first step, best first
    best = torch.log_softmax(tiny.logits(tiny.chat_prompt(CHAT))[-1].float(), -1).topk(2)
    chat = client(url).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(
        best.values.tolist(), abs=1e-4
    )
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy


def test_seed_n_and_stop(server, tiny):
    url, _ = server
    c = client(url)
    kw = {"model": "tiny", "prompt": "abc", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # a seed makes sampling reproducible
    r = c.completions.create(**kw, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.choices[0].text == a.choices[0].text  # choice 0 uses the seed itself
    assert r.usage.completion_tokens == 36
    full = tiny.generate("the cat", max_tokens=30, temperature=0)
    stop = full[10:12]
    r = c.completions.create(
        model="tiny", prompt="the cat", max_tokens=30, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_complete_and_correct(tiny):
    """32 streaming clients x 64 tokens: every answer whole, correct, and batched together."""
    app = create_app({"tiny": tiny}, max_batch=8, max_queue=64)
    seen = []
    app.state.schedulers["tiny"].on_step = lambda n, active: seen.append(active)
    prompts = [f"request number {i}: " for i in range(32)]
    expected = tiny.generate(prompts, max_tokens=64, temperature=0, ignore_eos=True)

    async def one(c, p):
        text, reasons = "", []
        stream = await c.completions.create(
            model="tiny",
            prompt=p,
            max_tokens=64,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for ch in stream:
            text += ch.choices[0].text
            if ch.choices[0].finish_reason:
                reasons.append(ch.choices[0].finish_reason)
        return text, reasons

    async def main(url):
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    with ServerThread(app) as url:
        results = asyncio.run(main(url))
    assert [t for t, _ in results] == expected
    assert all(r == ["length"] for _, r in results)
    assert max(seen) == 8  # sequences really decoded together
    assert app.state.schedulers["tiny"].active == 0


def test_queue_full_gets_429_and_queued_ones_finish(tiny):
    app = create_app({"tiny": tiny}, max_batch=1, max_queue=1)
    slow_steps(app, 0.01)
    with ServerThread(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 40, "temperature": 0}

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=30) as h:
                running = asyncio.create_task(h.post("/v1/completions", json=body))
                await asyncio.sleep(0.2)
                queued = asyncio.create_task(h.post("/v1/completions", json=body))
                await asyncio.sleep(0.2)
                t0 = time.monotonic()
                refused = await h.post("/v1/completions", json=body)
                refused_after = time.monotonic() - t0
                return await running, await queued, refused, refused_after

        running, queued, refused, refused_after = asyncio.run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused_after < 0.3  # immediately, not after the queue drained
    assert running.status_code == queued.status_code == 200
    assert running.json()["usage"]["completion_tokens"] == 40
    assert queued.json()["choices"][0]["text"] == running.json()["choices"][0]["text"]


def test_api_key_guards_every_route_but_health(tiny):
    app = create_app({"tiny": tiny}, api_key="s3cret")
    with ServerThread(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "a"},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").models.list().data[0].id == "tiny"
        assert (
            httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code
            == 200
        )


BAD = [
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"model": "tiny"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
    (b'{"model": "tiny", "messages": "hi"}', 400, "messages"),
    (b'{"model": "tiny", "messages": []}', 400, "messages"),
    (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
        400,
        "max_tokens",
    ),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}',
        400,
        "max_tokens",
    ),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
        400,
        "temperature",
    ),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}',
        400,
        "top_p",
    ),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}', 400, "n"),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}',
        400,
        "stop",
    ),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}',
        400,
        "presence_penalty",
    ),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}',
        400,
        "logprobs",
    ),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "gpt-4"),
    (
        json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]}
        ).encode(),
        400,
        "context",
    ),
]


@pytest.mark.parametrize("body,status,mentions", BAD)
def test_bad_input_is_4xx_naming_the_problem(server, body, status, mentions):
    url, _ = server
    r = httpx.post(
        url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status
    err = r.json()["error"]
    assert mentions in err["message"] and err["type"]


def test_bad_completion_inputs(server):
    url, _ = server
    for body in (
        {"model": "tiny", "prompt": []},
        {"model": "tiny", "prompt": [99999]},
        {"model": "tiny", "prompt": "a", "logprobs": 9},
        {"model": "tiny", "prompt": 5},
        {"model": "tiny", "prompt": "a", "echo": True, "stream": True},
    ):
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 400, body
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert httpx.get(url + "/v1/nothing").json()["error"]["type"] == "not_found"
    # the server still serves after all that
    assert client(url).completions.create(model="tiny", prompt="a", max_tokens=2).choices


def test_echo_returns_the_prompts_logprobs_from_one_pass(server, tiny):
    """OpenAI's legacy echo + logprobs (what lm-eval's local-completions sends): every prompt
    token, its log-prob given the tokens before it (none for the first), the top N there, and
    where it starts in the echoed text."""
    url, app = server
    prompt = "the cat sat on the mat"
    ids = tiny.encode(prompt)
    lp = torch.log_softmax(tiny.logits(ids).double(), dim=-1)  # (T, V)
    sched = app.state.schedulers["tiny"]
    for max_tokens in (0, 1):
        steps = sched.steps
        r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, logprobs=2, echo=True)
        assert sched.steps == steps  # scored (and its one greedy token taken) in one pass
        c = r.choices[0]
        assert c.text.startswith(prompt)
        got = c.logprobs
        n = len(ids) + max_tokens
        assert len(got.tokens) == len(got.token_logprobs) == len(got.text_offset) == n
        assert got.tokens[: len(ids)] == [tiny.tokenizer.token_text(i) for i in ids]
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        for j in range(1, len(ids)):
            assert got.token_logprobs[j] == pytest.approx(float(lp[j - 1, ids[j]]), abs=1e-4)
            best = lp[j - 1].topk(2)
            want = {tiny.tokenizer.token_text(int(i)): float(v)
                    for v, i in zip(best.values, best.indices)}
            assert got.top_logprobs[j] == pytest.approx(want, abs=1e-4)
        # each token starts where the text before it ends
        starts = [len(tiny.tokenizer.decode(ids[:j])) for j in range(len(ids))]
        assert got.text_offset[: len(ids)] == starts
        if max_tokens:  # the greedy token follows, offset past the prompt
            assert got.text_offset[-1] == len(prompt)
            assert got.tokens[-1] == c.text[len(prompt):]
            assert c.text[len(prompt):] == tiny.generate(prompt, max_tokens=1, temperature=0)
            last = torch.log_softmax(tiny.logits(ids)[-1].double(), dim=-1)
            assert got.token_logprobs[-1] == pytest.approx(float(last.max()), abs=1e-4)
            assert r.usage.completion_tokens == 1
        else:
            assert c.text == prompt and r.usage.completion_tokens == 0
        assert r.usage.prompt_tokens == len(ids)


def test_echo_with_sampling_or_more_tokens_goes_through_the_scheduler(server, tiny):
    """Only one greedy token comes from the scoring pass; anything else is decoded as usual,
    and the prompt's log-probs lead the generated ones either way."""
    url, _ = server
    prompt = "the dog ran"
    n_prompt = len(tiny.encode(prompt))
    for greedy, extra in ((True, {"max_tokens": 4, "temperature": 0}),
                          (False, {"max_tokens": 1, "n": 2, "seed": 5})):
        r = client(url).completions.create(model="tiny", prompt=prompt, logprobs=1, echo=True,
                                           **extra)
        for c in r.choices:
            assert c.text.startswith(prompt)
            assert len(c.logprobs.tokens) == n_prompt + extra["max_tokens"]
            assert c.logprobs.text_offset[n_prompt] == len(prompt)
        if greedy:
            want = tiny.generate(prompt, max_tokens=4, temperature=0)
            assert r.choices[0].text == prompt + want


def test_echo_of_token_ids_and_without_logprobs(server, tiny):
    url, _ = server
    ids = tiny.encode("one two three")
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": ids,
                                                  "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}).json()
    c = r["choices"][0]
    assert c["text"] == tiny.tokenizer.decode(ids)
    assert len(c["logprobs"]["token_logprobs"]) == len(ids)
    assert c["logprobs"]["top_logprobs"][1] == {}
    plain = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "one two",
                                                      "max_tokens": 3, "temperature": 0,
                                                      "echo": True}).json()["choices"][0]
    direct = tiny.generate("one two", max_tokens=3, temperature=0)
    assert plain["text"] == "one two" + direct and plain["logprobs"] is None


def test_client_disconnect_frees_the_row(tiny):
    app = create_app({"tiny": tiny}, max_batch=2)
    slow_steps(app, 0.01)
    sched = app.state.schedulers["tiny"]
    with ServerThread(app) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            next(r.iter_lines())
            assert sched.active == 1
        deadline = time.monotonic() + 3
        while sched.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.active == 0
        assert sched.steps < 150  # it stopped long before its 200 tokens
        # non-streaming: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        deadline = time.monotonic() + 3
        while sched.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sched.active == 0


def test_per_request_timeout(tiny):
    app = create_app({"tiny": tiny}, timeout=0.3)
    slow_steps(app, 0.01)
    with ServerThread(app) as url:
        r = httpx.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 200}
        )
        assert r.status_code == 408 and "--timeout" in r.json()["error"]["message"]
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True},
        ) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert '"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert app.state.schedulers["tiny"].active == 0
        ok = httpx.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}
        )
        assert ok.status_code == 200


def test_fuzzed_bodies_never_get_a_5xx(tiny):
    """A few hundred random bodies: mixes of real and junk fields, values of every JSON type."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    app = create_app({"tiny": tiny}, max_batch=8, max_len=48)
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-5, 70)
        | st.floats(allow_nan=False, width=32)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=6,
    )
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "x"]),
            "content": st.text(max_size=20) | json_values,
        }
    )
    fields = {
        "model": st.sampled_from(["tiny", "other"]) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "prompt": st.text(max_size=20) | st.lists(st.integers(-2, 300), max_size=4) | json_values,
        "max_tokens": st.integers(-2, 12) | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-0.5, 1.5) | json_values,
        "n": st.integers(-1, 3) | json_values,
        "stream": st.booleans() | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
        "seed": st.integers(-(2**70), 2**70) | json_values,
        "logprobs": st.booleans() | st.integers(-1, 6) | json_values,
        "top_logprobs": st.integers(-1, 25) | json_values,
        "response_format": st.sampled_from(
            [{"type": "json_object"}, {"type": "text"}, {"type": "json_schema"}]
        )
        | json_values,
        "junk": json_values,
    }
    body = st.fixed_dictionaries({}, optional=fields)
    raw = st.binary(max_size=30)

    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=30) as h:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), payload=body | raw
        )
        def check(path, payload):
            if not isinstance(payload, bytes):  # Python's json writes (and reads) Infinity, NaN
                payload = json.dumps(payload).encode()
            r = h.post(path, content=payload, headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (payload, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"]

        check()
        assert h.get("/health").status_code == 200


@pytest.mark.integration
def test_sigterm_finishes_running_requests_and_exits_0(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from serve_util import free_port

    folder = tiny.save(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "POCKETLM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pocketlm.cli",
            "serve",
            str(folder),
            "--port",
            str(port),
            "--grace",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        body = {
            "model": "tiny",
            "prompt": "x",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        }
        pieces = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            pieces.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            pieces += [x for x in lines if x]
        events = [json.loads(x[6:]) for x in pieces if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
        assert pieces[-1] == "data: [DONE]"
        assert proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_real_model_chat_through_the_server_equals_model_chat(default_model):
    app = create_app({"smollm2-135m-instruct": default_model}, max_batch=2, max_len=512)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
    }
    with ServerThread(app) as url:
        c = client(url)
        r = c.chat.completions.create(
            model="smollm2-135m-instruct", messages=messages, max_tokens=16, temperature=0
        )
        js = c.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=messages,
            max_tokens=40,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
    assert r.choices[0].message.content == default_model.chat(
        messages, max_tokens=16, temperature=0
    )
    assert "Paris" in r.choices[0].message.content
    answer = json.loads(js.choices[0].message.content)
    assert set(answer) == {"country", "capital"} and js.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_logged_only_with_log_prompts(tiny, caplog, log_prompts):
    app = create_app({"tiny": tiny}, log_prompts=log_prompts)
    with caplog.at_level("INFO", logger="pocketlm.serve"), ServerThread(app) as url:
        client(url).completions.create(model="tiny", prompt="my secret plan", max_tokens=2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "completion request to tiny" in logged
    assert ("my secret plan" in logged) is log_prompts


def test_one_request_larger_than_the_server_is_refused(tiny):
    app = create_app({"tiny": tiny}, max_batch=2, max_queue=2)
    with ServerThread(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "n": 5})
    assert r.status_code == 400 and "split it" in r.json()["error"]["message"]


def test_huge_body_is_refused_with_413(server):
    url, _ = server
    big = b'{"model": "tiny", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    r = httpx.post(url + "/v1/completions", content=big)
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]
