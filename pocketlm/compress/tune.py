"""Scale tuning: after GPTQ, train only the per-group scales so the model matches its float self.

GPTQ quantizes one Linear at a time to reproduce that Linear's outputs; the errors of 210
Linears still add up along the network. This stage looks at the whole network at once, in the
spirit of EfficientQAT's end-to-end stage ("E2E-QP", Chen et al., 2024) and OmniQuant: the
integer codes q and zero points z stay exactly as GPTQ chose them and only the scales s of
w = (q - z) * s move, trained to make the quantized model's next-token distribution match the
float model's (KL(float || quantized)) on the calibration windows. Optionally the RMSNorm
weights move too. The stored format does not change: the same codes, zeros and fp16 scales
(N, G), so the file is exactly as large as before.

Each scale (and norm weight) is trained as a relative factor, s = s0 * r with r starting at 1,
so the learning rate is a relative step size and means the same for every layer whatever its
weights' magnitude. At the end s is rounded to fp16 and written back into the QLinear modules.

Cost: one forward of the float model per calibration window (cached as fp16 log-probs, T x V x 2
bytes a window: 50 MB for 512 tokens of a 49k vocabulary; when all windows would take more than
half the free memory the float model is run again at every step instead), then per step
forward + backward of the quantized model over ``batch_windows`` windows, about 3x a float
forward each. The embedding/output projection (int8 per row) stays as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.compress.qlinear import QLinear
from pocketlm.errors import InvalidArgument, UnsupportedModel
from pocketlm.train import checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 120  # how often a run with a checkpoint folder saves its state


def check_tune_settings(steps: int, lr: float, batch_windows: int = 1,
                        samples: int | None = None, generated: int = 0) -> None:
    """Raise InvalidArgument for a step count, learning rate, batch or window count that
    cannot train."""
    if not isinstance(steps, int) or steps < 0:
        raise InvalidArgument(f"tune steps must be an integer >= 0 (0 = no tuning), got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise InvalidArgument(f"tune learning rate must be a finite number > 0, got {lr!r}; "
                              "try the default, 2e-3")
    if samples is not None and (not isinstance(samples, int) or samples < 1):
        raise InvalidArgument(f"tune samples must be at least 1 window (or unset: all), got "
                              f"{samples!r}")
    if not isinstance(generated, int) or generated < 0:
        raise InvalidArgument(f"generated tuning windows must be an integer >= 0 (0 = none), "
                              f"got {generated!r}")
    if generated and not steps:
        raise InvalidArgument("generated tuning windows are only read by scale tuning; set "
                              "tune steps too (e.g. --tune-steps 905 --tune-generated 384)")
    if not isinstance(batch_windows, int) or batch_windows < 1:
        raise InvalidArgument(f"tune batch must be at least 1 window, got {batch_windows!r}")


class TunableLinear(nn.Module):
    """A QLinear's fixed codes with trainable scales: w = (q - z) * s0 * r, r (N, G) trained.

    The codes are held as (N, G, group_size), padded past K with zeros, so a scale multiplies
    its group by broadcasting and its gradient is a plain sum over the last axis.
    """

    def __init__(self, q: QLinear):
        super().__init__()
        self.source = q
        self.k, gs = q.in_features, q.group_size
        n, g = q.scales.shape
        qz = torch.zeros(n, g * gs)
        group = torch.arange(self.k) // gs  # (K,) group of each input column
        qz[:, : self.k] = q.codes()[:, : self.k].float() - q.zeros.float()[:, group]
        self.register_buffer("qz", qz.view(n, g, gs))  # exact integers
        self.register_buffer("s0", q.scales.float())  # (N, G)
        self.r = nn.Parameter(torch.ones_like(self.s0))

    def scales(self) -> torch.Tensor:
        return self.s0 * self.r  # (N, G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.qz * self.scales()[:, :, None]).flatten(1)[:, : self.k]  # (N, K)
        return F.linear(x, w, self.source.bias)

    def write_back(self) -> QLinear:
        """The source QLinear with the tuned scales rounded to fp16 (codes and zeros as were)."""
        with torch.no_grad():
            s = self.scales().to(torch.float16)
            s = torch.where(s > 0, s, self.source.scales)  # a scale driven to <= 0: keep GPTQ's
            self.source.scales.copy_(s)
        return self.source


class TunableNorm(nn.Module):
    """An RMSNorm whose weight is trained as w0 * r."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.source = norm
        self.eps = norm.eps
        self.register_buffer("w0", norm.weight.detach().float().clone())
        self.r = nn.Parameter(torch.ones_like(self.w0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.w0.shape, self.w0 * self.r, self.eps)

    def write_back(self) -> nn.Module:
        with torch.no_grad():
            self.source.weight.copy_((self.w0 * self.r).to(self.source.weight.dtype))
        return self.source


def _swap(root: nn.Module, kinds: tuple[type, ...], make) -> list[tuple[str, nn.Module]]:
    swapped = []
    for name, mod in list(root.named_modules()):
        if name and isinstance(mod, kinds):
            parent, _, leaf = name.rpartition(".")
            new = make(mod)
            setattr(root.get_submodule(parent) if parent else root, leaf, new)
            swapped.append((name, new))
    return swapped


def _put_back(root: nn.Module, swapped: list[tuple[str, nn.Module]]) -> None:
    for name, new in swapped:
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf, new.write_back())


def kl_to_teacher(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student); logits (T, V), teacher log-probs (T, V)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = teacher_logp.float()
    return (t.exp() * (t - s)).sum(-1).mean()


def teacher_log_probs(teacher: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
    """fp16 log-probs (T, V) of the float model for each window of ``batch`` (S, T)."""
    with torch.inference_mode():
        return [_log_probs(teacher, teacher.hidden(batch[i: i + 1])[0])
                for i in range(batch.shape[0])]


def _log_probs(teacher: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp16 log-probs of the teacher's logits from its final hidden states (soft-capped where
    the config says, as ``Transformer.forward`` does)."""
    with torch.inference_mode():
        logits = teacher.lm_head(hidden).float()
        if cap := teacher.config.final_softcap:
            logits = torch.tanh(logits / cap) * cap
        return F.log_softmax(logits, -1).half()


def tune_scales(network: nn.Module, teacher: nn.Module, batch: torch.Tensor, steps: int,
                lr: float = 2e-3, batch_windows: int = 1, norms: bool = False, seed: int = 0,
                progress: bool = True, cache_bytes: int | None = None, checkpoint_dir=None,
                checkpoint_every: int | None = None) -> dict:
    """Train the scales (and with ``norms`` the RMSNorm weights) of ``network``'s QLinears in
    place to minimise KL(teacher || network) on the windows of ``batch`` (S, T).

    ``teacher`` is the float network the quantized one was made from. AdamW on the relative
    factors (no weight decay), cosine decay from ``lr`` to 0 over ``steps``, each step the mean
    over ``batch_windows`` windows drawn in a seeded order (every window once per epoch).
    The float model's log-probs are cached when all windows fit in ``cache_bytes`` (default:
    half the free memory), else its hidden states, else everything is recomputed every step.
    With ``checkpoint_dir`` the run saves its state there every ``checkpoint_every`` steps
    (default: every two minutes) and a later call with the same settings, windows and model
    continues from it, ending exactly where an uninterrupted run would.
    Returns summary figures for the model card. Raises InvalidArgument for bad settings and
    UnsupportedModel for a network without QLinear modules.
    """
    check_tune_settings(steps, lr, batch_windows)
    if steps == 0:
        return {}
    from tqdm import tqdm

    from pocketlm.model.transformer import RMSNorm

    if not any(isinstance(m, QLinear) for m in network.modules()):
        raise UnsupportedModel("scale tuning needs a quantized network (QLinear modules); "
                               "quantize the model first")
    t0 = time.perf_counter()
    flags = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    # Only the decoder blocks' Linears: the int8 embedding/output projection stays as it is.
    swapped = [("layers." + n, m) for n, m in _swap(network.layers, (QLinear,), TunableLinear)]
    if norms:
        swapped += [("layers." + n, m) for n, m in _swap(network.layers, (RMSNorm,), TunableNorm)]
        network.norm = TunableNorm(network.norm)
        swapped.append(("norm", network.norm))
    need = batch.numel() * network.config.vocab_size * 2  # fp16 log-probs of every window
    if cache_bytes is None:
        from pocketlm.train.trainer import available_memory

        cache_bytes = available_memory() // 2
    caching = need <= cache_bytes
    # Else its final hidden states (T x D floats a window, ~1/40 of the log-probs): each step
    # then runs only its output layer, the same computation as a whole forward's last op.
    hidden_only = not caching and batch.numel() * network.config.dim * 4 <= cache_bytes
    if not caching:
        log.warning("the float model's log-probs for %d windows need %.1f GB, more than %.1f GB "
                    "available for them: %s at every step (slower)", batch.shape[0], need / 1e9,
                    cache_bytes / 1e9, "running its output layer" if hidden_only
                    else "recomputing them")
    params = [m.r for _, m in swapped]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    cache: dict[int, torch.Tensor] = {}
    losses: list[float] = []
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    key = _run_key(swapped, batch, steps, lr, batch_windows, norms, seed)
    start = 0
    saved = checkpoint.load(folder) if folder else None
    if saved is not None and saved.get("key") != key:
        log.warning("tuning checkpoint in %s is for other settings or another model; "
                    "starting over", folder)
    elif saved is not None:
        with torch.no_grad():
            for p, v in zip(params, saved["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        g.set_state(saved["generator"])
        order, losses, start = saved["order"], saved["losses"], saved["step"]
        log.info("resuming scale tuning from %s at step %d of %d", folder, start, steps)
    def target_of(i: int) -> torch.Tensor:
        """The float model's log-probs of window i: cached, from its cached hidden states, or
        computed afresh."""
        kept = cache.get(i)
        if kept is None:
            window = batch[i: i + 1]
            with torch.inference_mode():
                kept = (teacher.hidden(window)[0] if hidden_only
                        else teacher_log_probs(teacher, window)[0])
            if caching or hidden_only:
                cache[i] = kept
        return _log_probs(teacher, kept) if hidden_only else kept

    last_save = time.perf_counter()
    was_training = network.training
    network.train()
    try:
        with tqdm(total=steps, initial=start, desc="tune scales", unit="step",
                  disable=not progress) as bar:
            for step in range(start, steps):
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for _ in range(batch_windows):
                    if not order:
                        order = torch.randperm(batch.shape[0], generator=g).tolist()
                    i = order.pop()
                    loss = kl_to_teacher(network(batch[i: i + 1])[0], target_of(i)) / batch_windows
                    loss.backward()
                    loss_sum += loss.item()
                opt.step()
                sched.step()
                losses.append(loss_sum)
                bar.set_postfix(kl=f"{loss_sum:.4f}")
                bar.update(1)
                due = ((step + 1) % checkpoint_every == 0 if checkpoint_every
                       else time.perf_counter() - last_save >= CHECKPOINT_SECONDS)
                if folder and due and step + 1 < steps:
                    checkpoint.save(folder, {
                        "key": key, "step": step + 1, "params": [p.detach() for p in params],
                        "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "generator": g.get_state(), "order": order, "losses": losses})
                    last_save = time.perf_counter()
    finally:
        network.train(was_training)
        _put_back(network, swapped)
        for p, flag in flags:
            p.requires_grad_(flag)
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "lr": lr, "batch_windows": batch_windows, "norms": norms,
            "seed": seed, "teacher_cached": "log-probs" if caching else (
                "hidden states" if hidden_only else False), "kl_first_step": round(losses[0], 5),
            "kl_last_10pct_steps": round(sum(tail) / len(tail), 5),
            "seconds": round(time.perf_counter() - t0, 1)}


def _run_key(swapped, batch, *settings) -> str:
    """A fingerprint of a tuning run: its settings, its windows and the model's starting scales
    and codes, so a checkpoint is only ever resumed into the same run."""
    h = hashlib.sha256(json.dumps(settings).encode())
    h.update(batch.numpy().tobytes())
    for name, m in swapped:
        h.update(name.encode())
        if isinstance(m, TunableLinear):
            h.update(m.s0.numpy().tobytes())
            h.update(m.source.qweight.numpy().tobytes())
    return h.hexdigest()


def tune(qmodel, reference, steps: int, lr: float = 2e-3, batch_windows: int = 1,
         norms: bool = False, calibration: str | None = None, samples: int | None = None,
         seq_len: int = 512, seed: int = 0, progress: bool = True,
         windows: tuple[torch.Tensor, dict] | None = None, checkpoint_dir=None):
    """A copy of the quantized ``qmodel`` with its scales tuned toward the float ``reference``
    (the model it was quantized from); the card gets a "tune" step. For a model made in one go
    use ``quantize(..., tune_steps=N)``. The windows are ``samples`` disjoint windows of the
    ``calibration`` file (None: all; ``calibration_tiles``), or ``windows``: token windows
    (S, T) already drawn, and their provenance for the card.
    Raises as ``tune_scales`` and ``calibration_tiles``.
    """
    import copy

    from pocketlm.api import Model
    from pocketlm.compress.calibration import calibration_tiles

    check_tune_settings(steps, lr, batch_windows, samples)
    if not getattr(qmodel.network, "quantization_config", None):
        raise UnsupportedModel("tune() takes a quantized model; quantize the float one first")
    batch, info = windows or calibration_tiles(qmodel.tokenizer, calibration, seq_len, samples,
                                               seed)
    network = copy.deepcopy(qmodel.network)
    stats = tune_scales(network, reference.network, batch, steps, lr, batch_windows, norms, seed,
                        progress, checkpoint_dir=checkpoint_dir)
    card = copy.deepcopy(qmodel.card)
    card.add_step("tune", calibration=info, **stats)
    return Model(network, qmodel.tokenizer, card)
