"""The fused decode step gives the PyTorch path's logits and cache, and steps aside when it must."""

import pytest
import torch
from tiny import make_tiny_model

from pocketlm.compress.quantize import quantize
from pocketlm.engine import fused
from pocketlm.engine.generate import decode_step
from pocketlm.model.transformer import KVCache

pytestmark = pytest.mark.skipif(fused.plan_for(make_tiny_model().network) is None,
                                reason="the C++ kernels cannot be built on this machine")


def prefilled(net, lengths, seed=0):
    """A cache with one random prompt per row (row b holds lengths[b] tokens), and next tokens."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache.allocate(net.config, len(lengths) + 1, 64)
    for row, n in enumerate(lengths):
        ids = torch.randint(0, net.config.vocab_size, (1, n), generator=g)
        net(ids, torch.arange(n)[None], cache, rows=slice(row, row + 1))
    tokens = torch.randint(0, net.config.vocab_size, (len(lengths),), generator=g)
    return cache, tokens, torch.tensor(lengths)


def both_paths(net, lengths):
    """(fused logits, eager logits, fused cache, eager cache) for one step from the same state."""
    with torch.inference_mode():
        cache, tokens, positions = prefilled(net, lengths)
        twin = KVCache(k=[t.clone() for t in cache.k], v=[t.clone() for t in cache.v])
        got = fused.decode(net, cache, tokens, positions)
        B = len(lengths)
        want = net(tokens[:, None], positions[:, None], twin, rows=slice(0, B))[:, 0]
    return got, want, cache, twin


# more than 8 rows (a server batch of 16) run as passes of up to 8
@pytest.mark.parametrize("lengths", [[5], [1, 17, 9], [3] * 8, [2, 9, 4, 7, 3, 11, 5, 6, 8, 1, 12]])
def test_fused_step_matches_the_model(lengths):
    net = make_tiny_model().network
    got, want, cache, twin = both_paths(net, lengths)
    assert got is not None and got.shape == want.shape
    assert (got - want).abs().max() < 1e-5
    for a, b in zip(cache.k + cache.v, twin.k + twin.v):  # the same keys/values were written
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (3, 32)])
def test_fused_step_reads_packed_weights(bits, group):
    model = quantize(make_tiny_model(), method="rtn", bits=bits, group_size=group, progress=False)
    got, want, _, _ = both_paths(model.network, [4, 11])
    assert got is not None
    assert (got - want).abs().max() < 1e-4


def test_greedy_generation_is_unchanged(monkeypatch):
    model = make_tiny_model()
    prompts = ["the cat", "in a house the", "x"]
    with_fused = model.generate(prompts, max_tokens=24, temperature=0)
    monkeypatch.setenv("POCKETLM_FUSED", "0")
    without = model.generate(prompts, max_tokens=24, temperature=0)
    assert with_fused == without and all(len(s) > 0 for s in with_fused)


def test_plan_follows_replaced_weights():
    net = make_tiny_model().network
    before, _, _, _ = both_paths(net, [6])
    with torch.no_grad():
        net.layers[1].mlp.down_proj.weight = torch.nn.Parameter(net.layers[1].mlp.down_proj.weight * 2)
    after, want, _, _ = both_paths(net, [6])
    assert (after - before).abs().max() > 1e-3  # the new weight is used ...
    assert (after - want).abs().max() < 1e-5  # ... and the result is still the model's


def test_steps_aside_where_it_does_not_apply(monkeypatch):
    from pocketlm.train.lora import apply_lora

    net = make_tiny_model().network
    cache, tokens, positions = prefilled(net, [3])
    assert fused.decode(net, cache, tokens, positions) is None  # gradients wanted (no no_grad)
    with torch.no_grad():
        assert fused.decode(net, cache, tokens, positions) is not None
        monkeypatch.setenv("POCKETLM_FUSED", "0")
        assert fused.decode(net, cache, tokens, positions) is None
        monkeypatch.delenv("POCKETLM_FUSED")
        apply_lora(net, rank=2)
        assert fused.decode(net, cache, tokens, positions) is None  # adapters: PyTorch path
        logits = decode_step(net, cache, tokens, positions)  # which still answers
        assert logits.shape == (1, net.config.vocab_size)


def test_a_model_that_has_decoded_can_still_be_copied_and_quantized():
    import copy

    model = make_tiny_model()
    model.generate("the cat", max_tokens=4, temperature=0)
    assert fused.plan_for(model.network) is not None
    twin = copy.deepcopy(model.network)
    assert fused.plan_for(twin) is not None  # its own plan, on its own weights
    q = quantize(model, method="rtn", bits=8, progress=False)
    assert q.generate("the cat", max_tokens=4, temperature=0)


def test_a_forward_hook_anywhere_sends_decode_through_pytorch():
    """Hooks must see activations (a router reading hidden states), which the C++ step skips."""
    net = make_tiny_model().network
    seen = []
    handle = net.layers[1].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        cache, tokens, positions = prefilled(net, [4])
        seen.clear()
        assert fused.decode(net, cache, tokens, positions) is None
        decode_step(net, cache, tokens, positions)
        assert seen == [(1, 1, net.config.dim)]
        handle.remove()
        assert fused.decode(net, cache, tokens, positions) is not None
