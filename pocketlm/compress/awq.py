"""AWQ: activation-aware weight quantization by per-input-channel scaling before rounding.

Input channels that carry large activations matter most to a layer's output. AWQ (Lin et al.,
2023) multiplies those weight columns by s > 1 before rounding (so they lose less precision)
and divides the layer's *input* by s, which is free when the division is folded into the
operation that produces the input: the RMSNorm weight before q/k/v and before gate/up, and the
rows of up_proj before down_proj. s = mean|x|^alpha, normalized, with alpha searched on a grid
to minimize the output error on calibration inputs (alpha = 0 is plain RTN, so the search
never does worse than RTN on its data). o_proj has no exact fold under grouped-query
attention (several query heads share one value head) and is rounded plainly.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from pocketlm.compress.gptq import Layerwise, _set, progress_bar
from pocketlm.compress.quantize import LINEARS, Grid, rtn, to_module

ALPHAS = [i / 20 for i in range(21)]


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, grid: Grid,
                  x_abs_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s (K,) minimizing ||x W^T - (x / s) Q(W s)^T||^2, and that error.

    ``weights`` are the Linears (each (N_i, K)) that read the same input ``x`` (n, K).
    """
    W = torch.cat([w.float() for w in weights])  # (N, K)
    x = x.float()
    mean = x.abs().mean(0) if x_abs_mean is None else x_abs_mean
    ref = x @ W.T
    best, best_s = float("inf"), torch.ones(W.shape[1])
    for alpha in ALPHAS:
        s = mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = rtn(W * s, grid).dequantize() / s
        loss = float(((x @ wq.T - ref) ** 2).mean())
        if loss < best:
            best, best_s = loss, s
    return best_s, best


def awq_network(network, batch: torch.Tensor, grid: Grid, checkpoint_dir=None,
                progress: bool = True, max_rows: int = 2048, seed: int = 0) -> dict:
    """AWQ every decoder-block Linear of ``network`` in place (scales folded, then RTN)."""
    key = {"method": "awq", **grid.spec(), "max_rows": max_rows,
           "batch": hashlib.sha256(batch.numpy().tobytes()).hexdigest()}
    walk = Layerwise(network, batch, key, checkpoint_dir)
    start = walk.resume(grid)
    with progress_bar(len(network.layers), "awq", progress) as bar:
        bar.update(start)
        for i in range(start, len(network.layers)):
            block = network.layers[i]
            names = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")
            xs = _collect_inputs(block, walk, names, max_rows, seed + i)
            attn, mlp = block.self_attn, block.mlp
            with torch.no_grad():
                x, mean = xs["self_attn.q_proj"]
                s, _ = search_scales([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                                     x, grid, mean)
                _fold(block.input_layernorm.weight, s, [attn.q_proj, attn.k_proj, attn.v_proj])
                x, mean = xs["mlp.gate_proj"]
                s, _ = search_scales([mlp.gate_proj.weight, mlp.up_proj.weight], x, grid, mean)
                # the norm before the MLP: LLaMA's "post_attention_layernorm", Gemma's
                # "pre_feedforward_layernorm" (its post_attention_layernorm normalises attention's
                # output, and scaling it would change the residual stream)
                pre_mlp = (block.pre_feedforward_layernorm if block.post_norms
                           else block.post_attention_layernorm)
                _fold(pre_mlp.weight, s, [mlp.gate_proj, mlp.up_proj])
                x, mean = xs["mlp.down_proj"]
                s, _ = search_scales([mlp.down_proj.weight], x, grid, mean)
                mlp.up_proj.weight.div_(s[:, None])  # up's output rows feed down's input
                mlp.down_proj.weight.mul_(s[None, :])
            for name in LINEARS:
                lin = block.get_submodule(name)
                _set(block, name, to_module(rtn(lin.weight.data, grid), bias=lin.bias))
            walk.run(block)
            walk.save(i, block)
            bar.update(1)
    return {"layers": len(network.layers), "calibration_rows_per_layer": max_rows}


def _fold(prev_weight: torch.Tensor, s: torch.Tensor, linears: list[nn.Linear]) -> None:
    prev_weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


def _collect_inputs(block, walk: Layerwise, names, max_rows: int, seed: int) -> dict:
    """For each named Linear: (a seeded sample of its input rows, mean |x| over all rows)."""
    rows: dict[str, list] = {n: [] for n in names}
    hooks = []
    for name in names:
        def hook(mod, args, _out, name=name):
            rows[name].append(args[0].reshape(-1, args[0].shape[-1]).float())
        hooks.append(block.get_submodule(name).register_forward_hook(hook))
    try:
        walk.run(block, update=False)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        x = torch.cat(rows[name])
        pick = torch.randperm(x.shape[0], generator=g)[:max_rows]
        out[name] = (x[pick], x.abs().mean(0))
    return out
