"""The prefill kernels (kernels/attention.cpp, kernels/elementwise.cpp) against PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_model

from pocketlm import kernels
from pocketlm.engine.generate import prefill
from pocketlm.model.transformer import KVCache

kx = kernels.get()
needs_kernel = pytest.mark.skipif(kx is None, reason="compiled kernel unavailable")


def sdpa_reference(q, k, v, offset):
    T, L = q.shape[2], k.shape[2]
    allowed = torch.arange(L)[None, :] <= (offset + torch.arange(T))[:, None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    return y.transpose(1, 2)  # (B, T, H, E), the kernel's layout


@needs_kernel
@pytest.mark.parametrize(
    "B,H,K,T,L,E",
    [
        (1, 9, 3, 200, 200, 64),  # SmolLM2's heads, a prompt from position 0
        (2, 4, 2, 37, 37, 32),  # tails: neither T nor L a multiple of the blocks
        (1, 4, 2, 5, 70, 32),  # new tokens after a cached prefix of 65
        (3, 8, 8, 100, 230, 128),  # no grouping, wide heads, several sequences
        (1, 6, 2, 1, 1, 16),
    ],
)
def test_kernel_matches_sdpa(B, H, K, T, L, E):
    torch.manual_seed(0)
    q = torch.randn(B, T, H, E).transpose(1, 2)  # strided, as the projection leaves it
    k, v = torch.randn(B, K, L, E), torch.randn(B, K, L, E)
    y = kx.causal_attention(q, k, v, L - T)
    torch.testing.assert_close(y, sdpa_reference(q, k, v, L - T), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_refuses_bad_shapes():
    q, k = torch.randn(1, 4, 8, 24), torch.randn(1, 2, 8, 24)  # 24 is not a multiple of 16
    with pytest.raises(RuntimeError, match="E % 16"):
        kx.causal_attention(q, k, k, 0)
    q, k = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(RuntimeError, match="offset"):
        kx.causal_attention(q, k, k, 1)


@needs_kernel
def test_elementwise_kernels_match_pytorch():
    torch.manual_seed(0)
    x, w = torch.randn(3, 17, 72), torch.randn(72)  # 72: a tail after the 8-wide loop
    torch.testing.assert_close(kx.rms_norm(x, w, 1e-5), F.rms_norm(x, (72,), w, 1e-5))
    g, u = 6 * torch.randn(5, 4100), torch.randn(5, 4100)  # several chunks and a tail
    torch.testing.assert_close(kx.silu_mul(g, u), F.silu(g) * u)
    q = torch.randn(2, 7, 3, 32)
    cos, sin = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    rotated = torch.cat([-q[..., 16:], q[..., :16]], dim=-1)
    expected = q * cos[:, :, None] + rotated * sin[:, :, None]
    torch.testing.assert_close(kx.rope(q, cos, sin), expected)
    strided = torch.randn(2, 3, 7, 32).transpose(1, 2)  # not contiguous: still read right
    torch.testing.assert_close(kx.rope(strided, cos, sin),
                               kx.rope(strided.contiguous(), cos, sin))


def test_training_keeps_pytorch_ops(tiny_model):
    """Gradients flow through the model (the kernels have no backward, so they step aside)."""
    net = tiny_model.network
    ids = torch.randint(0, 260, (1, 40))
    loss = net(ids).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    net.zero_grad(set_to_none=True)


@needs_kernel
def test_block_with_one_rope_table_for_the_whole_batch(tiny_model):
    """GPTQ and AWQ call a block with a (1, 1, T, E) RoPE table broadcast over the batch."""
    net = tiny_model.network
    x = torch.randn(3, 20, net.config.dim)
    cos, sin = net.rope_cos[:20][None, None], net.rope_sin[:20][None, None]
    with torch.no_grad():
        fast = net.layers[0](x, cos, sin, None, None, None)
    slow = net.layers[0](x, cos, sin, None, None, None).detach()  # grad on: PyTorch ops
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_odd_head_width_falls_back_to_pytorch():
    m = make_tiny_model(dim=72, n_heads=3, n_kv_heads=1)  # head width 24: no kernel shape
    ids = torch.randint(0, 260, (1, 30))
    with torch.inference_mode():
        fast = m.network(ids)
    slow = m.network(ids).detach()  # grad enabled: the PyTorch ops throughout
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_prefill_with_and_without_the_kernel_agree(tiny_model, monkeypatch):
    """A long prompt, then more prompt after the cached prefix (chat): same logits and cache."""
    net = tiny_model.network
    ids = torch.randint(0, 260, (60,)).tolist()

    def run():
        cache = KVCache.allocate(net.config, 1, 64)
        with torch.inference_mode():
            first = prefill(net, cache, 0, ids[:40])
            second = prefill(net, cache, 0, ids[40:], start=40)
            full = net(torch.tensor([ids]))[0]
        return first, second, full, cache

    fast = run()
    monkeypatch.setattr(kernels, "get", lambda: None)
    slow = run()
    for a, b in zip(fast[:3], slow[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[3].k[1], slow[3].k[1])
