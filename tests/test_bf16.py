"""bf16 where the CPU has it: prefill products through oneDNN's bf16 GEMM (dense and packed
weights), and training with ``--precision bf16`` (autocast over fp32 master weights)."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model

from pocketlm import kernels
from pocketlm.compress.quantize import quantize
from pocketlm.engine.generate import prefill
from pocketlm.model.transformer import KVCache

needs_bf16 = pytest.mark.skipif(not kernels.cpu_has_bf16(),
                                reason="this CPU has no bf16 GEMMs (AVX512-BF16 or AMX)")


def prompt_logits(net, ids):
    """Logits of every position of a prompt (the 'prefill' shape: many rows a product)."""
    with torch.inference_mode():
        return net(torch.tensor([ids]))[0]


@needs_bf16
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_bf16_prefill_stays_close_to_fp32(bits, monkeypatch):
    model = make_tiny_model(dim=128, hidden_dim=384, n_heads=4, n_kv_heads=2)
    if bits:
        model = quantize(model, "rtn", bits, group_size=32 if bits == 4 else None, progress=False)
    ids = torch.randint(0, 260, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
    ref = prompt_logits(model.network, ids)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    assert kernels.bf16_prefill()
    got = prompt_logits(model.network, ids)
    assert not torch.equal(got, ref)  # the bf16 path did run
    # bf16 keeps 8 significant bits: each product is off by ~0.4% of its size, through
    # 2 layers; the logits stay within 2% of their spread and pick the same top token.
    spread = ref.max() - ref.min()
    assert (got - ref).abs().max() < 0.02 * spread
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@needs_bf16
def test_bf16_prefill_fills_the_same_cache_that_decode_reads(monkeypatch):
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    net = make_tiny_model().network
    ids = list(range(5, 45))
    cache = KVCache.allocate(net.config, 1, 64)
    with torch.inference_mode():
        last = prefill(net, cache, 0, ids)
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
    twin = KVCache.allocate(net.config, 1, 64)
    with torch.inference_mode():
        ref = prefill(net, twin, 0, ids)
    assert cache.k[0].dtype == torch.float32
    torch.testing.assert_close(last, ref, atol=0.05 * float(ref.abs().max()), rtol=0)


@needs_bf16
def test_bf16_copy_follows_in_place_weight_updates(monkeypatch):
    from pocketlm.engine.fastlinear import speed_up

    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    lin = speed_up(torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)))[0]
    x = torch.randn(40, 64)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)
    with torch.inference_mode():
        after = lin(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-2, atol=1e-2)


def test_bf16_prefill_switch(monkeypatch):
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")
    assert not kernels.bf16_prefill()
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "1")
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: False)
    assert not kernels.bf16_prefill()  # never an emulated bf16 GEMM
    monkeypatch.delenv("POCKETLM_BF16_PREFILL")
    monkeypatch.setattr(kernels, "cpu_has_bf16", lambda: True)
    for amx in (True, False):  # the default: on where it was measured to win (AMX)
        monkeypatch.setattr(kernels, "cpu_has_amx", lambda amx=amx: amx)
        assert kernels.bf16_prefill() == amx


# -- training -------------------------------------------------------------------------------------
def test_precision_flag_sets_bf16():
    import argparse

    from pocketlm.train.commands import _add_train_args, _settings

    p = argparse.ArgumentParser()
    _add_train_args(p, lr=1e-4)
    base = ["-o", "x"]
    assert not _settings(p.parse_args(base)).bf16
    assert _settings(p.parse_args([*base, "--precision", "bf16"])).bf16
    assert _settings(p.parse_args([*base, "--bf16"])).bf16
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--precision", "fp16"])


@needs_bf16
def test_bf16_training_tracks_fp32(tmp_path):
    """Same seed, same data: the bf16 run's loss goes down and stays near the fp32 run's."""
    from test_train import quick, tiny_data

    from pocketlm.train.trainer import train

    data = tiny_data()
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = make_tiny_model()
        result = train(model.network, data, data.head(4), quick(bf16=bf16), tmp_path / name)
        assert all(p.dtype == torch.float32 for p in model.network.parameters())  # fp32 masters
        runs[name] = [e["loss"] for e in result.evals]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16[-1] < bf16[0]
    # bf16 rounds every product to 8 significant bits: after 6 steps at lr 1e-2 the held-out
    # loss (~4-5 nats) differs from fp32's by a few hundredths.
    assert abs(bf16[-1] - fp32[-1]) < 0.05 * fp32[-1]
