"""`pocketlm prune` as a user runs it, on a tiny model folder; and one run on the real model."""

from __future__ import annotations

import json

import pytest
import torch

import pocketlm
from pocketlm.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, shared_data):
    from tiny import make_tiny_model

    root = tmp_path_factory.mktemp("cli")
    (root / "calib.txt").write_text((shared_data / "tiny-shakespeare/input.txt").read_text()[:20_000])
    make_tiny_model(seed=1, n_heads=4, n_kv_heads=2).save(root / "tiny")
    return root


def test_prune_wanda_2of4_from_the_command_line(tiny_folder, capsys):
    out = tiny_folder / "wanda24"
    rc = main(["prune", str(tiny_folder / "tiny"), "--method", "wanda", "--pattern", "2:4",
               "--calibration", str(tiny_folder / "calib.txt"), "--samples", "4", "--seq-len", "64",
               "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "50.0% of block weights are zero" in printed and str(out) in printed
    m = pocketlm.load(out)
    w = m.network.layers[0].mlp.up_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    step = json.loads((out / "card.json").read_text())["steps"][-1]
    assert step["settings"]["method"] == "wanda" and step["settings"]["pattern"] == "2:4"
    assert step["settings"]["samples"] == 4 and len(step["settings"]["calibration_sha256"]) == 64


def test_prune_structured_heads_from_the_command_line(tiny_folder, capsys):
    out = tiny_folder / "heads"
    rc = main(["prune", str(tiny_folder / "tiny"), "--structured", "heads", "--ratio", "0.5",
               "--whole-groups", "--calibration", str(tiny_folder / "calib.txt"), "--samples", "4",
               "--seq-len", "64", "-o", str(out)])
    assert rc == 0
    assert "fewer)" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 1)
    assert pocketlm.load(out).generate("to", max_tokens=3, temperature=0)


@pytest.mark.parametrize("argv, message", [
    (["--method", "wanda"], "--sparsity"),
    (["--structured", "mlp"], "--ratio"),
    (["--method", "wanda", "--ratio", "0.5"], "--structured"),
    (["--structured", "heads", "--ratio", "0.1"], "per group"),
    (["--method", "magnitude", "--pattern", "3"], "N:M"),
    (["--method", "wanda", "--sparsity", "0.5", "--calibration", "/nope.txt"], "does not exist"),
])
def test_bad_input_is_one_clear_line(tiny_folder, capsys, argv, message):
    rc = main(["prune", str(tiny_folder / "tiny"), *argv, "-o", str(tiny_folder / "bad")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tiny_folder / "bad" / "config.json").exists()


@pytest.mark.slow
def test_real_model_wanda_beats_magnitude_and_structured_pruning_shrinks_it(default_model, tmp_path):
    """End to end on SmolLM2-135M with a little calibration data: Wanda at 50% keeps the
    perplexity of a WikiText-2 test passage clearly below magnitude pruning's, and removing
    40% of the MLP channels gives a smaller model that saves, loads and speaks."""
    from pocketlm.compress.prune import prune
    from pocketlm.compress.structured import prune_structured

    text = (pocketlm.api.Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/"
            "wiki.test.raw").read_text()[:6000]
    ids = torch.tensor(default_model.encode(text)[:512])

    def ppl(model):
        logits = model.logits(ids[:-1])
        return float(torch.nn.functional.cross_entropy(logits, ids[1:]).exp())

    calib = {"samples": 4, "seq_len": 128, "progress": False}
    base = ppl(default_model)
    magnitude = ppl(prune(default_model, "magnitude", sparsity=0.5, progress=False))
    wanda = prune(default_model, "wanda", sparsity=0.5, **calib)
    assert base < ppl(wanda) < 0.8 * magnitude, (base, ppl(wanda), magnitude)

    small = prune_structured(default_model, "mlp", 0.4, **calib)
    assert small.config.hidden_dim == 1536 - round(0.4 * 1536)
    assert small.config.n_params < 0.8 * default_model.config.n_params
    back = pocketlm.load(small.save(tmp_path / "small"))
    assert back.config == small.config
    assert torch.equal(back.logits(ids[:32]), small.logits(ids[:32]))
