"""The decode fast path: the AVX2 matrix-vector kernel must agree with F.linear, and training
must still see an ordinary, differentiable nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.engine.fastlinear import GemvLinear, _kernel, speed_up


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("shape", [(576, 1536), (49, 37), (1000, 64)])
def test_fast_linear_equals_f_linear(rows, shape):
    torch.manual_seed(rows)
    lin = speed_up(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)))[0]
    x = torch.randn(1, rows, shape[1])
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-4, rtol=1e-5)


def test_loaded_models_use_the_kernel_when_it_builds(tiny_model):
    if _kernel() is None:
        pytest.skip("the AVX2 kernel could not be built here (no AVX2/FMA or no compiler)")
    linears = [m for m in tiny_model.network.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is GemvLinear for m in linears)


def test_training_takes_the_differentiable_path(tiny_model):
    net = tiny_model.network
    tokens = torch.tensor([[5, 6, 7]])
    loss = net(tokens).logsumexp(-1).mean()
    loss.backward()
    assert net.layers[0].mlp.down_proj.weight.grad is not None


@pytest.mark.parametrize("rows", [2, 40])
def test_frozen_weights_still_pass_gradients_to_their_input(rows):
    """LoRA freezes the base weights but trains through them: the fast paths must step aside."""
    lin = speed_up(nn.Sequential(nn.Linear(64, 48, bias=False)))[0]
    lin.weight.requires_grad_(False)
    x = torch.randn(rows, 64, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(rows, 64))
