"""Unstructured and N:M pruning: masks with known answers, SparseGPT's reconstruction, the step."""

from __future__ import annotations

import pytest
import torch

import pocketlm
from pocketlm.compress.prune import (
    load_calibration,
    magnitude_mask,
    nm_mask,
    prune,
    sparsegpt_prune,
    sparsity_of,
    wanda_mask,
)
from pocketlm.errors import InvalidArgument


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, shared_data):
    """40 kB of Shakespeare: ~40k byte-level tokens for the tiny model."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((shared_data / "tiny-shakespeare/input.txt").read_text()[:40_000])
    return path


def test_magnitude_mask_is_the_smallest_weights_of_the_matrix():
    w = torch.tensor([[0.5, -0.1, 2.0, 0.3],
                      [-3.0, 0.2, -0.05, 1.0]])
    # 50% of 8 weights: the four smallest |w| anywhere are 0.05, 0.1, 0.2, 0.3.
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, False, True],
                                               [False, True, True, False]]
    # 2:4: the two smallest of each row's group of four.
    assert magnitude_mask(w, pattern=(2, 4)).tolist() == [[False, True, False, True],
                                                          [False, True, True, False]]
    assert magnitude_mask(w, 0.25).sum() == 2


def test_wanda_mask_equals_the_hand_computed_one():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                      [-4.0, 1.0, 0.1, 2.0]])
    x = torch.tensor([[3.0, 0.0, 0.1, 1.0],  # two tokens, four input features
                      [4.0, 1.0, 0.2, 1.0]])
    norm = x.norm(dim=0)  # ||X_j||_2 = [5, 1, sqrt(0.05), sqrt(2)]
    # scores |W| * norm: row 0 = [5, 2, 0.671, 0.707], row 1 = [20, 1, 0.0224, 2.83]
    # -> per row, the two lowest go: row 0 columns 2 and 3, row 1 columns 1 and 2.
    expected = [[False, False, True, True], [False, True, True, False]]
    assert wanda_mask(w, norm, 0.5).tolist() == expected
    assert wanda_mask(w, norm, pattern=(2, 4)).tolist() == expected
    # Magnitude alone would keep column 2 of row 0 (|3.0| is the largest): the norm matters.
    assert not magnitude_mask(w, 0.5)[0, 2]


def test_nm_mask_keeps_n_of_every_m():
    score = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(score, 2, 4)
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()
    with pytest.raises(InvalidArgument, match="N:M"):
        nm_mask(torch.randn(4, 6), 2, 4)


def _layer_and_inputs(seed=0, rows=48, cols=64, tokens=512):
    """A weight and inputs whose features are correlated and differently scaled, like LLMs'."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.exp(torch.randn(cols, generator=g))
    x = (torch.randn(tokens, cols, generator=g) @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) * scale
    w = torch.randn(rows, cols, generator=g)
    return w, x


@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude(amount):
    w, x = _layer_and_inputs()
    sparsity, pattern = amount.get("sparsity"), amount.get("pattern")

    def error(w_pruned):
        return float((x @ w.T - x @ w_pruned.T).pow(2).sum() / (x @ w.T).pow(2).sum())

    mag = w.masked_fill(magnitude_mask(w, sparsity, pattern), 0.0)
    wanda = w.masked_fill(wanda_mask(w, x.norm(dim=0), sparsity, pattern), 0.0)
    sgpt = sparsegpt_prune(w, x.T.double() @ x.double(), sparsity, pattern, blocksize=16)
    assert float((sgpt == 0).float().mean()) == 0.5
    if pattern:
        assert ((sgpt != 0).reshape(48, 16, 4).sum(-1) == 2).all()
    e_mag, e_wanda, e_sgpt = error(mag), error(wanda), error(sgpt)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    assert e_sgpt < 0.7 * e_wanda


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_prune_a_tiny_model_save_and_load_it(tiny_model, calib_file, tmp_path, method, amount):
    pruned = prune(tiny_model, method, calibration=calib_file, samples=4, seq_len=64,
                   progress=False, **amount)
    assert sparsity_of(pruned.network) == 0.5
    assert sparsity_of(tiny_model.network) == 0.0  # the input model is left alone
    for block in pruned.network.layers:
        for lin in (block.self_attn.q_proj, block.mlp.down_proj):
            if "pattern" in amount:
                groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
                assert (groups == 2).all()
    step = pruned.card.steps[-1]
    assert step["step"] == "prune" and step["settings"]["method"] == method
    if method != "magnitude":
        assert len(step["settings"]["calibration_sha256"]) == 64
        assert step["settings"]["samples"] == 4 and step["settings"]["seq_len"] == 64
    back = pocketlm.load(pruned.save(tmp_path / "out"))
    ids = tiny_model.encode("to be or not to be")
    assert torch.equal(back.logits(ids), pruned.logits(ids))
    assert back.card.steps[-1]["settings"] == step["settings"]


def test_bitmask_storage_is_smaller_and_loads_back_bit_identical(tiny_model, tmp_path):
    from pocketlm.compress.prune import save_bitmask

    pruned = prune(tiny_model, "magnitude", sparsity=0.5, progress=False)
    dense = pruned.save(tmp_path / "dense")
    packed = save_bitmask(pruned, tmp_path / "packed")
    linear_bytes = sum(lin.weight.numel() * 4 for b in pruned.network.layers
                       for lin in (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                   b.self_attn.o_proj, b.mlp.gate_proj, b.mlp.up_proj,
                                   b.mlp.down_proj))
    from safetensors.torch import load_file

    stored = load_file(packed / "model.safetensors")
    data_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    dense_data = sum(t.numel() * t.element_size() for t in load_file(dense / "model.safetensors").values())
    # per linear: half the fp32 values, 1 bit a weight of mask, 16 bytes of shape
    n_linear = 7 * len(pruned.network.layers)
    assert data_bytes == dense_data - linear_bytes // 2 + linear_bytes // 32 + 16 * n_linear
    assert (packed / "model.safetensors").stat().st_size < 0.75 * (dense / "model.safetensors").stat().st_size
    back = pocketlm.load(packed)
    for name, t in pruned.network.state_dict().items():
        assert torch.equal(back.network.state_dict()[name], t), name
    assert back.card.steps[-1]["settings"]["method"] == "magnitude"


def test_pruning_follows_the_already_pruned_blocks(tiny_model, calib_file):
    """Layer 1's statistics come from layer 0's pruned outputs (the sequential scheme)."""
    from pocketlm.compress.prune import InputStats, _linears, block_context, run_block

    pruned = prune(tiny_model, "wanda", sparsity=0.5, calibration=calib_file, samples=2,
                   seq_len=32, progress=False)
    calib = load_calibration(tiny_model.tokenizer, calib_file, 2, 32)
    net = pruned.network
    ctx = block_context(net, 32)
    x = run_block(net.layers[0], net.embed_tokens(calib.tokens), ctx)  # pruned layer 0's output
    original_block1 = tiny_model.network.layers[1]
    stats = InputStats(_linears(original_block1), gram=False)
    run_block(original_block1, x, ctx)
    stats.remove()
    for name, lin in _linears(net.layers[1]).items():
        w = _linears(original_block1)[name].weight
        expected = w.masked_fill(wanda_mask(w, stats.sumsq[name].sqrt(), 0.5), 0.0)
        assert torch.equal(lin.weight, expected), name


def test_calibration_is_seeded_and_checked(tiny_model, calib_file, tmp_path):
    a = load_calibration(tiny_model.tokenizer, calib_file, samples=8, seq_len=128, seed=1)
    b = load_calibration(tiny_model.tokenizer, calib_file, samples=8, seq_len=128, seed=1)
    c = load_calibration(tiny_model.tokenizer, calib_file, samples=8, seq_len=128, seed=2)
    assert a.tokens.shape == (8, 128) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_calibration(tiny_model.tokenizer, tmp_path / "nope.txt")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(InvalidArgument, match="fewer than one window"):
        load_calibration(tiny_model.tokenizer, short, samples=4, seq_len=64)
    with pytest.raises(InvalidArgument, match="too short for 1000 samples"):
        load_calibration(tiny_model.tokenizer, calib_file, samples=1000, seq_len=512)


def test_bad_settings_are_refused(tiny_model):
    with pytest.raises(InvalidArgument, match="magnitude, wanda, sparsegpt"):
        prune(tiny_model, "random", sparsity=0.5)
    with pytest.raises(InvalidArgument, match="exactly one"):
        prune(tiny_model, "magnitude", sparsity=0.5, pattern="2:4")
    with pytest.raises(InvalidArgument, match="exactly one"):
        prune(tiny_model, "magnitude")
    with pytest.raises(InvalidArgument, match=r"\[0, 1\)"):
        prune(tiny_model, "magnitude", sparsity=1.5)
    with pytest.raises(InvalidArgument, match="0 < N < M"):
        prune(tiny_model, "magnitude", pattern="4:2")
    with pytest.raises(InvalidArgument, match="N:M"):
        prune(tiny_model, "magnitude", pattern="half")
