"""The one trainer behind ``finetune`` and ``distill``.

AdamW (weight decay on matrices only), linear warm-up then cosine decay to ``min_lr_ratio``,
gradient accumulation, gradient-norm clipping, optional bf16 autocast, a tqdm bar with loss,
tokens/s and ETA, held-out evaluation every ``eval_every`` steps, and a loss-curve PNG.

Reproducible and resumable by construction: the rows of every micro-batch and the learning
rate are pure functions of the step number (an epoch-seeded permutation of the rows), so a
checkpoint needs only the step, the trainable weights, the optimizer state and the RNG states
to continue exactly as an uninterrupted run would. Checkpoints are written atomically every
``checkpoint_every`` steps and when Ctrl-C (SIGINT) stops the run; a NaN/inf loss stops it
with the step number and leaves the last good checkpoint in place.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the network is wrapped in DDP (gloo on
CPU, NCCL on GPUs) and each process takes every N-th row of each micro-batch. The loss of a
step is the sum of its token losses divided by the step's target-token count over all
processes and micro-batches, so N processes compute the same update as one process with the
same global batch.

With ``fsdp`` (``--fsdp``) the processes shard instead of replicate: a copy of the network is
split with FSDP2 (``fully_shard`` per transformer block, then the root), so each process holds
1/N of the trainable weights, their gradients and AdamW's moments. The caller's network stays
whole and unchanged until the held-out evaluations and the end of the run, when the trained
weights are gathered back into it; checkpoints hold full tensors, written by process 0.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import InvalidArgument, PocketError
from pocketlm.train import checkpoint as ckpt
from pocketlm.train.data import Blocks

log = logging.getLogger(__name__)

# objective(network, inputs (B,T), targets (B,T), rows (B,)) -> (per-token loss (B,T), parts)
Objective = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]


class TrainingDiverged(PocketError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(PocketError):
    """Ctrl-C stopped the run after a checkpoint was written."""


class OutOfMemory(PocketError):
    """The run would not fit in the memory available."""


@dataclass
class TrainSettings:
    steps: int | None = None  # optimizer steps; default from tokens or epochs, else 1 epoch
    tokens: int | None = None  # token budget: input tokens processed (rows x seq_len)
    epochs: float | None = None
    batch_size: int = 8  # rows per micro-batch, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int | None = None  # default: 5% of the steps (at most 100)
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm; 0 = off
    bf16: bool = False  # bf16 autocast (CPUs with AVX512-BF16 or AMX)
    eval_every: int = 50  # steps; 0 = only at the end
    eval_rows: int = 64  # held-out rows used for each evaluation (0 = all)
    checkpoint_every: int = 50  # steps; 0 = only at Ctrl-C
    seed: int = 0
    resume: bool = False
    keep_checkpoint: bool = False  # keep checkpoints/last.pt after a finished run
    progress: bool = True
    memory_check: bool = True
    fsdp: bool = False  # under torchrun: shard weights, grads and AdamW state (FSDP2)

    def resolve_steps(self, n_rows: int, seq_len: int) -> int:
        rows_per_step = self.batch_size * self.grad_accum
        if self.steps:
            return self.steps
        if self.tokens:
            return max(1, math.ceil(self.tokens / (rows_per_step * seq_len)))
        return max(1, math.ceil((self.epochs or 1.0) * n_rows / rows_per_step))

    def warmup(self, steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, steps // 20)

    def lr_at(self, step: int, steps: int) -> float:
        """Learning rate for the (0-based) step: linear warm-up, then cosine to the floor."""
        warm = self.warmup(steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def identity(self, steps: int) -> dict:
        """The settings a resumed run must share with the checkpoint."""
        keys = (
            "batch_size",
            "grad_accum",
            "lr",
            "min_lr_ratio",
            "weight_decay",
            "clip",
            "bf16",
            "seed",
        )
        identity = {
            "steps": steps,
            "warmup_steps": self.warmup(steps),
            **{k: getattr(self, k) for k in keys},
        }
        if self.fsdp:  # its checkpoints keep AdamW's state by parameter name
            identity["fsdp"] = True
        return identity


@dataclass
class TrainResult:
    steps: int
    tokens: int  # input tokens processed
    target_tokens: int
    seconds: float  # wall time of this process's part of the run (excludes earlier resumes)
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)  # {"step", "tokens", "loss", "lr"}
    evals: list[dict] = field(default_factory=list)  # {"step", "tokens", "loss", "perplexity"}
    final: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# -- pieces -------------------------------------------------------------------------------
def cross_entropy(network, inputs, targets, rows):
    """The plain next-token objective: per-token cross-entropy (B, T)."""
    logits = network(inputs)  # (B, T, V)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape), {}


def bf16_supported() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, c, lambda: False)() for c in checks)


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(
    network: nn.Module, blocks: Blocks, batch_size: int = 8, bf16: bool = False, rows: int = 0
) -> dict:
    """Mean cross-entropy over the target tokens of ``blocks``; with ``rows`` > 0, over that
    many rows spread evenly from first to last. Not the first rows: files are often sorted by
    topic (bitext-customer-support by intent), and the first rows would cover one topic."""
    was_training = network.training
    network.eval()
    pick = None
    if 0 < rows < len(blocks):
        pick = torch.linspace(0, len(blocks) - 1, rows).round().long()
    tokens = blocks.tokens if pick is None else blocks.tokens[pick]
    masks = blocks.mask if pick is None else blocks.mask[pick]
    n = len(tokens)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        tok = tokens[i : min(n, i + batch_size)]
        mask = masks[i : min(n, i + batch_size), 1:]
        with _autocast(bf16):
            ce, _ = cross_entropy(network, tok[:, :-1], tok[:, 1:], None)
        total += float((ce * mask).sum())
        count += int(mask.sum())
    network.train(was_training)
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": count}


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def estimate_memory(
    network: nn.Module, micro_rows: int, seq_len: int, extra_per_token: int = 0, shards: int = 1
) -> dict:
    """Bytes a training run needs beyond the already loaded weights.

    Gradients + AdamW's two moments (fp32) for each trainable parameter (with ``shards`` > 1,
    FSDP: 1/shards of them, plus the sharded copy of the weights), and the activations
    kept for the backward pass: per token and layer about 12 x width + 5 x SwiGLU width
    floats, plus 3 vocabulary-wide rows (logits, log-softmax, their gradient), plus
    ``extra_per_token`` (e.g. a teacher's logits), with 20% allocator overhead.
    """
    cfg = network.config
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    per_token = 4 * (cfg.n_layers * (12 * cfg.dim + 5 * cfg.hidden_dim) + 3 * cfg.vocab_size)
    activations = int(1.2 * micro_rows * seq_len * (per_token + extra_per_token))
    optimizer = 3 * 4 * trainable if shards == 1 else 4 * 4 * trainable // shards
    return {
        "trainable_params": trainable,
        "optimizer_bytes": optimizer,
        "activation_bytes": activations,
        "total_bytes": optimizer + activations,
    }


def check_memory(estimate: dict, available: int | None = None) -> None:
    """Raise OutOfMemory (with the estimate and what to change) if it would not fit."""
    available = available_memory() if available is None else available
    if estimate["total_bytes"] > 0.9 * available:
        raise OutOfMemory(
            f"this run needs about {_size(estimate['total_bytes'])} beyond the loaded weights "
            f"(optimizer {_size(estimate['optimizer_bytes'])} for "
            f"{estimate['trainable_params'] / 1e6:.1f}M trainable parameters, activations "
            f"{_size(estimate['activation_bytes'])}) but only {_size(available)} is available; "
            "lower --batch-size (raise --grad-accum to keep the batch), shorten --seq-len, or "
            "train LoRA (--lora 16) instead of all weights"
        )


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


class _Rows:
    """Which rows each micro-batch uses: an endless stream of epoch-seeded permutations."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g)}
            out.append(int(self._perms[epoch][p % self.n]))
        return torch.tensor(out, dtype=torch.long)


def _shard(network: nn.Module) -> nn.Module:
    """An FSDP2-sharded copy of ``network``: one unit per transformer block, then the root."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(network)
    for block in getattr(sharded, "layers", []):
        fully_shard(block)
    fully_shard(sharded)
    return sharded


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def _gather_into(sharded: nn.Module, network: nn.Module) -> None:
    """Copy the trained weights of the sharded copy into the caller's whole network."""
    whole = dict(network.named_parameters())
    for n, p in sharded.named_parameters():
        if p.requires_grad:
            whole[n].copy_(_full(p))


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- the loop -----------------------------------------------------------------------------
def train(
    network: nn.Module,
    data: Blocks,
    held_out: Blocks | None,
    settings: TrainSettings,
    out_dir: str | Path,
    objective: Objective = cross_entropy,
    extra_bytes_per_token: int = 0,
    title: str = "training",
) -> TrainResult:
    """Train the parameters of ``network`` that require grad; see the module docstring.

    Checkpoints go to ``out_dir/checkpoints``; the loss curve to ``out_dir/loss_curve.png``
    and the history to ``out_dir/train_log.json``. Raises OutOfMemory before starting,
    TrainingDiverged on a NaN/inf loss, TrainingInterrupted after Ctrl-C, CheckpointMismatch
    for ``resume`` with other settings or data.
    """
    s = settings
    out_dir = Path(out_dir)
    rank, world = _dist()
    if s.batch_size % world:
        raise InvalidArgument(
            f"--batch-size {s.batch_size} must be a multiple of the {world} processes"
        )
    if s.bf16 and not bf16_supported():
        raise InvalidArgument("--bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither")
    fsdp = s.fsdp and world > 1
    if s.fsdp and world == 1:
        log.warning(
            "--fsdp has no effect in one process; start it with torchrun --nproc-per-node N"
        )
    seq_len = data.seq_len
    steps = s.resolve_steps(len(data), seq_len)
    if not any(p.requires_grad for p in network.parameters()):
        raise InvalidArgument("the network has no trainable parameters")
    if s.memory_check:
        check_memory(
            estimate_memory(
                network, s.batch_size // world, seq_len, extra_bytes_per_token, world if fsdp else 1
            )
        )
    # the module the steps run on: the network itself, or its sharded copy (FSDP)
    trained = _shard(network) if fsdp else network
    params = [(n, p) for n, p in trained.named_parameters() if p.requires_grad]

    torch.manual_seed(s.seed)
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=s.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    ckpt_dir = out_dir / "checkpoints"
    identity, fingerprint = s.identity(steps), data.fingerprint()
    start, history, evals, good_step = 0, [], [], None
    if s.resume:
        saved = ckpt.load(ckpt_dir)
        if saved is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        else:
            ckpt.check_compatible(saved, identity, fingerprint, ckpt_dir)
            if fsdp:  # every process reads the full tensors and keeps its shard
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_state_dict,
                )

                set_state_dict(
                    trained,
                    opt,
                    model_state_dict=saved["trainable"],
                    optim_state_dict=saved["optimizer"],
                    options=StateDictOptions(full_state_dict=True, strict=False),
                )
            else:
                with torch.no_grad():
                    for n, p in params:
                        p.copy_(saved["trainable"][n])
                opt.load_state_dict(saved["optimizer"])
            ckpt.set_rng_state(saved["rng"])
            start, history, evals = saved["step"], saved["history"], saved["evals"]
            good_step = start
            log.info("resumed from step %d of %d", start, steps)

    def save_checkpoint(step: int) -> None:
        nonlocal good_step
        if fsdp:  # full tensors, optimizer state keyed by parameter name (all processes call)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            whole, optimizer = get_state_dict(
                trained, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            trainable = {n: whole[n] for n, _ in params} if rank == 0 else {}
        else:
            trainable = {n: p.detach().clone() for n, p in params}
            optimizer = opt.state_dict()
        if rank == 0:
            ckpt.save(
                ckpt_dir,
                {
                    "step": step,
                    "settings": identity,
                    "fingerprint": fingerprint,
                    "trainable": trainable,
                    "optimizer": optimizer,
                    "rng": ckpt.rng_state(),
                    "history": history,
                    "evals": evals,
                },
            )
        good_step = step
        if world > 1:
            torch.distributed.barrier()

    model = trained
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network)
    trained.train()

    stop = {"flag": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():

        def on_sigint(signum, frame):
            if stop["flag"]:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            stop["flag"] = True
            log.warning("Ctrl-C: finishing this step and writing a checkpoint ...")

        old_handler = signal.signal(signal.SIGINT, on_sigint)

    from tqdm.auto import tqdm

    rows = _Rows(len(data), s.seed)
    micro, accum = s.batch_size, s.grad_accum
    tokens_per_step = micro * accum * seq_len
    bar = tqdm(
        total=steps,
        initial=start,
        desc=title,
        unit="step",
        disable=not s.progress or rank != 0,
        dynamic_ncols=True,
    )
    t0, done_tokens = time.perf_counter(), 0
    try:
        for step in range(start, steps):
            lr = s.lr_at(step, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            step_rows = rows.take(step * accum * micro, accum * micro).view(accum, micro)
            denom = int(data.mask[step_rows.flatten(), 1:].sum())
            loss_sum = torch.zeros(())
            parts_sum: dict[str, torch.Tensor] = {}
            for m in range(accum):
                local = step_rows[m][rank::world]
                tok, mask = data.tokens[local], data.mask[local, 1:]
                sync = m == accum - 1 or world == 1 or fsdp  # FSDP reduces every micro-batch
                ctx = model.no_sync() if not sync else _nullcontext()
                with ctx:
                    with _autocast(s.bf16):
                        per_token, parts = objective(model, tok[:, :-1], tok[:, 1:], local)
                    loss = (per_token.float() * mask).sum() / max(1, denom)
                    (loss * world).backward()
                loss_sum += loss.detach()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + (v.detach().float() * mask).sum() / max(
                        1, denom
                    )
            if world > 1:
                torch.distributed.all_reduce(loss_sum)
            step_loss = float(loss_sum)
            grad_norm = _full(
                torch.nn.utils.clip_grad_norm_([p for _, p in params], s.clip)
                if s.clip > 0
                else torch.zeros(())
            )
            if not math.isfinite(step_loss) or not torch.isfinite(grad_norm):
                what = (
                    f"loss is {step_loss}"
                    if not math.isfinite(step_loss)
                    else "gradient is not finite"
                )
                kept = (
                    f"the last good checkpoint (step {good_step}) is kept in {ckpt_dir}"
                    if good_step is not None
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"training stopped at step {step + 1}: the {what}; {kept}. Lower --lr, keep "
                    "--clip on, or check the data; --resume continues from the checkpoint"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            done_tokens += tokens_per_step
            record = {
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "target_tokens": denom,
                "loss": step_loss,
                "lr": lr,
            }
            for k, v in parts_sum.items():
                record[k] = float(v)
            history.append(record)
            elapsed = time.perf_counter() - t0
            postfix = {"loss": f"{step_loss:.3f}", "tok/s": f"{done_tokens / elapsed:.0f}"}
            last = step + 1 == steps
            if fsdp and (
                last or held_out is not None and s.eval_every and (step + 1) % s.eval_every == 0
            ):
                _gather_into(trained, network)  # evaluate (and return) the whole network
            if (
                held_out is not None
                and rank == 0
                and (last or s.eval_every and (step + 1) % s.eval_every == 0)
            ):
                e = evaluate(network, held_out, micro, s.bf16, s.eval_rows)
                evals.append({"step": step + 1, "tokens": record["tokens"], **e})
                postfix["eval"] = f"{e['loss']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if not last and (
                stop["flag"] or s.checkpoint_every and (step + 1) % s.checkpoint_every == 0
            ):
                save_checkpoint(step + 1)
            if stop["flag"] and not last:
                raise TrainingInterrupted(
                    f"stopped at step {step + 1} of {steps}; checkpoint written to {ckpt_dir}. "
                    "Run the same command with --resume to continue"
                )
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    seconds = time.perf_counter() - t0
    if fsdp:
        _gather_into(trained, network)
    network.eval()
    result = TrainResult(
        steps=steps,
        tokens=steps * tokens_per_step,
        target_tokens=sum(h["target_tokens"] for h in history),
        seconds=seconds,
        tokens_per_s=done_tokens / seconds if seconds else 0.0,
        history=history,
        evals=evals,
    )
    if evals:
        result.final = {
            "held_out_loss": evals[-1]["loss"],
            "held_out_perplexity": evals[-1]["perplexity"],
        }
    if history:
        result.final["train_loss"] = history[-1]["loss"]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_log.json").write_text(json.dumps(result.to_dict(), indent=1))
        plot_curves({title: result}, out_dir / "loss_curve.png", title)
        if not s.keep_checkpoint and (ckpt_dir / ckpt.CHECKPOINT).is_file():
            (ckpt_dir / ckpt.CHECKPOINT).unlink()
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def plot_curves(
    runs: dict[str, TrainResult | dict], path: str | Path, title: str = "", x: str = "tokens"
) -> Path:
    """Training and held-out loss against tokens (or steps) for one or more runs, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, r) in enumerate(runs.items()):
        r = r.to_dict() if isinstance(r, TrainResult) else r
        color = f"C{i}"
        h = r["history"]
        if h:
            ax.plot(
                [p[x] for p in h],
                [p["loss"] for p in h],
                color=color,
                alpha=0.35,
                lw=1,
                label=f"{label} (train)",
            )
        if r["evals"]:
            ax.plot(
                [p[x] for p in r["evals"]],
                [p["loss"] for p in r["evals"]],
                color=color,
                marker="o",
                lw=2,
                label=f"{label} (held-out)",
            )
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
