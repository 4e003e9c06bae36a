"""GPTQ: quantize each Linear so its *outputs* on calibration data change least.

For a layer with weight W (N, K) and calibration inputs X (n, K), GPTQ minimizes
||X W^T - X Q^T||^2 one input column at a time: after rounding column j, the rounding error,
scaled by the inverse Hessian H^-1 = (2 X^T X / n + damping)^-1, is pushed onto the columns
not yet quantized, which compensate for it (Frantar et al., 2022). Updates are applied lazily
per block of 128 columns. With ``act_order`` columns are processed by decreasing Hessian
diagonal (most active inputs first); group grids are then fixed up front from the original
weights ("static groups") so the stored layout keeps contiguous groups.

The network is processed block by block (``Layerwise``): the calibration hidden states enter a
decoder block, every Linear's Hessian is accumulated from its real inputs, the block's Linears
are quantized, and the *quantized* block's outputs feed the next block. Memory stays at one
block plus the hidden states; after each block a checkpoint lets an interrupted run resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from pocketlm.compress.quantize import (
    LINEARS,
    Grid,
    Quantized,
    empty_quantized,
    finish_padding,
    grid_params,
    to_module,
)

log = logging.getLogger(__name__)

# Linears whose outputs at the attention-sink token (a window's first) reach every query.
SINK_LINEARS = ("self_attn.k_proj", "self_attn.v_proj")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, grid: Grid, act_order: bool = False,
                  damp: float = 0.01, block: int = 128) -> Quantized:
    """GPTQ of one weight ``w`` (N, K) given the Hessian ``h`` (K, K) = 2 X^T X / n."""
    W = w.detach().clone().float()
    H = h.detach().clone().double()
    n, k = W.shape
    out = empty_quantized(n, k, grid)
    gs = out.group_size
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or grid.group_size == 0
    if static:
        for g, c0 in enumerate(range(0, k, gs)):
            out.scales[:, g], out.zeros[:, g] = grid_params(W[:, c0: c0 + gs], grid)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    # Upper Cholesky factor of H^-1: row i holds what column i's error does to later columns.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    codes = torch.zeros(n, k)
    cols = perm.tolist()
    fgrid = {}  # group -> (scale, zero) as float vectors
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        diag = U1.diagonal().tolist()
        err = torch.zeros(n, i2 - i1)
        for i in range(i2 - i1):
            col = cols[i1 + i]
            g = col // gs
            if not static and col % gs == 0:  # a new group: fit its grid to the updated weights
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                out.scales[:, g], out.zeros[:, g] = grid_params(ahead, grid)
                fgrid.pop(g, None)
            if g not in fgrid:
                fgrid[g] = out.scales[:, g].float(), out.zeros[:, g].float()
            s, z = fgrid[g]
            wi = W1[:, i]
            q = torch.clamp(torch.round(wi / s) + z, 0, grid.qmax)
            codes[:, col] = q
            e = (wi - (q - z) * s) / diag[i]
            W1[:, i:].addr_(e, U1[i, i:], alpha=-1.0)
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    out.codes[:, :k] = codes.to(torch.uint8)
    return finish_padding(out)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs on inputs ``x`` (n, K): ||x w^T - x q^T||^2/n."""
    return float(((x @ (w - q).T) ** 2).sum() / x.shape[0])


# -- layer by layer through the network ------------------------------------------------------
class Layerwise:
    """Calibration hidden states walked through a network's decoder blocks, with checkpoints.

    ``hidden`` holds the current block's inputs (S, L, D); ``run(block)`` replaces them by its
    outputs, in micro-batches. ``save(i)``/``resume()`` write and read ``checkpoint_dir``:
    the quantized state of blocks 0..i and the hidden states after block i, plus a key of the
    settings so a checkpoint of other settings is never mixed in. The caller removes the folder
    once the whole job is done (``quantize`` does, after any scale tuning).
    """

    def __init__(self, network, batch: torch.Tensor, key: dict, checkpoint_dir=None,
                 micro_batch: int = 8):
        self.network, self.micro = network, micro_batch
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(checkpoint_dir) if checkpoint_dir else None
        s, L = batch.shape
        # the (cos, sin, mask) blocks take, as the whole network's forward gives them: Gemma's
        # local layers have their own RoPE tables and a windowed mask. Keyed by "is it local"
        # (not by index), so a copy of a block runs as its original would
        self.ctx = {bool(b.self_attn.window): network.layer_context(i, torch.arange(L)[None])
                    for i, b in reversed(list(enumerate(network.layers)))}
        with torch.inference_mode():
            self.hidden = torch.cat([network.embed(batch[i: i + micro_batch])
                                     for i in range(0, s, micro_batch)]).clone()

    @torch.inference_mode()
    def run(self, block: nn.Module, update: bool = True) -> None:
        outs = [self.forward(block, x) for x in self.micro_batches()]
        if update:
            self.hidden = torch.cat(outs)

    def micro_batches(self) -> list[torch.Tensor]:
        return [self.hidden[i: i + self.micro] for i in range(0, self.hidden.shape[0], self.micro)]

    def forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x, *self.ctx[bool(block.self_attn.window)], None, None)

    def save(self, i: int, block: nn.Module) -> None:
        if not self.dir:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in block.state_dict().items()}
        save_file(state, str(self.dir / f"block{i}.safetensors.tmp"))
        os.replace(self.dir / f"block{i}.safetensors.tmp", self.dir / f"block{i}.safetensors")
        save_file({"hidden": self.hidden.contiguous()}, str(self.dir / "hidden.safetensors.tmp"))
        os.replace(self.dir / "hidden.safetensors.tmp", self.dir / "hidden.safetensors")
        tmp = self.dir / "progress.json.tmp"
        tmp.write_text(json.dumps({"key": self.key, "blocks_done": i + 1}))
        os.replace(tmp, self.dir / "progress.json")

    def resume(self, grid: Grid | dict[str, Grid]) -> int:
        """Load finished blocks from the checkpoint; the number of blocks already done."""
        if not self.dir or not (self.dir / "progress.json").is_file():
            return 0
        from safetensors.torch import load_file

        progress = json.loads((self.dir / "progress.json").read_text())
        if progress.get("key") != self.key:
            log.warning("checkpoint in %s is for other settings; starting over", self.dir)
            return 0
        done = progress["blocks_done"]
        for i in range(done):
            block = self.network.layers[i]
            for name in LINEARS:
                lin = block.get_submodule(name)
                _set(block, name, _empty_qlinear(lin, grid_of(grid, f"layers.{i}.{name}")))
            block.load_state_dict(load_file(str(self.dir / f"block{i}.safetensors")))
        self.hidden = load_file(str(self.dir / "hidden.safetensors"))["hidden"]
        log.info("resuming from %s: %d blocks already done", self.dir, done)
        return done


def grid_of(grid: Grid | dict[str, Grid], name: str) -> Grid:
    """The grid of Linear ``name``: ``grid`` itself, or its entry when it is a grid per name."""
    return grid[name] if isinstance(grid, dict) else grid


def _empty_qlinear(lin: nn.Linear, grid: Grid) -> nn.Module:
    from pocketlm.compress.qlinear import QLinear

    return QLinear(lin.in_features, lin.out_features, grid.bits, grid.group_size, grid.sym,
                   lin.bias)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)


# The Linears of a block in the order their inputs become known: each group's inputs are
# computed by the groups before it, so with ``sequential`` they are taken from the block with
# those groups already quantized.
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def gptq_network(network, batch: torch.Tensor, grid: Grid | dict[str, Grid],
                 act_order: bool = False, damp: float = 0.01, checkpoint_dir=None,
                 progress: bool = True, sink_weight: float | None = None,
                 sink_names: tuple[str, ...] = SINK_LINEARS, sequential: bool = False) -> dict:
    """GPTQ every decoder-block Linear of ``network`` in place; returns summary figures.

    ``grid`` is one grid for every Linear, or a grid per Linear name ("layers.3.mlp.up_proj").

    ``sink_weight`` (default: the window length) is how much the first token of each
    calibration window counts in the Hessians of ``sink_names`` (see ``_collect_hessians``).
    ``sequential``: quantize a block's Linears stage by stage (``STAGES``), each stage's
    Hessians taken from the block with the earlier stages already quantized (so o_proj sees
    the outputs of the quantized q/k/v, down_proj those of the quantized gate/up), rather
    than all from one pass of the float block.
    """
    if sink_weight is None:
        sink_weight = float(batch.shape[1])
    grid_key = ({n: {**g.spec(), "clip": g.clip} for n, g in sorted(grid.items())}
                if isinstance(grid, dict) else {**grid.spec(), "clip": grid.clip})
    key = {"method": "gptq", "grid": grid_key, "act_order": act_order, "damp": damp,
           "sink_weight": sink_weight, "sink_names": list(sink_names),
           "batch": hashlib.sha256(batch.numpy().tobytes()).hexdigest()}
    if sequential:
        key.update(sequential=True)
    walk = Layerwise(network, batch, key, checkpoint_dir)
    start = walk.resume(grid)
    stages = STAGES if sequential else (LINEARS,)
    with progress_bar(len(network.layers), "gptq", progress) as bar:
        bar.update(start)
        for i in range(start, len(network.layers)):
            block = network.layers[i]
            for names in stages:
                hessians = _collect_hessians(block, walk, names, sink_weight, sink_names)
                for name in names:
                    lin = block.get_submodule(name)
                    g = grid_of(grid, f"layers.{i}.{name}")
                    q = gptq_quantize(lin.weight.data, hessians[name], g, act_order, damp)
                    _set(block, name, to_module(q, bias=lin.bias))
            walk.run(block)
            walk.save(i, block)
            bar.update(1)
    return {"layers": len(network.layers)}


class _StageDone(Exception):
    """Raised by a hook once the last Linear of a stage has seen its input."""


def _collect_hessians(block: nn.Module, walk: Layerwise, names=LINEARS, sink_weight: float = 1.0,
                      sink_names: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """2 X^T X / n for the input X of every Linear of ``names`` in ``block``, from one pass
    over the walk's hidden states (stopped once the last of them has its input).

    For the Linears in ``sink_names`` the first token of each window counts ``sink_weight``
    times: that token is the attention sink, which most queries attend to, so an error in its
    key or value reaches almost every output. Counted once among L tokens, it is a direction
    GPTQ is free to push rounding error into (on SmolLM2-135M, v_proj by GPTQ cost +28%
    perplexity where RTN cost +3.5%; weighted by L, +0%).
    """
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(mod, args, _out, name):
        x = args[0].float()  # (B, L, K)
        if name in sink_names and sink_weight != 1.0:
            x = x.clone()
            x[:, 0] *= sink_weight ** 0.5
        x = x.reshape(-1, x.shape[-1])
        hs[name] = hs.get(name, 0) + (x.T @ x).double()
        counts[name] = counts.get(name, 0) + x.shape[0]
        if name == names[-1]:  # the last input needed: skip the rest of the block
            raise _StageDone

    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: accumulate(m, a, o, n)) for n in names]
    try:
        with torch.inference_mode():
            for x in walk.micro_batches():
                try:
                    walk.forward(block, x)
                except _StageDone:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (2 * hs[n] / counts[n]).float() for n in names}
