"""Weight-only quantization of a model: round-to-nearest (RTN), GPTQ and AWQ, one entry point.

    >>> from pocketlm.compress import quantize
    >>> q = quantize(model, method="gptq", bits=4, group_size=128)
    >>> q.save("smollm2-int4-gptq")          # packed int4 + fp16 scales; pocketlm.load() reads it

Grids (per row, per group of ``group_size`` input columns; 0 = one group per row):
symmetric: s = max|w| / (2^(b-1) - 1), z = 2^(b-1); asymmetric: s = (max - min) / (2^b - 1)
over [min(w, 0), max(w, 0)], z = round(-min / s). Codes q = clamp(round(w / s) + z, 0,
2^b - 1); scales are rounded to fp16 *before* the codes are computed, so the stored model is
exactly the model that was evaluated.

The embedding table and the output projection (tied in small models) are quantized to int8
per row by RTN unless kept in float with ``keep``: they are ~20% of a 135M model's weights
and the output projection is the largest matmul at decode.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketlm.compress.qlinear import FORMAT, QEmbedding, QLinear, TiedQLinear, padded_width
from pocketlm.errors import InvalidArgument, UnsupportedModel

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
SUPPORTED = {"rtn": (8, 4, 3), "gptq": (8, 4, 3), "awq": (4, 3)}
GROUP_SIZES = (0, 32, 64, 128, 256)
KEEPABLE = ("embeddings", "lm_head")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Grid:
    """One quantization grid: bit width, group size (0 = per row) and symmetry.

    ``clip``: fit each group's range by searching shrink factors of its min/max for the least
    squared rounding error (``grid_params``) instead of taking min/max as they are. It changes
    how scales are chosen, not the stored format, so it is not part of ``spec()``.
    """

    bits: int
    group_size: int = 128
    sym: bool = True
    clip: bool = False

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}


CLIP_SHRINKS = [1 - i / 40 for i in range(21)]  # 1.0, 0.975, ..., 0.5 of the min/max range


def grid_params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16) and zero point (uint8) for each row of ``w`` (N, k): each (N,).

    With ``grid.clip`` every row tries its range shrunk by each factor in ``CLIP_SHRINKS``
    and keeps the one whose rounding error sum((w - deq)^2) is least. Factor 1.0 is plain
    min/max and wins ties, so the search never does worse than min/max on ``w``.
    """
    w = w.float()
    if not grid.clip:
        return _min_max_params(w, grid, 1.0)
    best_s, best_z, best_err = None, None, None
    for p in CLIP_SHRINKS:
        s, z = _min_max_params(w, grid, p)
        err = ((quantize_cols(w, s, z, grid.qmax)[1] - w) ** 2).sum(dim=1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def _min_max_params(w: torch.Tensor, grid: Grid, shrink: float):
    if grid.sym:
        amax = w.abs().amax(dim=1) * shrink
        s = amax / ((1 << (grid.bits - 1)) - 1)
        z = torch.full_like(s, 1 << (grid.bits - 1))
    else:
        lo = w.amin(dim=1).clamp(max=0) * shrink
        hi = w.amax(dim=1).clamp(min=0) * shrink
        s = (hi - lo) / grid.qmax
    s = torch.where(s > 0, s, torch.ones_like(s)).to(torch.float16)
    s = torch.where(s.float() > 0, s, torch.full_like(s, 2**-24))  # fp16 underflow
    if not grid.sym:
        z = torch.round(-lo / s.float()).clamp(0, grid.qmax)
    return s, z.to(torch.uint8)


def quantize_cols(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int):
    """Codes and their dequantized values for columns ``w`` (N, k) on grid (s, z), each (N,)."""
    sf, zf = s.float()[:, None], z.float()[:, None]
    q = torch.clamp(torch.round(w / sf) + zf, 0, qmax)
    return q, (q - zf) * sf


@dataclass
class Quantized:
    """A quantized weight before packing: codes (N, Kp) uint8, scales fp16, zeros uint8 (N, G)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    grid: Grid
    in_features: int

    def dequantize(self) -> torch.Tensor:
        gs = self.group_size
        s = self.scales.float().repeat_interleave(gs, 1)[:, : self.in_features]
        z = self.zeros.float().repeat_interleave(gs, 1)[:, : self.in_features]
        return (self.codes[:, : self.in_features].float() - z) * s

    @property
    def group_size(self) -> int:
        return self.grid.group_size or padded_width(self.in_features)


def empty_quantized(n: int, k: int, grid: Grid) -> Quantized:
    kp = padded_width(k)
    gs = grid.group_size or kp
    g = -(-kp // gs)
    return Quantized(torch.zeros(n, kp, dtype=torch.uint8), torch.ones(n, g, dtype=torch.float16),
                     torch.zeros(n, g, dtype=torch.uint8), grid, k)


def finish_padding(q: Quantized) -> Quantized:
    """Padded columns get the zero point as code, so they dequantize to exactly 0."""
    k, gs = q.in_features, q.group_size
    if q.codes.shape[1] > k:
        z = q.zeros.repeat_interleave(gs, 1)[:, : q.codes.shape[1]]
        q.codes[:, k:] = z[:, k:]
    return q


def rtn(w: torch.Tensor, grid: Grid) -> Quantized:
    """Round-to-nearest quantization of ``w`` (N, K)."""
    n, k = w.shape
    out = empty_quantized(n, k, grid)
    gs = out.group_size
    for g, c0 in enumerate(range(0, k, gs)):
        cols = w[:, c0: c0 + gs].float()
        s, z = grid_params(cols, grid)
        out.scales[:, g], out.zeros[:, g] = s, z
        out.codes[:, c0: c0 + cols.shape[1]] = quantize_cols(cols, s, z, grid.qmax)[0].to(torch.uint8)
    return finish_padding(out)


def to_module(q: Quantized, kind: str = "linear", bias: torch.Tensor | None = None) -> nn.Module:
    """The packed module of ``q``; ``bias`` (a Linear's, e.g. Qwen2's q/k/v) is kept in float."""
    n = q.codes.shape[0]
    g = q.grid
    if kind == "embedding":
        m = QEmbedding(n, q.in_features, g.bits, g.group_size, g.sym)
    else:
        m = QLinear(q.in_features, n, g.bits, g.group_size, g.sym, bias)
    m.set(q.codes, q.scales, q.zeros)
    return m


# -- the model-level step --------------------------------------------------------------------
def check_settings(method: str, bits: int, group_size: int, keep: tuple[str, ...] = ()) -> None:
    """Raise InvalidArgument for a method/bits/group-size combination we do not support."""
    if method not in METHODS:
        raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if bits not in SUPPORTED[method]:
        combos = "; ".join(f"{m}: {', '.join(map(str, b))} bits" for m, b in SUPPORTED.items())
        raise InvalidArgument(f"{method} does not support {bits} bits. Supported: {combos}")
    if group_size not in GROUP_SIZES:
        raise InvalidArgument(
            f"group size {group_size} is not supported; use one of 32, 64, 128, 256, or 0 for "
            "one group per output channel")
    unknown = set(keep) - set(KEEPABLE)
    if unknown:
        raise InvalidArgument(f"--keep takes {', '.join(KEEPABLE)}; got {sorted(unknown)}")


def module_grids(names: list[str], grid: Grid, int8: tuple[str, ...] = ()) -> dict[str, Grid]:
    """The grid of each Linear in ``names``: ``grid``, or int8 per channel (same symmetry) for
    those matching a pattern of ``int8`` (shell-style: "layers.0.mlp.*", "layers.*.mlp.down_proj",
    "layers.2[5-9].mlp.*"). Raises InvalidArgument for a pattern that matches no Linear."""
    import fnmatch

    high = Grid(8, 0, grid.sym, grid.clip)
    for pattern in int8:
        if not fnmatch.filter(names, pattern):
            raise InvalidArgument(
                f"--int8 pattern {pattern!r} matches no Linear; names look like {names[0]!r} "
                f"... {names[-1]!r} (use * and [0-4] as in shell patterns)")
    return {n: high if any(fnmatch.fnmatchcase(n, p) for p in int8) else grid for n in names}


def linear_names(network) -> list[str]:
    return [f"layers.{i}.{n}" for i in range(len(network.layers)) for n in LINEARS]


def quantize(model, method: str = "rtn", bits: int = 8, group_size: int | None = None,
             sym: bool | None = None, keep: tuple[str, ...] | list[str] = (),
             calibration: str | None = None, samples: int = 64, seq_len: int = 512,
             seed: int = 0, act_order: bool | None = None, damp: float = 0.01,
             clip: bool = False, checkpoint_dir: str | None = None, progress: bool = True,
             tune_steps: int = 0, tune_lr: float = 2e-3, tune_batch: int = 1,
             tune_norms: bool = False, tune_samples: int | None = None,
             tune_generated: int = 0, sequential: bool = True,
             int8: tuple[str, ...] | list[str] = ()):
    """A quantized copy of ``model`` (a ``pocketlm.Model``); the original is left as it was.

    ``group_size`` None means per-channel for 8 bits and 128 otherwise. ``sym`` and
    ``act_order`` None mean the method's best-measured default: GPTQ uses an asymmetric grid
    and activation order (with static groups); RTN and AWQ a symmetric grid. ``clip`` searches
    each group's range for the least rounding error instead of plain min/max (``grid_params``).
    ``calibration`` is a text file for GPTQ/AWQ (default WikiText-2 validation).
    ``checkpoint_dir`` lets an interrupted GPTQ/AWQ run resume from its last finished layer,
    and interrupted scale tuning from its last checkpoint (every two minutes).
    ``tune_steps`` > 0 then trains the per-group scales (and with ``tune_norms`` the RMSNorm
    weights) for that many AdamW steps of ``tune_batch`` calibration windows at learning rate
    ``tune_lr``, to match the float model's next-token distribution; codes, zeros and file size
    stay as they are (``pocketlm.compress.tune``). Tuning reads ``tune_samples`` disjoint windows of
    ``seq_len`` tokens of the calibration file (None: all of them; ``calibration_tiles``),
    not GPTQ's fewer, overlapping ones, plus ``tune_generated`` windows the float model writes
    itself from short prompts of that file (``sampled_windows``): more text to tune on than the
    file holds. ``sequential`` (default): GPTQ takes each block's
    Linears stage by stage, each stage's Hessians from the block quantized so far
    (``gptq_network``); False takes them all from the float block (faster, slightly worse).
    ``int8``: patterns of Linears to store at int8 per channel instead ("layers.0.mlp.*",
    see ``module_grids``), a mixed-precision model that spends a few MB on the most sensitive
    layers. Raises InvalidArgument for unsupported settings, calibration data or int8
    patterns, UnsupportedModel for an already-quantized model.
    """
    from pocketlm.api import Model

    if group_size is None:
        group_size = 0 if bits == 8 else 128
    keep = tuple(keep)
    check_settings(method, bits, group_size, keep)
    from pocketlm.compress.tune import check_tune_settings, tune_scales

    check_tune_settings(tune_steps, tune_lr, tune_batch, tune_samples, tune_generated)
    if getattr(model.network, "quantization_config", None):
        raise UnsupportedModel(
            "this model is already quantized; quantize the float original instead (load the "
            "source model, e.g. smollm2-135m-instruct, not the quantized folder)")
    if sym is None:
        sym = method != "gptq"
    if act_order is None:
        act_order = method == "gptq"
    grid = Grid(bits, group_size, sym, clip)
    model = model.dense()  # a GGUF loaded packed: its blocks' fp32 values are what we quantize
    grids = module_grids(linear_names(model.network), grid, tuple(int8))
    if int8 and method == "awq":
        raise InvalidArgument("--int8 works with rtn and gptq; awq quantizes every Linear alike")
    network = copy.deepcopy(model.network)
    t0 = time.perf_counter()
    calib_info = None
    if method != "rtn" or tune_steps:
        from pocketlm.compress.calibration import calibration_samples

        batch, calib_info = calibration_samples(model.tokenizer, calibration, samples, seq_len, seed)
    if method == "rtn":
        for name in linear_names(network):
            lin = network.get_submodule(name)
            _replace(network, name, to_module(rtn(lin.weight.data, grids[name]), bias=lin.bias))
        stats = {}
    else:
        if method == "gptq":
            from pocketlm.compress.gptq import gptq_network

            stats = gptq_network(network, batch, grids if int8 else grid, act_order=act_order,
                                 damp=damp, checkpoint_dir=checkpoint_dir, progress=progress,
                                 sequential=sequential)
        else:
            from pocketlm.compress.awq import awq_network

            stats = awq_network(network, batch, grid, checkpoint_dir=checkpoint_dir,
                                progress=progress)
    modules = {name: g.spec() for name, g in grids.items()}
    modules.update(_quantize_head(network, keep))
    if tune_steps:  # on the finished network, int8 head included, against the float original
        from pocketlm.compress.calibration import calibration_tiles

        tiles, tiles_info = calibration_tiles(model.tokenizer, calibration, seq_len,
                                              tune_samples, seed)
        if tune_generated:
            from pocketlm.compress.calibration import sampled_windows

            sampled, tiles_info["sampled"] = sampled_windows(
                model, calibration, tune_generated, seq_len, seed=seed,
                progress=progress, checkpoint_dir=checkpoint_dir and Path(checkpoint_dir) / "sampled")
            tiles = torch.cat([tiles, sampled])
        stats["tune"] = tune_scales(network, model.network, tiles, tune_steps, tune_lr,
                                    tune_batch, tune_norms, seed, progress,
                                    checkpoint_dir=checkpoint_dir and Path(checkpoint_dir) / "tune")
        stats["tune"]["calibration"] = tiles_info
    if checkpoint_dir:  # every stage is done: nothing left to resume
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    qconfig = {"quant_method": "pocketlm", "format": FORMAT, "method": method, "bits": bits,
               "group_size": group_size, "sym": sym, "keep": list(keep), "modules": modules}
    if method == "gptq":
        qconfig.update(act_order=act_order, damp=damp, sequential=sequential)
    if clip:
        qconfig.update(clip=True)
    if int8:
        qconfig.update(int8=list(int8))
    network.quantization_config = qconfig
    card = copy.deepcopy(model.card)
    settings = {k: v for k, v in qconfig.items() if k not in ("modules", "quant_method", "format")}
    if calib_info:
        settings["calibration"] = calib_info
    settings["seconds"] = round(time.perf_counter() - t0, 1)
    settings["weight_bytes"] = _stored_bytes(network)
    settings["fp32_weight_bytes"] = 4 * network.config.n_params
    settings.update(stats)
    card.add_step("quantize", **settings)
    return Model(network, model.tokenizer, card)


HEAD_GRID = Grid(8, 0, True)  # embedding / output projection: int8, one scale per row


def _quantize_head(network, keep: tuple[str, ...]) -> dict:
    """Quantize embed_tokens and lm_head to int8 per row unless kept; their config entries."""
    modules = {}
    tied = network.config.tie_embeddings
    keep_emb, keep_head = "embeddings" in keep, "lm_head" in keep
    if tied and keep_emb != keep_head:
        raise InvalidArgument(
            "this model ties its embedding and output projection (one tensor); keep both "
            "(--keep embeddings,lm_head) or neither")
    if not keep_emb:
        q = rtn(network.embed_tokens.weight.data, HEAD_GRID)
        network.embed_tokens = to_module(q, "embedding")
        modules["embed_tokens"] = HEAD_GRID.spec()
    if not keep_head:
        if tied:
            network.lm_head = TiedQLinear(network.embed_tokens)
            modules["lm_head"] = {"tied": "embed_tokens"}
        else:
            network.lm_head = to_module(rtn(network.lm_head.weight.data, HEAD_GRID))
            modules["lm_head"] = HEAD_GRID.spec()
    return modules


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def _stored_bytes(network: nn.Module) -> int:
    """Bytes of the tensors a save writes (tied tensors once): the weights file minus header."""
    seen, total = set(), 0
    for t in network.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
