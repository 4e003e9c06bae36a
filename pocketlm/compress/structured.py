"""Structured pruning: remove whole attention heads, MLP channels or layers -> a smaller model.

    >>> from pocketlm.compress.structured import prune_structured
    >>> small = prune_structured(m, unit="mlp", ratio=0.4)     # 40% of every MLP's channels
    >>> small = prune_structured(m, unit="layers", ratio=0.25) # a quarter of the blocks
    >>> small.config.hidden_dim, small.config.n_params

Unlike unstructured sparsity this gives a genuinely smaller dense network: weight matrices
lose rows and columns, the config is updated, and the folder it saves is an ordinary model
that loads and runs faster. Every layer loses the same number of heads or channels, so the
config stays uniform (one ``n_heads``, one ``hidden_dim``) and other tools read it too.

What is removed is ranked by an activation-based importance score, measured on calibration
text fed through the network block by block (each block sees the outputs of the blocks before
it after those were pruned):

- heads: the energy a query head adds to the residual stream, ``sum_t ||W_o,h y_h(t)||^2``.
  Grouped-query attention is respected: each key/value group loses the same number of query
  heads (keys and values kept), or with ``whole_groups`` whole groups go (keys, values and
  all their query heads).
- mlp: channel c's energy ``sum_t a_c(t)^2 * ||W_down[:, c]||^2``, ``a`` the input to down_proj.
- layers: block influence (ShortGPT, Men et al. 2024), ``1 - cos(x_in, x_out)`` averaged over
  tokens; the blocks that change the residual stream least go.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from pocketlm.compress.prune import _progress, block_contexts, load_calibration, run_block
from pocketlm.errors import InvalidArgument

UNITS = ("heads", "mlp", "layers")


# -- importance --------------------------------------------------------------------------------
class _Accumulate:
    """A forward hook that adds f(input) into ``self.value`` on every call."""

    def __init__(self, module: nn.Module, fn):
        self.value = 0
        self.fn = fn
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0].detach()
        self.value = self.value + self.fn(x.reshape(-1, x.shape[-1]).double())


def head_importance(o_weight: torch.Tensor, gram: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads,) energy each head writes through o_proj: sum_t ||W_o,h y_h(t)||^2.

    ``gram`` = Y^T Y (H*E, H*E) of the o_proj inputs; for head h the energy is
    trace(W_h^T W_h Y_h^T Y_h) with W_h = o_weight[:, h*E:(h+1)*E].
    """
    E = o_weight.shape[1] // n_heads
    W = o_weight.double()
    out = torch.empty(n_heads, dtype=torch.float64)
    for h in range(n_heads):
        s = slice(h * E, (h + 1) * E)
        out[h] = ((W[:, s].T @ W[:, s]) * gram[s, s]).sum()
    return out


def channel_importance(down_weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """(hidden,) energy each MLP channel writes: sum_t a_c(t)^2 * ||W_down[:, c]||^2."""
    return sumsq.double() * down_weight.double().pow(2).sum(0)


# -- surgery -----------------------------------------------------------------------------------
def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[idx].clone())
    if lin.bias is not None:  # Qwen2's q/k/v biases go with their rows
        lin.bias = nn.Parameter(lin.bias.data[idx].clone())
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:, idx].clone())
    lin.in_features = len(idx)


def _head_cols(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows/columns of the given heads, in order: (len(heads) * head_dim,)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def remove_heads(attn, keep_q: torch.Tensor, keep_kv: torch.Tensor) -> None:
    """Keep query heads ``keep_q`` and kv heads ``keep_kv`` (sorted; each kept kv head's
    kept query heads must be contiguous in ``keep_q`` so grouped attention still pairs them).
    Biases (Qwen2) are sliced with their rows; the q/k norms (Qwen3, Gemma) weigh each of a
    head's E dimensions the same in every head, so they stay as they are."""
    E = attn.head_dim
    _keep_rows(attn.q_proj, _head_cols(keep_q, E))
    _keep_cols(attn.o_proj, _head_cols(keep_q, E))
    _keep_rows(attn.k_proj, _head_cols(keep_kv, E))
    _keep_rows(attn.v_proj, _head_cols(keep_kv, E))
    attn.n_heads, attn.n_kv_heads = len(keep_q), len(keep_kv)


def remove_channels(mlp, keep: torch.Tensor) -> None:
    """Keep MLP channels ``keep`` (sorted): rows of gate/up, columns of down."""
    _keep_rows(mlp.gate_proj, keep)
    _keep_rows(mlp.up_proj, keep)
    _keep_cols(mlp.down_proj, keep)


def _choose_heads(score: torch.Tensor, n_kv: int, drop_per_group: int, whole_groups: int):
    """(keep_q, keep_kv) from per-query-head scores (H,), ranked within/among groups."""
    group = score.numel() // n_kv
    by_group = score.reshape(n_kv, group)  # (K, G): query heads h = k*G + g
    if whole_groups:
        keep_kv = torch.sort(torch.argsort(by_group.sum(1), descending=True)[: n_kv - whole_groups]).values
        keep_q = _head_cols(keep_kv, group)  # all query heads of the kept groups
        return keep_q, keep_kv
    keep_in = torch.sort(torch.argsort(by_group, dim=1, descending=True)[:, : group - drop_per_group], dim=1).values
    keep_q = (torch.arange(n_kv)[:, None] * group + keep_in).reshape(-1)
    return keep_q, torch.arange(n_kv)


# -- the step ----------------------------------------------------------------------------------
def plan(config, unit: str, ratio: float, whole_groups: bool = False) -> dict:
    """How many heads/groups/channels/layers ``ratio`` removes, and the new config values.

    Raises InvalidArgument when the ratio removes nothing or everything.
    """
    if unit not in UNITS:
        raise InvalidArgument(f"unknown structured unit {unit!r}; choose one of {', '.join(UNITS)}")
    if not 0.0 < ratio < 1.0:
        raise InvalidArgument(f"ratio is the fraction removed, in (0, 1); got {ratio}")
    if unit == "heads":
        H, K = config.n_heads, config.n_kv_heads
        if whole_groups:
            drop = round(ratio * K)
            if not 0 < drop < K:
                raise InvalidArgument(
                    f"ratio {ratio} of {K} key/value groups removes {drop}; choose a ratio that "
                    f"removes between 1 and {K - 1} groups (multiples of {1 / K:.3f})")
            return {"drop_groups": drop, "n_heads": H - drop * H // K, "n_kv_heads": K - drop}
        group = H // K
        drop = round(ratio * group)
        if not 0 < drop < group:
            raise InvalidArgument(
                f"ratio {ratio} of {group} query heads per key/value group removes {drop}; choose a "
                f"ratio removing 1..{group - 1} per group (multiples of {1 / group:.3f}), or "
                "--whole-groups to remove key/value groups")
        return {"drop_per_group": drop, "n_heads": K * (group - drop), "n_kv_heads": K}
    if unit == "mlp":
        keep = config.hidden_dim - round(ratio * config.hidden_dim)
        if not 0 < keep < config.hidden_dim:
            raise InvalidArgument(f"ratio {ratio} leaves {keep} of {config.hidden_dim} MLP channels")
        return {"hidden_dim": keep}
    if config.sliding_window and config.sliding_window_pattern:
        raise InvalidArgument(
            f"removing whole layers of a {config.arch} model would shift its pattern of local "
            f"(sliding-window) and global attention layers (every {config.sliding_window_pattern}th "
            "is global, by index); prune 'heads' or 'mlp' instead")
    keep = config.n_layers - round(ratio * config.n_layers)
    if not 0 < keep < config.n_layers:
        raise InvalidArgument(f"ratio {ratio} leaves {keep} of {config.n_layers} layers")
    return {"n_layers": keep}


@torch.no_grad()
def prune_structured(model, unit: str = "mlp", ratio: float = 0.25, whole_groups: bool = False,
                     calibration: str | Path | None = None, samples: int = 32, seq_len: int = 512,
                     seed: int = 0, progress: bool = True):
    """A smaller copy of ``model`` without the least important heads, channels or layers.

    ``unit`` is "heads" (query heads, the same number from every key/value group, or whole
    groups with ``whole_groups``), "mlp" (SwiGLU channels) or "layers" (whole blocks);
    ``ratio`` is the fraction of that unit removed, the same in every layer. Returns a new
    ``Model`` whose config reflects the new shape; the card records the step, the importance
    scores' calibration data and the parameter counts. Raises InvalidArgument for an unknown
    unit, a ratio that removes nothing or everything, or missing/short calibration text.
    """
    from pocketlm.api import Model, build_network

    cfg = model.config
    p = plan(cfg, unit, ratio, whole_groups)
    calib = load_calibration(model.tokenizer, calibration, samples, seq_len, seed)
    net = copy.deepcopy(model.dense().network)  # packed GGUF blocks: pruned as fp32
    x = net.embed(calib.tokens)  # (N, T, D)
    contexts = block_contexts(net, calib.tokens.shape[1])
    removed: list = []
    if unit == "layers":
        influence = []
        for block, ctx in _progress(list(zip(net.layers, contexts)), "score layers", progress):
            y = run_block(block, x, ctx)
            cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)  # (N, T)
            influence.append(float(1 - cos.mean()))
            x = y
        order = sorted(range(cfg.n_layers), key=lambda i: influence[i])
        removed = sorted(order[: cfg.n_layers - p["n_layers"]])
        net.layers = nn.ModuleList(b for i, b in enumerate(net.layers) if i not in removed)
        scores = {"block_influence": [round(v, 6) for v in influence]}
    else:
        for block, ctx in _progress(list(zip(net.layers, contexts)), f"prune {unit}", progress):
            if unit == "heads":
                attn = block.self_attn
                acc = _Accumulate(attn.o_proj, lambda y: y.T @ y)
                run_block(block, x, ctx)
                acc.handle.remove()
                score = head_importance(attn.o_proj.weight, acc.value, attn.n_heads)
                keep_q, keep_kv = _choose_heads(score, attn.n_kv_heads, p.get("drop_per_group", 0),
                                                p.get("drop_groups", 0))
                removed.append(sorted(set(range(attn.n_heads)) - set(keep_q.tolist())))
                remove_heads(attn, keep_q, keep_kv)
            else:
                mlp = block.mlp
                acc = _Accumulate(mlp.down_proj, lambda a: (a * a).sum(0))
                run_block(block, x, ctx)
                acc.handle.remove()
                score = channel_importance(mlp.down_proj.weight, acc.value)
                keep = torch.sort(torch.argsort(score, descending=True)[: p["hidden_dim"]]).values
                removed.append(cfg.hidden_dim - len(keep))
                remove_channels(mlp, keep)
            x = run_block(block, x, ctx)  # the next block sees this one's pruned outputs
        scores = {}
    new_cfg = dataclasses.replace(cfg, head_dim=cfg.head_dim,
                                  **{k: v for k, v in p.items() if k in ("n_heads", "n_kv_heads",
                                                                          "hidden_dim", "n_layers")})
    network = build_network(new_cfg, net.state_dict(), dtype=net.embed_tokens.weight.dtype,
                            source="structured pruning")
    card = copy.deepcopy(model.card)
    card.add_step("prune_structured", unit=unit, ratio=ratio, whole_groups=whole_groups,
                  removed=removed, params_before=cfg.n_params, params_after=new_cfg.n_params,
                  **calib.settings, **scores)
    return Model(network, model.tokenizer, card)
