"""Weight pruning: magnitude, Wanda and SparseGPT, unstructured or N:M (e.g. 2:4).

    >>> import pocketlm
    >>> from pocketlm.compress.prune import prune
    >>> m = pocketlm.load("smollm2-135m-instruct")
    >>> sparse = prune(m, method="wanda", sparsity=0.5)        # 50% of every linear's weights
    >>> sparse = prune(m, method="sparsegpt", pattern="2:4")   # 2 of every 4 inputs kept
    >>> sparse.save("smollm2-wanda50")

The seven linear layers of every block are pruned; the embedding (tied to the output head in
the default model) and the norms are kept. The pruned model is an ordinary dense model with
zeros in it: it saves as plain safetensors and runs with the dense kernels at the same speed
(see BENCHMARKS.md for the measured figures and what a compressed format would save).

How the methods choose what to remove, for a linear ``W`` (out, in) fed inputs ``X`` (tokens, in):

- magnitude: the smallest ``|W|`` of the whole matrix (layer-wise), no data needed.
- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``; the lowest scores of each output row.
- SparseGPT (Frantar & Alistarh 2023): chooses by ``W_ij^2 / [H^-1]_jj^2`` with
  ``H = X^T X`` and, column by column, updates the weights not yet processed to make up for
  the ones removed (optimal brain surgeon), so ``W' X`` stays close to ``W X``.

The data-driven methods run the calibration text through the network one block at a time:
each block sees the outputs of the blocks before it *after* those were pruned, as both papers
do, so memory holds one block's activations and the errors of earlier blocks are accounted for.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketlm.errors import InvalidArgument

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same tensor as another: their input statistics are shared, not recomputed.
SAME_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
              "mlp.up_proj": "mlp.gate_proj"}


# -- calibration data ------------------------------------------------------------------------
@dataclass
class Calibration:
    tokens: torch.Tensor  # (N, L) token ids
    path: str
    sha256: str
    seed: int

    @property
    def settings(self) -> dict:
        n, length = self.tokens.shape
        return {"calibration": self.path, "calibration_sha256": self.sha256, "samples": n,
                "seq_len": length, "seed": self.seed}


def load_calibration(tokenizer, path: str | Path | None = None, samples: int = 64,
                     seq_len: int = 512, seed: int = 0) -> Calibration:
    """``samples`` seeded windows of ``seq_len`` tokens from a text file (default: WikiText-2
    validation), via the package's shared ``calibration_samples``.

    Raises InvalidArgument if the file is missing, or too short for the requested windows.
    """
    from pocketlm.compress.calibration import calibration_samples

    tokens, info = calibration_samples(tokenizer, path, samples, seq_len, seed)
    return Calibration(tokens, info["file"], info["sha256"], seed)


# -- masks and the SparseGPT solver (one weight matrix at a time) ----------------------------
def parse_pattern(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4): keep N of every M consecutive inputs. Raises InvalidArgument."""
    if pattern is None or isinstance(pattern, tuple):
        return pattern
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise InvalidArgument(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise InvalidArgument(f"pattern {pattern}: need 0 < N < M (keep N of every M weights)")
    return n, m


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries of each row of ``score`` (ties by index)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``m - n`` lowest of every ``m`` consecutive entries along each row."""
    rows, cols = score.shape
    if cols % m:
        raise InvalidArgument(f"a {rows}x{cols} weight cannot take an N:M pattern with M={m}")
    groups = score.reshape(-1, m)  # (rows * cols / m, m)
    return _lowest(groups, m - n).reshape(rows, cols)


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None,
                   pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """True where a weight is removed: the smallest |W| of the whole matrix, or per N:M group."""
    score = weight.abs().float()
    if pattern:
        return nm_mask(score, *pattern)
    k = int(score.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    flat = score.reshape(-1)
    threshold = flat.kthvalue(k).values  # O(n), unlike a full sort of the matrix
    mask = flat < threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)
    mask[ties[: k - int(mask.sum())]] = True  # exactly k: equal scores go by index
    return mask.reshape(score.shape)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float | None = None,
               pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """True where removed: lowest ``|W_ij| * ||X_j||_2`` in each output row (or N:M group).

    ``input_norm`` (in,) is the L2 norm of each input feature over the calibration tokens.
    """
    score = weight.abs().float() * input_norm.float()[None, :]
    if pattern:
        return nm_mask(score, *pattern)
    return _lowest(score, int(score.shape[1] * sparsity))


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """The pruned weight (same shape): SparseGPT's mask choice with OBS weight updates.

    ``hessian`` (in, in) is ``X^T X`` over the calibration inputs. Columns are processed left
    to right in blocks of ``blocksize``; unstructured masks are chosen per block (the lowest
    ``W^2 / diag(H^-1)^2`` of the block), N:M masks per group of M columns. ``damp`` x the
    mean diagonal is added to H so its Cholesky factor exists.
    """
    threads = torch.get_num_threads()
    # Thousands of tiny ops (and LAPACK's potri): one thread is far faster than several that
    # synchronise on every op (measured 12 s vs 0.02 s for one block on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        # Work on W^T (in, out) in fp32, so that "column i" is a contiguous row.
        Wt = weight.detach().float().T.contiguous()  # (cols, rows)
        cols = Wt.shape[0]
        H = hessian.detach().double().clone()
        dead = torch.diag(H) == 0  # inputs that were always zero: their weights never matter
        H[dead, dead] = 1.0
        Wt[dead] = 0.0
        H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
        # Upper Cholesky factor of H^-1: row i holds the update of columns i.. when i goes.
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        _sparsegpt_columns(Wt, Hinv.float(), sparsity, pattern, blocksize)
    finally:
        torch.set_num_threads(threads)
    return Wt.T.to(weight.dtype).contiguous()


def _sparsegpt_columns(Wt, Hinv, sparsity, pattern, blocksize) -> None:
    """SparseGPT's blocked column sweep over Wt (in, out), in place."""
    cols = Wt.shape[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = Wt[i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (b, rows), (b, b)
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        if pattern is None:
            k = int(W1.numel() * sparsity)
            mask1 = _lowest((W1**2 / d[:, None] ** 2).reshape(1, -1), k).reshape(W1.shape)
        else:
            n, m = pattern
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % m == 0:
                group = W1[i:i + m] ** 2 / d[i:i + m, None] ** 2  # (m, rows)
                mask1[i:i + m] = _lowest(group.T, m - n).T
            w = W1[i]
            err = w * mask1[i] / d[i]  # (rows,): what removing the masked weights costs
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)  # compensate in columns i.. (i's own -> 0)
            W1[i].masked_fill_(mask1[i], 0.0)
            Err1[i] = err
        Wt[i1:i2] = W1
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1


# -- running calibration data through the network block by block -----------------------------
def block_context(network, seq_len: int, layer: int = 0) -> tuple:
    """The (cos, sin, mask) that block ``layer``'s ``forward`` takes for a batch of seq_len
    tokens from position 0 (``Transformer.layer_context``: Gemma's local layers get their own
    RoPE tables and the windowed mask)."""
    positions = torch.arange(seq_len)[None, :]  # (1, T): broadcasts over the batch
    return network.layer_context(layer, positions)


def block_contexts(network, seq_len: int) -> list[tuple]:
    """``block_context`` for every block, in order."""
    return [block_context(network, seq_len, i) for i in range(len(network.layers))]


@torch.no_grad()
def run_block(block, x: torch.Tensor, ctx, chunk: int = 8) -> torch.Tensor:
    """The block's outputs (N, T, D) for inputs (N, T, D), ``chunk`` sequences at a time."""
    cos, sin, mask = ctx
    return torch.cat([block(x[i:i + chunk], cos, sin, mask, None, None)
                      for i in range(0, x.shape[0], chunk)])


class InputStats:
    """Forward hooks that accumulate, per linear, the statistics of its inputs.

    ``sumsq`` (in,) = sum over tokens of x_j^2 (Wanda); ``gram`` (in, in) = X^T X (SparseGPT).
    """

    def __init__(self, modules: dict[str, nn.Linear], gram: bool):
        self.gram = gram
        self.sumsq: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()
                         if name not in SAME_INPUT]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            # Per-chunk sums in fp32 (fast), accumulated across chunks in fp64.
            self.sumsq[name] = self.sumsq.get(name, 0) + (x * x).sum(0).double()
            if self.gram:
                self.grams[name] = self.grams.get(name, 0) + (x.T @ x).double()
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name, source in SAME_INPUT.items():
            if source in self.sumsq:
                self.sumsq[name] = self.sumsq[source]
                if self.gram:
                    self.grams[name] = self.grams[source]


def _linears(block) -> dict[str, nn.Linear]:
    return {name: block.get_submodule(name) for name in LINEARS}


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="layer")


# -- the step -------------------------------------------------------------------------------
@torch.no_grad()
def prune(model, method: str = "wanda", sparsity: float | None = None,
          pattern: str | tuple[int, int] | None = None, calibration: str | Path | None = None,
          samples: int = 64, seq_len: int = 512, seed: int = 0, blocksize: int = 128,
          damp: float = 0.01, progress: bool = True, inplace: bool = False):
    """A copy of ``model`` with its block linears pruned; the card records how.

    Give either ``sparsity`` (fraction removed, e.g. 0.5) or ``pattern`` ("2:4": keep 2 of
    every 4 consecutive inputs of each output). Wanda and SparseGPT read ``samples`` windows
    of ``seq_len`` tokens from ``calibration`` (default: WikiText-2 validation). Raises
    InvalidArgument for an unknown method, a sparsity outside [0, 1), both or neither of
    sparsity and pattern, or calibration text that is missing or too short.
    """
    if method not in METHODS:
        raise InvalidArgument(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    nm = parse_pattern(pattern)
    if (sparsity is None) == (nm is None):
        raise InvalidArgument("give exactly one of sparsity (e.g. 0.5) and pattern (e.g. 2:4)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise InvalidArgument(f"sparsity is the fraction removed, in [0, 1); got {sparsity}")
    out = model if inplace else _copy_model(model.dense())  # packed GGUF blocks: fp32 first
    net = out.network
    settings: dict = {"method": method, "sparsity": sparsity,
                      "pattern": f"{nm[0]}:{nm[1]}" if nm else None}
    if method == "magnitude":
        for block in _progress(net.layers, "prune magnitude", progress):
            for lin in _linears(block).values():
                lin.weight[magnitude_mask(lin.weight, sparsity, nm)] = 0.0
    else:
        calib = load_calibration(out.tokenizer, calibration, samples, seq_len, seed)
        settings.update(calib.settings)
        if method == "sparsegpt":
            settings.update(blocksize=blocksize, damp=damp)
        dtype = net.embed_tokens.weight.dtype
        x = net.embed(calib.tokens)  # (N, T, D): the first block's inputs
        contexts = block_contexts(net, calib.tokens.shape[1])
        for block, ctx in _progress(list(zip(net.layers, contexts)), f"prune {method}", progress):
            linears = _linears(block)
            stats = InputStats(linears, gram=method == "sparsegpt")
            run_block(block, x, ctx)
            stats.remove()
            for name, lin in linears.items():
                if method == "wanda":
                    mask = wanda_mask(lin.weight, stats.sumsq[name].sqrt(), sparsity, nm)
                    lin.weight[mask] = 0.0
                else:
                    lin.weight.copy_(sparsegpt_prune(lin.weight, stats.grams[name], sparsity,
                                                     nm, blocksize, damp).to(dtype))
            x = run_block(block, x, ctx)  # what the next block sees, after this one was pruned
    settings["achieved_sparsity"] = round(sparsity_of(net), 6)
    out.card.add_step("prune", **settings)
    return out


def sparsity_of(network) -> float:
    """Fraction of zeros over the weights of every block linear."""
    zeros = total = 0
    for block in network.layers:
        for lin in _linears(block).values():
            zeros += int((lin.weight == 0).sum())
            total += lin.weight.numel()
    return zeros / total


def _copy_model(model):
    from pocketlm.api import Model

    return Model(copy.deepcopy(model.network), model.tokenizer, copy.deepcopy(model.card))


# -- compressed storage: nonzero values + a one-bit-per-weight mask --------------------------
def bitmask_pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each 2-D weight that is at least 25% zeros as ``NAME.values`` (the nonzeros, row-major)
    + ``NAME.bitmask`` (uint8, 1 = kept, packed 8 per byte) + ``NAME.shape``; others as is.

    At 50% sparsity in fp32 this takes 4 x 0.5 + 1/8 = 2.125 bytes a weight instead of 4.
    """
    import numpy as np

    out = {}
    for name, t in state.items():
        if t.dim() == 2 and (t == 0).float().mean() >= 0.25:
            mask = (t != 0).reshape(-1)
            out[f"{name}.values"] = t.reshape(-1)[mask].contiguous()
            out[f"{name}.bitmask"] = torch.from_numpy(np.packbits(mask.numpy()))
            out[f"{name}.shape"] = torch.tensor(t.shape, dtype=torch.int64)
        else:
            out[name] = t
    return out


def bitmask_unpack(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``bitmask_pack``: dense tensors, bit-identical to the packed ones."""
    import numpy as np

    out = {}
    for name, t in packed.items():
        if name.endswith(".values"):
            base = name.removesuffix(".values")
            shape = packed[f"{base}.shape"].tolist()
            n = shape[0] * shape[1]
            bits = np.unpackbits(packed[f"{base}.bitmask"].numpy(), count=n).astype(bool)
            dense = torch.zeros(n, dtype=t.dtype)
            dense[torch.from_numpy(bits)] = t
            out[base] = dense.reshape(shape)
        elif not name.endswith((".bitmask", ".shape")):
            out[name] = t
    return out


def save_bitmask(model, folder: str | Path) -> Path:
    """Save ``model`` like ``Model.save``, with its sparse weights as values + bitmask.

    ``pocketlm.load`` expands them back to the same dense weights (bit for bit). Other tools
    that read Hugging Face folders do not know this layout: save with ``Model.save`` (dense)
    for them. Returns the folder.
    """
    import json
    import os

    from safetensors.torch import load_file, save_file

    folder = model.save(folder)
    weights = folder / "model.safetensors"
    packed = bitmask_pack(load_file(str(weights)))
    tmp = folder / "model.safetensors.tmp"
    save_file(packed, str(tmp), metadata={"format": "pt", "pocketlm_sparse": "bitmask"})
    os.replace(tmp, weights)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pocketlm_sparse_format"] = "bitmask"  # NAME.values + NAME.bitmask + NAME.shape
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, folder / "config.json")
    return folder
