"""Scale tuning after GPTQ (pocketlm.compress.tune): only the fp16 scales move, the model moves
toward its float original, and the result saves and loads like any quantized model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pocketlm
from pocketlm.compress import quantize
from pocketlm.compress.calibration import calibration_samples, calibration_tiles
from pocketlm.compress.qlinear import QLinear
from pocketlm.compress.tune import kl_to_teacher, teacher_log_probs, tune, tune_scales
from pocketlm.errors import InvalidArgument, UnsupportedModel

IDS = list(range(10, 60))
KW = {"method": "gptq", "bits": 4, "group_size": 32, "samples": 6, "seq_len": 48,
      "progress": False}
TUNE = {"tune_steps": 40, "tune_lr": 3e-3, "tune_batch": 2}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "cat",
             "sleeps", "in", "warm", "sun", "and", "birds", "sing", "songs", "of", "spring",
             "across", "green", "fields"]
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    path = tmp_path_factory.mktemp("tune") / "calib.txt"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def made(calib_file):
    """The float tiny model and, from it, GPTQ int4 g32 untuned, tuned, and tuned with norms."""
    from tiny import make_tiny_model

    model = make_tiny_model()
    return {"float": model, "plain": quantize(model, calibration=calib_file, **KW),
            "tuned": quantize(model, calibration=calib_file, **KW, **TUNE),
            "norms": quantize(model, calibration=calib_file, **KW, **TUNE, tune_norms=True)}


def _mean_kl(model, reference, batch) -> float:
    teacher = teacher_log_probs(reference.network, batch)
    with torch.inference_mode():
        return sum(kl_to_teacher(model.network(batch[i: i + 1])[0], teacher[i]).item()
                   for i in range(batch.shape[0])) / batch.shape[0]


def _qlinears(model) -> dict[str, QLinear]:
    return {n: m for n, m in model.network.named_modules() if isinstance(m, QLinear)}


def test_tuning_moves_only_scales_and_lowers_the_kl_to_the_float_model(made, calib_file):
    tiny_model, plain, tuned = made["float"], made["plain"], made["tuned"]
    batch, _ = calibration_tiles(tiny_model.tokenizer, calib_file, 48)  # the text it tuned on
    before, after = _mean_kl(plain, tiny_model, batch), _mean_kl(tuned, tiny_model, batch)
    assert after < 0.8 * before
    a, b = _qlinears(plain), _qlinears(tuned)
    assert a.keys() == b.keys() and len(a) == 7 * tiny_model.config.n_layers
    changed = 0
    for name in a:
        assert torch.equal(a[name].qweight, b[name].qweight), name  # codes as GPTQ chose them
        assert torch.equal(a[name].zeros, b[name].zeros), name
        assert b[name].scales.dtype == torch.float16
        changed += not torch.equal(a[name].scales, b[name].scales)
    assert changed == len(a)
    # Without --tune-norms every float tensor (norms, int8 head) is untouched.
    sa, sb = plain.network.state_dict(), tuned.network.state_dict()
    for k in sa:
        if not k.endswith(".scales") or k.startswith("embed_tokens"):
            assert torch.equal(sa[k], sb[k]), k
    settings = tuned.card.steps[-1]["settings"]["tune"]
    assert (settings["steps"], settings["lr"], settings["norms"]) == (40, 3e-3, False)
    assert settings["kl_last_10pct_steps"] < settings["kl_first_step"]


def test_tuning_norms_changes_norm_weights_and_nothing_else_float(made):
    tiny_model, plain, tuned = made["float"], made["plain"], made["norms"]
    sa, sb = plain.network.state_dict(), tuned.network.state_dict()
    norms = [k for k in sa if "norm" in k]
    assert len(norms) == 2 * tiny_model.config.n_layers + 1
    assert all(not torch.equal(sa[k], sb[k]) for k in norms)
    assert torch.equal(sa["embed_tokens.qweight"], sb["embed_tokens.qweight"])
    assert torch.equal(sa["embed_tokens.scales"], sb["embed_tokens.scales"])


def test_tuned_model_saves_and_loads_with_bit_identical_logits(made, tmp_path):
    plain, tuned = made["plain"], made["norms"]
    before = tuned.logits(IDS)
    plain.save(tmp_path / "plain")
    tuned.save(tmp_path / "tuned")
    loaded = pocketlm.load(tmp_path / "tuned")
    assert torch.equal(loaded.logits(IDS), before)
    assert loaded.card.steps[-1]["settings"]["tune"]["norms"] is True
    size = (tmp_path / "tuned" / "model.safetensors").stat().st_size
    assert size == (tmp_path / "plain" / "model.safetensors").stat().st_size


def test_tune_is_reproducible_and_adds_a_card_step(made, calib_file):
    tiny_model, plain = made["float"], made["plain"]
    kw = {"steps": 3, "lr": 1e-3, "calibration": calib_file, "samples": 6, "seq_len": 48,
          "progress": False}
    kept = copy.deepcopy(plain.network.state_dict())
    tuned = tune(plain, tiny_model, **kw)
    assert torch.equal(tuned.logits(IDS), tune(plain, tiny_model, **kw).logits(IDS))
    assert [s["step"] for s in tuned.card.steps][-2:] == ["quantize", "tune"]
    assert all(torch.equal(v, plain.network.state_dict()[k]) for k, v in kept.items())  # a copy
    assert not torch.equal(tuned.logits(IDS), plain.logits(IDS))
    # Windows drawn by the caller (a bench's own draw) tune the same way and reach the card.
    batch, _ = calibration_tiles(plain.tokenizer, calib_file, 48, 6, 0)
    given = tune(plain, tiny_model, steps=3, lr=1e-3, progress=False,
                 windows=(batch, {"drawn": "by the caller"}))
    assert torch.equal(given.logits(IDS), tuned.logits(IDS))
    assert given.card.steps[-1]["settings"]["calibration"] == {"drawn": "by the caller"}
    with pytest.raises(UnsupportedModel, match="quantized model"):
        tune(tiny_model, tiny_model, steps=3, calibration=calib_file, samples=6, seq_len=48)
    with pytest.raises(UnsupportedModel, match="QLinear"):
        tune_scales(copy.deepcopy(tiny_model.network), tiny_model.network,
                    torch.zeros(1, 8, dtype=torch.long), steps=1)


def test_without_memory_for_the_cache_the_float_model_runs_every_step_same_result(
        made, calib_file, caplog):
    tiny_model, plain = made["float"], made["plain"]
    batch, _ = calibration_samples(tiny_model.tokenizer, calib_file, 6, 48, 0)
    hidden_bytes = batch.numel() * tiny_model.config.dim * 4
    runs = {}
    for budget in (None, hidden_bytes, 1000):  # log-probs fit / only hidden states / nothing
        net = copy.deepcopy(plain.network)
        caplog.clear()
        with caplog.at_level("WARNING"):
            stats = tune_scales(net, tiny_model.network, batch, steps=8, batch_windows=2,
                                progress=False, cache_bytes=budget)
        runs[budget] = (net, stats, caplog.text)
    assert runs[None][1]["teacher_cached"] == "log-probs" and not runs[None][2]
    assert runs[hidden_bytes][1]["teacher_cached"] == "hidden states"
    assert "running its output layer at every step" in runs[hidden_bytes][2]
    assert runs[1000][1]["teacher_cached"] is False
    assert "recomputing them at every step" in runs[1000][2]
    for budget in (hidden_bytes, 1000):
        assert runs[budget][1]["kl_last_10pct_steps"] == runs[None][1]["kl_last_10pct_steps"]
        for (n, x), (_, y) in zip(runs[None][0].named_buffers(), runs[budget][0].named_buffers()):
            assert torch.equal(x, y), n


@pytest.mark.parametrize("bad,match", [({"tune_steps": -1}, "steps must be an integer >= 0"),
                                       ({"tune_steps": 1.5}, "steps must be an integer >= 0"),
                                       ({"tune_steps": 2, "tune_lr": 0}, "learning rate"),
                                       ({"tune_steps": 2, "tune_lr": -1e-3}, "learning rate"),
                                       ({"tune_steps": 2, "tune_lr": float("nan")},
                                        "learning rate"),
                                       ({"tune_steps": 2, "tune_batch": 0}, "at least 1 window"),
                                       ({"tune_steps": 2, "tune_samples": 0},
                                        "tune samples must be at least 1"),
                                       ({"tune_steps": 2, "tune_generated": -1},
                                        "generated tuning windows must be an integer >= 0"),
                                       ({"tune_generated": 8}, "set tune steps too")])
def test_bad_tune_settings_fail_before_any_work(tiny_model, calib_file, bad, match):
    with pytest.raises(InvalidArgument, match=match):
        quantize(tiny_model, calibration=calib_file, **KW, **bad)


def test_cli_rejects_bad_tune_settings_before_loading(tmp_path, capsys):
    from pocketlm.cli import main

    rc = main(["quantize", "no-such-model", "--method", "gptq", "--bits", "4", "--tune-steps",
               "10", "--tune-lr", "0", "-o", str(tmp_path / "o")])
    assert rc not in (0, None)
    assert "learning rate must be a finite number > 0" in capsys.readouterr().err


def test_interrupted_tuning_resumes_and_ends_where_an_uninterrupted_run_does(
        made, calib_file, tmp_path, monkeypatch):
    from pocketlm.train import checkpoint

    tiny_model, plain = made["float"], made["plain"]
    batch, _ = calibration_samples(tiny_model.tokenizer, calib_file, 6, 48, 0)
    kw = {"steps": 6, "batch_windows": 2, "norms": True, "progress": False,
          "checkpoint_every": 2}
    whole = copy.deepcopy(plain.network)
    expected = tune_scales(whole, tiny_model.network, batch, **kw)
    real_save, saved_at = checkpoint.save, []

    def save_then_die(folder, state):
        real_save(folder, state)
        saved_at.append(state["step"])
        if saved_at == [2, 4]:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tune_scales(copy.deepcopy(plain.network), tiny_model.network, batch,
                    checkpoint_dir=tmp_path / "ck", **kw)
    assert saved_at == [2, 4]
    resumed = copy.deepcopy(plain.network)
    got = tune_scales(resumed, tiny_model.network, batch, checkpoint_dir=tmp_path / "ck", **kw)
    assert saved_at == [2, 4]  # steps 5-6 only, and no checkpoint after the last step
    assert got["kl_last_10pct_steps"] == expected["kl_last_10pct_steps"]
    for (n, x), (_, y) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(x, y), n
    # Other settings never pick up that checkpoint.
    other = copy.deepcopy(plain.network)
    tune_scales(other, tiny_model.network, batch, checkpoint_dir=tmp_path / "ck",
                **{**kw, "steps": 5})
    fresh = copy.deepcopy(plain.network)
    tune_scales(fresh, tiny_model.network, batch, **{**kw, "steps": 5})
    assert all(torch.equal(x, y) for x, y in zip(other.state_dict().values(),
                                                 fresh.state_dict().values()))


def test_quantize_with_tuning_resumes_after_an_interruption(tiny_model, calib_file, tmp_path,
                                                           monkeypatch):
    from pocketlm.train import checkpoint

    ckpt = tmp_path / "out.partial"
    kw = {**KW, "calibration": calib_file, "tune_steps": 6, "tune_batch": 2,
          "checkpoint_dir": str(ckpt)}
    full = quantize(tiny_model, **kw).logits(IDS)
    assert not ckpt.exists()  # a finished job leaves nothing behind
    real_save = checkpoint.save

    def save_then_die(folder, state):
        real_save(folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    monkeypatch.setattr("pocketlm.compress.tune.CHECKPOINT_SECONDS", 0)  # save after every step
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model, **kw)
    assert (ckpt / "progress.json").is_file() and (ckpt / "tune" / checkpoint.CHECKPOINT).is_file()
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert torch.equal(quantize(tiny_model, **kw).logits(IDS), full)
    assert not ckpt.exists()


def test_tuning_reads_disjoint_windows_of_the_whole_calibration_file(made, calib_file):
    tiny_model = made["float"]
    ids = tiny_model.tokenizer.encode(Path(calib_file).read_text())
    n = len(ids) // 48
    tiles, info = calibration_tiles(tiny_model.tokenizer, calib_file, 48)
    assert tiles.shape == (n, 48) and info["tiles"] == f"{n} of {n}"
    rows = {tuple(t.tolist()) for t in tiles}
    assert rows == {tuple(ids[i: i + 48]) for i in range(0, n * 48, 48)}
    again, _ = calibration_tiles(tiny_model.tokenizer, calib_file, 48)
    other, _ = calibration_tiles(tiny_model.tokenizer, calib_file, 48, seed=1)
    assert torch.equal(tiles, again) and not torch.equal(tiles, other)  # a seeded order
    first6, _ = calibration_tiles(tiny_model.tokenizer, calib_file, 48, samples=6)
    assert torch.equal(first6, tiles[:6])
    settings = made["tuned"].card.steps[-1]["settings"]["tune"]
    assert settings["calibration"]["tiles"] == info["tiles"]  # quantize tunes on all of them


def test_more_tiles_than_the_file_holds_uses_all_and_says_so(made, calib_file, caplog):
    tok = made["float"].tokenizer
    with caplog.at_level("WARNING"):
        tiles, _ = calibration_tiles(tok, calib_file, 48, samples=10**6)
    assert tiles.shape[0] == len(tok.encode(Path(calib_file).read_text())) // 48
    assert "fewer than the 1000000 asked for" in caplog.text


def test_cli_quantize_with_tuning_records_it_on_the_card(made, calib_file, tmp_path, capsys):
    from pocketlm.cli import main

    made["float"].save(tmp_path / "float")
    rc = main(["quantize", str(tmp_path / "float"), "--method", "gptq", "--bits", "4",
               "--group-size", "32", "--calibration", calib_file, "--samples", "6",
               "--seq-len", "48", "--tune-steps", "3", "--tune-samples", "4", "--tune-norms",
               "-o", str(tmp_path / "int4t")])
    assert rc in (0, None)
    out = pocketlm.load(tmp_path / "int4t")
    tuned = out.card.steps[-1]["settings"]["tune"]
    assert tuned["steps"] == 3 and tuned["norms"] is True
    assert tuned["calibration"]["tiles"].startswith("4 of ")
    assert not (tmp_path / "int4t.partial").exists()  # finished: no checkpoint left behind


# -- windows the float model writes itself ---------------------------------------------------
def test_sampled_windows_begin_with_file_text_and_continue_in_the_models_own_words(
        made, calib_file):
    from pocketlm.compress.calibration import sampled_windows

    tiny = made["float"]
    ids = tiny.tokenizer.encode(Path(calib_file).read_text())
    w, info = sampled_windows(tiny, calib_file, n=5, seq_len=40,
                              prefix=6, batch_size=2, progress=False)
    assert w.shape == (5, 40) and w.dtype == torch.long
    text = " " + " ".join(map(str, ids)) + " "
    for row in w.tolist():  # each prompt is 6 consecutive tokens of the file
        assert " " + " ".join(map(str, row[:6])) + " " in text
    # The continuations are the model's own samples: not copies of the file, and every token
    # one the float model gives real probability (nucleus 0.95 drops only the tail).
    assert not all(" " + " ".join(map(str, row)) + " " in text for row in w.tolist())
    with torch.inference_mode():
        logp = torch.log_softmax(tiny.network(w).float(), -1)
    picked = logp[:, 5:-1].gather(-1, w[:, 6:, None])
    assert picked.min() > -15
    assert (info["windows"], info["prefix_tokens"], info["top_p"]) == (5, 6, 0.95)
    again, _ = sampled_windows(tiny, calib_file, n=5, seq_len=40,
                               prefix=6, batch_size=2, progress=False)
    assert torch.equal(w, again)  # seeded
    other, _ = sampled_windows(tiny, calib_file, n=5, seq_len=40,
                               prefix=6, batch_size=2, seed=1, progress=False)
    assert not torch.equal(w, other)


def test_interrupted_sampling_resumes_to_the_same_windows(made, calib_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from pocketlm.compress.calibration import sampled_windows

    tiny = made["float"]
    kw = {"n": 5, "seq_len": 24, "prefix": 4, "batch_size": 2, "progress": False}
    full, _ = sampled_windows(tiny, calib_file, **kw,
                              checkpoint_dir=tmp_path)
    (saved,) = tmp_path.glob("sampled-*.safetensors")
    assert torch.equal(load_file(str(saved))["windows"], full)
    save_file({"windows": full[:2].contiguous()}, str(saved))  # as if stopped after one batch
    resumed, _ = sampled_windows(tiny, calib_file, **kw,
                                 checkpoint_dir=tmp_path)
    assert torch.equal(resumed, full)


def test_quantize_tunes_on_file_tiles_plus_sampled_windows(made, calib_file, tmp_path, capsys):
    from pocketlm.cli import main

    made["float"].save(tmp_path / "float")
    rc = main(["quantize", str(tmp_path / "float"), "--method", "gptq", "--bits", "4",
               "--group-size", "32", "--calibration", calib_file, "--samples", "6",
               "--seq-len", "48", "--tune-steps", "6", "--tune-samples", "3",
               "--tune-generated", "3", "-o", str(tmp_path / "int4g")])
    assert rc in (0, None)
    tuned = pocketlm.load(tmp_path / "int4g").card.steps[-1]["settings"]["tune"]
    assert tuned["steps"] == 6
    assert tuned["calibration"]["tiles"].startswith("3 of ")
    assert tuned["calibration"]["sampled"]["windows"] == 3
    assert tuned["calibration"]["sampled"]["sampled_from"] == "the float model"
    assert not (tmp_path / "int4g.partial").exists()
