"""``pocketlm finetune`` and ``pocketlm distill``: thin wrappers over ``pocketlm.train.steps``."""

from __future__ import annotations

import argparse
from pathlib import Path

FINETUNE_EPILOG = """examples:
  pocketlm finetune smollm2-135m-instruct --data support.csv --lora 16 -o support-lora
  pocketlm finetune smollm2-135m-instruct --data chats.jsonl --format chat --tokens 200000 -o tuned
  pocketlm finetune tuned --data notes.txt -o tuned2 --resume      # continue after Ctrl-C

Data: .txt (documents separated by blank lines), .jsonl (text | prompt+response | messages)
or .csv with named columns; --prompt-column/--response-column/--text-column pick them.
Instruction and chat data train on the responses only, rendered with the model's chat
template. 10% of the records are held out (seeded by --split-seed, default 0) unless
--eval-data is given. Checkpoints: OUT/checkpoints/last.pt (atomic; also on Ctrl-C).
Multi-process: torchrun --nproc-per-node 2 -m pocketlm.cli finetune ... (DDP; add --fsdp
to shard the weights, gradients and optimizer state when one process cannot hold them)."""

DISTILL_EPILOG = """examples:
  pocketlm distill --teacher smollm2-135m-instruct --student from-teacher:10 \\
      --data support.csv --tokens 500000 --top-k 32 -o student
  pocketlm distill --teacher big --student layers=6,dim=384,heads=6 --data a.txt b.txt -o s

SPEC: a saved model (same tokenizer as the teacher), from-teacher:N (N evenly spaced teacher
layers), from-teacher:0,3,6 (those layers), either narrowed by structured pruning with
heads=R and/or mlp=R (the fraction removed per layer, e.g. from-teacher:10,mlp=0.25; scored on
WikiText-2 validation), a preset (nano, micro, mini) or a config
layers=L,dim=D,heads=H[,kv_heads=K,hidden=F]. With --top-k K the teacher runs once and its
top-K log-probs are cached (fp16 + int32 ids, safetensors) for later runs."""


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="FILE", help="training file(s)")
    g.add_argument(
        "--format",
        choices=["text", "instruction", "chat"],
        default=None,
        help="record kind (default: guessed from the file)",
    )
    g.add_argument("--prompt-column", default=None, help="prompt column/key (instruction data)")
    g.add_argument("--response-column", default=None, help="response column/key")
    g.add_argument("--text-column", default=None, help="text column/key (text data)")
    g.add_argument(
        "--eval-data",
        nargs="+",
        default=None,
        metavar="FILE",
        help="held-out file(s); default: split off --held-out of the records",
    )
    g.add_argument("--held-out", type=float, default=0.1, help="held-out fraction (0.1)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (0)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per training row (256)")
    g.add_argument(
        "--no-pack",
        action="store_true",
        help="one record per row (padded) instead of packing records together",
    )


def _add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps")
    g.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="token budget instead of --steps (rows x seq-len processed)",
    )
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate ({lr})")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor / peak (0.1)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (1.0)")
    g.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32",
        help="fp32, or bf16 autocast with fp32 master weights (AVX512-BF16/AMX CPUs) (fp32)",
    )
    g.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    g.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (50)")
    g.add_argument(
        "--eval-rows", type=int, default=64, help="held-out rows per evaluation, 0 = all (64)"
    )
    g.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N steps (50)")
    g.add_argument("--seed", type=int, default=0, help="training seed (0)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    g.add_argument(
        "--keep-checkpoint", action="store_true", help="keep the checkpoint after the run finishes"
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and AdamW state over the processes "
        "(FSDP2) instead of replicating them (DDP)",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads (all cores)")
    p.add_argument("-o", "--out", required=True, help="output folder")


def _settings(a):
    from pocketlm.train.trainer import TrainSettings

    return TrainSettings(
        steps=a.steps,
        tokens=a.tokens,
        epochs=a.epochs,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        lr=a.lr,
        min_lr_ratio=a.min_lr_ratio,
        warmup_steps=a.warmup,
        weight_decay=a.weight_decay,
        clip=a.clip,
        bf16=a.bf16 or a.precision == "bf16",
        eval_every=a.eval_every,
        eval_rows=a.eval_rows,
        checkpoint_every=a.checkpoint_every,
        seed=a.seed,
        resume=a.resume,
        keep_checkpoint=a.keep_checkpoint,
        fsdp=a.fsdp,
    )


def _data(a, tokenizer):
    from pocketlm.train.data import load_data

    return load_data(
        a.data,
        tokenizer,
        seq_len=a.seq_len,
        format=a.format,
        held_out=a.held_out,
        split_seed=a.split_seed,
        packed=not a.no_pack,
        eval_paths=a.eval_data,
        prompt_column=a.prompt_column,
        response_column=a.response_column,
        text_column=a.text_column,
    )


def _threads(a) -> None:
    import os

    from pocketlm.api import set_threads

    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_threads(a.threads or max(1, (os.cpu_count() or 1) // world))


def _report(kind: str, model, out: str) -> None:
    m = model.card.metrics.get(kind, {})
    parts = [
        (
            f"{kind} done: {m.get('steps')} steps, {m.get('tokens')} tokens, "
            f"{m.get('tokens_per_s')} tokens/s"
        )
    ]
    if "held_out_perplexity" in m:
        before = m.get("held_out_perplexity_before")
        parts.append(
            f"held-out perplexity {m['held_out_perplexity']:.3f}"
            + (f" (before {before:.3f})" if before else "")
        )
    print("; ".join(parts) + f" -> {out}")


def _out_lock(out: str):
    """The output folder's lock (``pocketlm.lock``), held by rank 0 only: under torchrun the
    other ranks of the same run write nothing there."""
    import contextlib
    import os

    from pocketlm.lock import output_lock

    return output_lock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def cmd_finetune(a):
    import os

    import torch

    from pocketlm.api import load

    _threads(a)
    model = load(a.model, dtype=torch.float32, threads=None)  # training updates fp32 weights
    data = _data(a, model.tokenizer)
    base = str(Path(a.model).resolve()) if Path(a.model).exists() else a.model
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    from pocketlm.train.steps import finetune

    with _out_lock(a.out):  # two runs on one -o would overwrite each other's checkpoints
        model = finetune(
            model,
            data,
            a.out,
            _settings(a),
            lora_rank=a.lora,
            lora_alpha=a.lora_alpha,
            lora_targets=targets,
            merge=a.merge,
            base_model=base,
        )
    if os.environ.get("RANK", "0") == "0":
        _report("finetune", model, a.out)


def cmd_distill(a):
    import os

    import torch

    from pocketlm.api import load
    from pocketlm.train.distill import make_student
    from pocketlm.train.steps import distill

    _threads(a)
    teacher = load(a.teacher, dtype=torch.float32, threads=None)
    student = make_student(a.student, teacher, seed=a.seed)
    data = _data(a, teacher.tokenizer)
    with _out_lock(a.out):
        student = distill(
            teacher,
            student,
            data,
            a.out,
            _settings(a),
            loss=a.loss,
            kd_weight=a.kd_weight,
            temperature=a.temperature,
            top_k=a.top_k,
            cache_path=a.cache,
        )
    if os.environ.get("RANK", "0") == "0":
        _report("distill", student, a.out)


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a model (all weights or LoRA) on your data",
        description="Fine-tune all weights, or LoRA adapters, on text, instruction or chat data. "
        "Writes the model (or adapter) folder, loss_curve.png, train_log.json and the "
        "final metrics in card.json.",
        epilog=FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name, .gguf file or model folder")
    _add_data_args(p)
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="RANK",
        help="train rank-RANK LoRA adapters instead of all weights",
    )
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (2 x rank)")
    g.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated linear layer names to adapt (all attention + MLP)",
    )
    g.add_argument(
        "--merge",
        action="store_true",
        help="merge LoRA into the weights and save a full model (default: save an "
        "adapter folder that `pocketlm run/serve/eval` load on top of the base)",
    )
    _add_train_args(p, lr=2e-4)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "distill",
        help="train a smaller student to imitate a teacher",
        description="Knowledge distillation: a student (from the teacher's layers, a preset, a "
        "config or a saved model) learns the teacher's next-token distributions, "
        "mixed with plain cross-entropy.",
        epilog=DISTILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="teacher model name, .gguf or folder")
    p.add_argument("--student", required=True, metavar="SPEC", help="see below")
    _add_data_args(p)
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--loss",
        choices=["forward", "reverse", "symmetric", "jsd"],
        default="forward",
        help="divergence: forward KL, reverse KL (MiniLLM), symmetric, JSD (forward)",
    )
    g.add_argument(
        "--kd-weight",
        type=float,
        default=0.5,
        help="loss = w x KD + (1 - w) x cross-entropy; 0 = plain training (0.5)",
    )
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (1.0)")
    g.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="cache the teacher's top-K log-probs once and reuse them; 0 = run the "
        "teacher on the fly over the full vocabulary (0)",
    )
    g.add_argument(
        "--cache", default=None, help="teacher cache file (default OUT/teacher_topK.safetensors)"
    )
    _add_train_args(p, lr=5e-4)
    p.set_defaults(func=cmd_distill)
