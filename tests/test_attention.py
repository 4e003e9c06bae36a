"""The prefill attention kernel (kernels/attention.cpp) against PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

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
