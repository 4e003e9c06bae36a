"""Structured pruning: a genuinely smaller model whose outputs equal the original's with the
removed heads / channels / layers zeroed out (the surgery is exact)."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model

import pocketlm
from pocketlm.compress.prune import _copy_model
from pocketlm.compress.structured import channel_importance, head_importance, plan, prune_structured
from pocketlm.errors import InvalidArgument


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((shared_data / "tiny-shakespeare/input.txt").read_text()[:20_000])
    return path


@pytest.fixture(scope="module")
def model():
    # 8 query heads in 2 key/value groups, so both head modes have a choice to make.
    return make_tiny_model(seed=3, n_heads=8, n_kv_heads=2, n_layers=4)


def _rows_matching(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """For each row of ``small``, the index of the equal row of ``big`` (random rows are unique)."""
    return [int(torch.nonzero((big == r).all(1))[0]) for r in small]


def _same_outputs(a, b, text="Shall I compare thee to a summer's day?"):
    ids = a.encode(text)
    torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=1e-5, atol=1e-5)


SETTINGS = {"samples": 4, "seq_len": 64, "progress": False}


def test_removing_query_heads_within_each_group_is_exact(model, calib_file, tmp_path):
    small = prune_structured(model, "heads", 0.25, calibration=calib_file, **SETTINGS)
    assert (small.config.n_heads, small.config.n_kv_heads) == (6, 2)
    assert small.config.n_params < model.config.n_params
    removed = small.card.steps[-1]["settings"]["removed"]
    assert [len(r) for r in removed] == [2, 2, 2, 2]
    for heads in removed:  # one from each group of 4: heads 0-3 share kv head 0, 4-7 kv head 1
        assert sorted(h // 4 for h in heads) == [0, 1]
    zeroed = _copy_model(model)
    E = model.config.head_dim
    for block, heads in zip(zeroed.network.layers, removed):
        with torch.no_grad():
            for h in heads:
                block.self_attn.o_proj.weight[:, h * E:(h + 1) * E] = 0.0
    _same_outputs(small, zeroed)
    back = pocketlm.load(small.save(tmp_path / "heads"))
    assert back.config == small.config
    _same_outputs(back, small)


def test_removing_whole_key_value_groups_is_exact(model, calib_file):
    small = prune_structured(model, "heads", 0.5, whole_groups=True, calibration=calib_file,
                             **SETTINGS)
    assert (small.config.n_heads, small.config.n_kv_heads) == (4, 1)
    zeroed = _copy_model(model)
    E = model.config.head_dim
    for block, heads in zip(zeroed.network.layers, small.card.steps[-1]["settings"]["removed"]):
        assert heads in ([0, 1, 2, 3], [4, 5, 6, 7])  # a whole group, queries and kv together
        with torch.no_grad():
            for h in heads:
                block.self_attn.o_proj.weight[:, h * E:(h + 1) * E] = 0.0
    _same_outputs(small, zeroed)


def test_removing_mlp_channels_is_exact(model, calib_file, tmp_path):
    small = prune_structured(model, "mlp", 0.25, calibration=calib_file, **SETTINGS)
    assert small.config.hidden_dim == 96
    d, f = model.config.dim, model.config.hidden_dim
    assert model.config.n_params - small.config.n_params == 4 * 3 * d * (f - 96)
    zeroed = _copy_model(model)
    for big, little in zip(zeroed.network.layers, small.network.layers):
        kept = _rows_matching(little.mlp.gate_proj.weight, big.mlp.gate_proj.weight)
        assert len(set(kept)) == 96 and kept == sorted(kept)
        assert torch.equal(little.mlp.down_proj.weight, big.mlp.down_proj.weight[:, kept])
        with torch.no_grad():
            big.mlp.down_proj.weight[:, [c for c in range(f) if c not in kept]] = 0.0
    _same_outputs(small, zeroed)
    back = pocketlm.load(small.save(tmp_path / "mlp"))
    assert back.config.hidden_dim == 96
    assert back.generate("to be", max_tokens=4, temperature=0) == small.generate(
        "to be", max_tokens=4, temperature=0)


def test_removing_layers_is_exact_and_drops_the_least_influential(model, calib_file):
    small = prune_structured(model, "layers", 0.5, calibration=calib_file, **SETTINGS)
    settings = small.card.steps[-1]["settings"]
    assert small.config.n_layers == 2 and len(settings["removed"]) == 2
    influence = settings["block_influence"]
    kept = [i for i in range(4) if i not in settings["removed"]]
    assert max(influence[i] for i in settings["removed"]) <= min(influence[i] for i in kept)
    zeroed = _copy_model(model)
    with torch.no_grad():  # a block whose two output projections are zero adds nothing
        for i in settings["removed"]:
            zeroed.network.layers[i].self_attn.o_proj.weight.zero_()
            zeroed.network.layers[i].mlp.down_proj.weight.zero_()
    _same_outputs(small, zeroed)
    assert settings["params_after"] == small.config.n_params < settings["params_before"]


def test_importance_scores_have_known_values():
    # o_proj (D=2, H*E = 2 heads x 1): head 0 writes [1, 0], head 1 writes [0, 3].
    o = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([[2.0, 1.0], [0.0, 1.0]])  # two tokens' head outputs
    # energy_h = sum_t ||W_h y_h(t)||^2: head 0 = 4 + 0, head 1 = 9 * (1 + 1)
    assert head_importance(o, y.T.double() @ y.double(), 2).tolist() == [4.0, 18.0]
    down = torch.tensor([[1.0, 2.0], [1.0, 0.0]])  # channel 0 column norm^2 2, channel 1 4
    a = torch.tensor([[3.0, 1.0], [1.0, 1.0]])  # sum_t a_c^2 = [10, 2]
    assert channel_importance(down, (a * a).sum(0)).tolist() == [20.0, 8.0]


def test_ratios_that_remove_nothing_or_everything_are_refused(model):
    cfg = model.config
    with pytest.raises(InvalidArgument, match="heads, mlp, layers"):
        plan(cfg, "neurons", 0.5)
    with pytest.raises(InvalidArgument, match=r"\(0, 1\)"):
        plan(cfg, "mlp", 1.0)
    with pytest.raises(InvalidArgument, match="per group"):
        plan(cfg, "heads", 0.05)
    with pytest.raises(InvalidArgument, match="groups"):
        plan(cfg, "heads", 0.9, whole_groups=True)
    with pytest.raises(InvalidArgument, match="layers"):
        plan(cfg, "layers", 0.01)
    assert plan(cfg, "layers", 0.25) == {"n_layers": 3}
