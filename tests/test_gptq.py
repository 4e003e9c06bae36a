"""GPTQ details that decide its quality on real models: the attention-sink weighting of the
key/value Hessians and the defaults (asymmetric grid, activation order with static groups)."""

from __future__ import annotations

import pytest
import torch

from pocketlm.compress import quantize
from pocketlm.compress.gptq import (
    SINK_LINEARS,
    Layerwise,
    _collect_hessians,
    gptq_quantize,
    output_error,
)
from pocketlm.compress.quantize import LINEARS, Grid, rtn

IDS = list(range(10, 60))


def _sink_layer(seq=64, windows=16, k=128, n=32):
    """Inputs (windows, seq, k) whose first token lies in directions the others barely use."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(k, k, generator=g)
    spread = torch.ones(k)
    spread[-16:] = 0.01  # 16 directions ordinary tokens hardly touch
    x = torch.randn(windows, seq, k, generator=g) * spread @ basis.T / k**0.5
    sink = torch.randn(windows, k, generator=g) * 0.01
    sink[:, -16:] = 1.0  # ... and the first token lives in them
    x[:, 0] = sink @ basis.T / k**0.5
    return x, torch.randn(n, k, generator=g) * 0.05


def _hessian(x, first_token_weight):
    x = x.clone()
    x[:, 0] *= first_token_weight**0.5
    x = x.reshape(-1, x.shape[-1])
    return 2 * x.T @ x / x.shape[0]


def test_weighting_the_first_token_protects_its_outputs():
    x, w = _sink_layer()
    grid = Grid(4, 32, True)
    sink, rest = x[:, 0], x[:, 1:].reshape(-1, x.shape[-1])
    plain = gptq_quantize(w, _hessian(x, 1.0), grid).dequantize()
    weighted = gptq_quantize(w, _hessian(x, float(x.shape[1])), grid).dequantize()
    # One row in 64, unweighted, the first token is where GPTQ is free to leave error.
    assert output_error(w, weighted, sink) < 0.2 * output_error(w, plain, sink)
    # ... and protecting it costs the other tokens little: still far better than RTN.
    assert output_error(w, weighted, rest) < 1.1 * output_error(w, plain, rest)
    assert output_error(w, weighted, rest) < 0.6 * output_error(w, rtn(w, grid).dequantize(), rest)


def test_sink_weight_scales_only_the_first_tokens_rows_of_key_and_value_hessians(tiny_model):
    net = tiny_model.network
    batch = torch.randint(5, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    walk = Layerwise(net, batch, {}, None)
    block = net.layers[0]
    plain = _collect_hessians(block, walk)
    weighted = _collect_hessians(block, walk, LINEARS, 16.0, SINK_LINEARS)
    with torch.inference_mode():
        x0 = block.input_layernorm(walk.hidden)[:, 0].float()  # (3, D): k/v inputs, first token
    extra = 2 * 15.0 * x0.T @ x0 / batch.numel()
    for name in SINK_LINEARS:
        torch.testing.assert_close(weighted[name] - plain[name], extra, rtol=1e-4, atol=1e-5)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert torch.equal(weighted[name], plain[name])


def test_gptq_defaults_to_an_asymmetric_grid_in_activation_order(tiny_model, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the cat sat on the warm mat while birds sang"] * 300))
    kw = {"group_size": 32, "calibration": str(calib), "samples": 4, "seq_len": 32,
          "progress": False}
    q = quantize(tiny_model, "gptq", 4, **kw)
    cfg = q.network.quantization_config
    assert (cfg["sym"], cfg["act_order"]) == (False, True)
    assert not q.network.layers[0].mlp.up_proj.sym  # zero points are stored
    settings = q.card.steps[-1]["settings"]  # the model card says what was done
    assert (settings["sym"], settings["act_order"]) == (False, True)
    old = quantize(tiny_model, "gptq", 4, sym=True, act_order=False, **kw).network
    assert (old.quantization_config["sym"], old.quantization_config["act_order"]) == (True, False)
    assert quantize(tiny_model, "rtn", 4, group_size=32).network.quantization_config["sym"]


def test_cli_flags_override_the_gptq_defaults(tiny_model, tmp_path, monkeypatch):
    from pocketlm.compress import commands

    seen = {}

    def fake_quantize(model, method, bits, group, sym, keep, *args, **kw):
        seen.update(method=method, sym=sym, act_order=args[4], clip=args[6],
                    sequential=kw["sequential"], int8=kw["int8"])
        raise SystemExit(0)

    import argparse
    import importlib

    # (pocketlm.compress.quantize is also the function's name in the package)
    monkeypatch.setattr(importlib.import_module("pocketlm.compress.quantize"), "quantize",
                        fake_quantize)
    monkeypatch.setattr("pocketlm.api.load", lambda *a, **k: tiny_model)

    ap = argparse.ArgumentParser()
    commands.register(ap.add_subparsers())
    for argv, want in [([], (None, None, False, True, ())),
                       (["--no-sequential"], (None, None, False, False, ())),
                       (["--sym", "--no-act-order", "--clip", "--sequential", "--int8",
                         "layers.0.mlp.*, layers.29.mlp.down_proj"],
                        (True, False, True, True, ("layers.0.mlp.*", "layers.29.mlp.down_proj")))]:
        a = ap.parse_args(["quantize", "m", "--method", "gptq", "--bits", "4", "-o",
                           str(tmp_path / "o"), *argv])
        with pytest.raises(SystemExit):
            a.func(a)
        assert (seen["sym"], seen["act_order"], seen["clip"], seen["sequential"],
                seen["int8"]) == want


# -- sequential: each stage of a block from the block quantized so far -------------------------
def test_sequential_takes_each_stage_from_the_block_quantized_so_far(tiny_model, monkeypatch):
    import copy

    from pocketlm.compress import gptq

    batch = torch.randint(5, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    grid = Grid(4, 32, False)
    hessians = []
    real = gptq.gptq_quantize

    def spy(w, h, *args, **kw):
        hessians.append(h.clone())
        return real(w, h, *args, **kw)

    monkeypatch.setattr(gptq, "gptq_quantize", spy)
    seen = {}
    for sequential in (False, True):
        net = copy.deepcopy(tiny_model.network)
        hessians.clear()
        gptq.gptq_network(net, batch, grid, progress=False, sequential=sequential,
                          sink_weight=1.0)
        seen[sequential] = hessians[3]  # block 0's o_proj (order q, k, v, o, gate, up, down)
    # o_proj's inputs from block 0 with its float q/k/v, and with the quantized ones
    net = copy.deepcopy(tiny_model.network)
    walk = Layerwise(net, batch, {}, None)
    float_block = copy.deepcopy(net.layers[0])
    quantized = copy.deepcopy(float_block)
    qnet = copy.deepcopy(tiny_model.network)
    gptq.gptq_network(qnet, batch, grid, progress=False, sequential=True, sink_weight=1.0)
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(quantized.self_attn, name, getattr(qnet.layers[0].self_attn, name))
    want = {}
    for key, block in (("float", float_block), ("qkv quantized", quantized)):
        want[key] = _collect_hessians(block, walk, ("self_attn.o_proj",))["self_attn.o_proj"]
    torch.testing.assert_close(seen[False], want["float"])
    torch.testing.assert_close(seen[True], want["qkv quantized"])
    assert not torch.allclose(want["float"], want["qkv quantized"])
