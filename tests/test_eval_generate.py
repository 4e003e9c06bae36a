"""Generative tasks through the engine's scheduler, resuming from the cache, ppl:FILE, the
CLI's new options, and GSM8K on the real model (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.evaluate import evaluate
from pocketlm.evaluate.backends import LocalLM

GEN = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs:
  until: ["\\n\\n", "zz"]
  max_gen_toks: 10
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\S+)"
      - function: take_first
"""


@pytest.fixture
def gen_task(tmp_path):
    rows = [{"q": "Question: " + "the cat " * (i % 4) + f"{i}?", "a": "x"} for i in range(7)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "gen.yaml"
    path.write_text(GEN)
    return path, rows


def test_scheduler_generation_equals_one_prompt_at_a_time_greedy(tiny_model, gen_task):
    _, rows = gen_task
    lm = LocalLM(tiny_model, window=255, batch_size=4)
    got = {}
    lm.generate({i: r["q"] for i, r in enumerate(rows)}, ["\n\n", "zz"], 10,
                lambda k, t: got.__setitem__(k, t))
    for i, r in enumerate(rows):
        alone = tiny_model.generate(r["q"], max_tokens=10, temperature=0.0, stop=["\n\n", "zz"])
        assert got[i] == alone


def test_generative_task_decodes_many_sequences_at_once(tiny_model, gen_task, tmp_path,
                                                        monkeypatch):
    from pocketlm.engine import scheduler

    widths = []
    real = scheduler.decode_step

    def counting(model, cache, tokens, positions):
        widths.append(tokens.shape[0])
        return real(model, cache, tokens, positions)

    monkeypatch.setattr(scheduler, "decode_step", counting)
    path, _ = gen_task
    r = evaluate(tiny_model, str(path), batch_size=4, cache_dir=tmp_path / "c", progress=False,
                 details=True)
    m = r["tasks"]["toy_gen"]
    assert m["n"] == 7 and max(widths) == 4
    texts = r["items"]["toy_gen"]["predictions"]
    from pocketlm.evaluate.taskfile import apply_filter

    steps = [{"function": "regex", "regex_pattern": r"(\S+)"}]
    hits = [float(apply_filter(steps, t) == "x") for t in texts]
    assert m["exact_match,first-word"] == sum(hits) / 7


def test_an_interrupted_generative_run_resumes_without_decoding_again(
    tiny_model, gen_task, tmp_path, monkeypatch
):
    path, _ = gen_task
    calls = []
    real = LocalLM.generate

    def stop_after_three(self, prompts, until, n, on_done):
        def done(k, t):
            on_done(k, t)
            calls.append(k)
            if len(calls) == 3:
                raise KeyboardInterrupt

        return real(self, prompts, until, n, done)

    monkeypatch.setattr(LocalLM, "generate", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_model, str(path), cache_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(LocalLM, "generate", real)
    seen = []

    def record(self, prompts, until, n, on_done):
        seen.extend(prompts)
        return real(self, prompts, until, n, on_done)

    monkeypatch.setattr(LocalLM, "generate", record)
    resumed = evaluate(tiny_model, str(path), cache_dir=tmp_path / "c", progress=False)
    fresh = evaluate(tiny_model, str(path), use_cache=False, progress=False)
    assert resumed["tasks"]["toy_gen"]["resumed_items"] == 3 and len(seen) == 4 + 7
    assert resumed["tasks"]["toy_gen"]["exact_match,first-word"] == \
        fresh["tasks"]["toy_gen"]["exact_match,first-word"]


def _plain_ll(model, ids: list[int]) -> float:
    lp = torch.log_softmax(model.logits(ids).double(), dim=-1)
    return sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)))


def test_ppl_on_a_text_file_equals_a_plain_pass(tiny_model, tmp_path):
    docs = ["The cat sat on the mat.", "A second document,\nwith two lines."]
    (tmp_path / "notes.txt").write_text("\n\n".join(docs) + "\n")
    r = evaluate(tiny_model, f"ppl:{tmp_path / 'notes.txt'}", use_cache=False, progress=False)
    m = r["tasks"]["ppl:notes.txt"]
    tok = tiny_model.tokenizer
    ll = sum(_plain_ll(tiny_model, [tok.eos_id] + tok.encode(d)) for d in docs)
    n = sum(len(tok.encode(d)) for d in docs)
    nbytes = sum(len(d.encode()) for d in docs)
    assert m["tokens"] == n and m["bytes"] == nbytes
    assert m["token_perplexity"] == pytest.approx(float(torch.tensor(-ll / n).exp()), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(-ll / nbytes / 0.6931471805599453, rel=1e-5)


def test_ppl_windows_cover_long_texts_and_score_each_token_once(tiny_model, tmp_path):
    text = "the quick brown fox " * 40  # ~800 byte tokens: several 64-token windows
    (tmp_path / "long.txt").write_text(text)
    r = evaluate(tiny_model, f"ppl:{tmp_path / 'long.txt'}", context=64, use_cache=False,
                 progress=False)
    from pocketlm.evaluate.perplexity import rolling_windows
    from pocketlm.evaluate.scoring import score_windows

    ids = tiny_model.tokenizer.encode(text)  # the loader keeps the trailing space
    m = r["tasks"]["ppl:long.txt"]
    windows = list(rolling_windows(ids, tiny_model.tokenizer.eos_id, 64, 64))
    ll = sum(x.logprob for x in score_windows(tiny_model.network, windows))
    assert len(windows) > 5 and m["tokens"] == len(ids)
    assert m["loglikelihood"] == pytest.approx(ll, rel=1e-5)


def test_ppl_on_prompt_response_jsonl_scores_the_responses(tiny_model, tmp_path):
    rows = [{"prompt": "Say hi", "response": "hi there"}, {"prompt": "Count", "response": "1 2 3"}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = evaluate(tiny_model, f"ppl:{tmp_path / 'sft.jsonl'}", use_cache=False, progress=False)
    m = r["tasks"]["ppl:sft.jsonl"]
    from pocketlm.train.data import encode_record

    want = sum(sum(encode_record(x, tiny_model.tokenizer).target) for x in rows)
    assert m["tokens"] == want and m["token_perplexity"] > 1


def test_ppl_missing_file_is_a_clear_error(tiny_model, tmp_path):
    from pocketlm.errors import PocketError

    with pytest.raises(PocketError, match="no data file at"):
        evaluate(tiny_model, f"ppl:{tmp_path / 'nope.txt'}", progress=False)


def test_cli_help_teaches_the_new_options(capsys):
    from pocketlm.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for s in ("--endpoint", "--trust-task-code", "--num-fewshot", "ppl:FILE", "gsm8k",
              "FILE.yaml"):
        assert s in out


def test_cli_runs_a_task_file_and_refuses_a_bad_one(tiny_model, gen_task, tmp_path, capsys):
    from pocketlm.cli import main

    path, _ = gen_task
    folder = tiny_model.save(tmp_path / "tiny")
    rc = main(["eval", str(folder), "--tasks", str(path), "--cache-dir", str(tmp_path / "c"),
               "--threads", "1"])
    assert rc == 0 and "exact_match,first-word" in capsys.readouterr().out
    path.write_text(GEN.replace("output_type: generate_until", "output_type: generate"))
    assert main(["eval", "no-such-model", "--tasks", str(path)]) == 2
    assert "output_type 'generate'" in capsys.readouterr().err


# -- the real model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_model():
    import pocketlm
    from pocketlm.formats.registry import home

    if not any((home() / "models").glob("smollm2-135m-instruct*")):
        pytest.skip("smollm2-135m-instruct is not pulled")
    return pocketlm.load("smollm2-135m-instruct")


@pytest.mark.slow
def test_real_model_gsm8k_five_shot_generates_answers(real_model, shared_data):
    r = evaluate(real_model, "gsm8k", limit=4, data_dir=shared_data, use_cache=False,
                 progress=False, batch_size=4, details=True)
    m = r["tasks"]["gsm8k"]
    assert m["n"] == 4
    texts = r["items"]["gsm8k"]["predictions"]
    assert all(t.strip() for t in texts)  # it answers, and stops before the next "Question:"
    assert not any("Question:" in t for t in texts)
    assert 0 <= m["exact_match,strict-match"] <= m["exact_match,flexible-extract"] + 1
