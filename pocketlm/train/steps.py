"""``finetune`` and ``distill`` as steps: Model (+ data, settings) -> trained Model, saved.

Both call the one trainer (``trainer.train``), write the run's settings as a card step and
its final metrics (held-out loss and perplexity, tokens, time, tokens/s) as a card metric,
and save the result to ``out`` (a model folder, or a LoRA adapter folder).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from pocketlm.errors import InvalidArgument
from pocketlm.train import distill as kd
from pocketlm.train import lora as lora_mod
from pocketlm.train.data import Data
from pocketlm.train.trainer import TrainResult, TrainSettings, evaluate, train


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _metrics(result: TrainResult, before: dict | None) -> dict:
    m = {
        **result.final,
        "steps": result.steps,
        "tokens": result.tokens,
        "target_tokens": result.target_tokens,
        "seconds": round(result.seconds, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
    }
    if before:
        m["held_out_loss_before"] = before["loss"]
        m["held_out_perplexity_before"] = before["perplexity"]
    return m


def finetune(
    model,
    data: Data,
    out: str | Path,
    settings: TrainSettings | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] | list[str] = lora_mod.DEFAULT_TARGETS,
    merge: bool = True,
    base_model: str | None = None,
    eval_before: bool = True,
):
    """Fine-tune ``model`` (all weights, or LoRA adapters) on ``data``; saves to ``out``.

    Returns the trained Model (LoRA merged into it when ``merge``; otherwise the adapter
    folder is what is saved, and the returned model still holds LoRA layers). ``base_model``
    is the name or path written into an adapter's config (default: the card's source).
    Raises what ``trainer.train`` raises.
    """
    s = settings or TrainSettings()
    out = Path(out)
    network = model.dense().network.float()  # packed GGUF blocks: trained as fp32 weights
    before = None
    if eval_before and data.held_out is not None and _rank() == 0:
        before = evaluate(network, data.held_out, s.batch_size, s.bf16, s.eval_rows)
    if lora_rank:
        torch.manual_seed(s.seed)
        wrapped = lora_mod.apply_lora(network, lora_rank, lora_alpha, lora_targets)
        method = {
            "method": "lora",
            "rank": lora_rank,
            "alpha": lora_alpha if lora_alpha is not None else 2 * lora_rank,
            "targets": sorted({n.split(".")[-1] for n in wrapped}),
            "merged": merge,
        }
    else:
        for p in network.parameters():
            p.requires_grad_(True)
        method = {"method": "full"}
    result = train(
        network, data.train, data.held_out, s, out, title=f"finetune ({method['method']})"
    )
    model.card.add_step("finetune", **method, data=data.info, settings=asdict(s))
    model.card.add_metric("finetune", _metrics(result, before))
    model.train_result = result
    if _rank() != 0:
        return model
    if lora_rank and not merge:
        lora_mod.save_adapter(network, out, base_model or model.card.source)
        model.card.save(out)
        return model
    if lora_rank:
        lora_mod.merge_lora(network)
    for p in network.parameters():
        p.requires_grad_(False)
    model.save(out)
    return model


def distill(
    teacher,
    student,
    data: Data,
    out: str | Path,
    settings: TrainSettings | None = None,
    loss: str = "forward",
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    cache_path: str | Path | None = None,
    eval_before: bool = True,
):
    """Train ``student`` to match ``teacher`` on ``data``; saves the student to ``out``.

    ``top_k`` > 0 reads the teacher from a top-k cache (built at ``cache_path``, default
    ``out/teacher_top{k}.safetensors``, for only the rows the run's steps read, reused while
    the data and teacher are the same and extended when a longer run needs more rows);
    0 runs the teacher on the fly over the full vocabulary. Raises TokenizerMismatch,
    InvalidArgument, and what ``trainer.train`` raises.
    """
    s = settings or TrainSettings()
    kd.check_tokenizers(teacher, student)
    if not 0 <= kd_weight <= 1:
        raise InvalidArgument(f"--kd-weight must be in [0, 1], got {kd_weight}")
    out = Path(out)
    tnet = teacher.network.float().eval()
    for p in tnet.parameters():
        p.requires_grad_(False)
    cache = None
    extra = 0
    if kd_weight > 0 and top_k:
        cache_path = Path(cache_path or out / f"teacher_top{top_k}.safetensors")
        meta = {
            "teacher": teacher.card.name,
            "tokenizer": kd.tokenizer_digest(teacher.tokenizer),
            "k": top_k,
        }
        rows = kd.rows_used(s, data.train)  # a short run on a big file needs few rows
        cache = kd.load_cache(cache_path, data.train, meta, rows)
        if cache is None:
            if _rank() == 0:
                kd.build_cache(
                    tnet, data.train, top_k, cache_path, s.batch_size, meta, s.progress, rows
                )
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                torch.distributed.barrier()
            cache = kd.load_cache(cache_path, data.train, meta, rows)
    elif kd_weight > 0:
        extra = 8 * teacher.config.vocab_size  # the teacher's logits and log-softmax per token
    objective = kd.DistillObjective(
        loss, kd_weight, temperature, teacher=None if cache is not None else tnet, cache=cache
    )
    network = student.network.float()
    for p in network.parameters():
        p.requires_grad_(True)
    before = None
    if eval_before and data.held_out is not None and _rank() == 0:
        before = evaluate(network, data.held_out, s.batch_size, s.bf16, s.eval_rows)
    result = train(
        network,
        data.train,
        data.held_out,
        s,
        out,
        objective,
        extra,
        title=f"distill ({loss}, w={kd_weight})" if kd_weight else "train (CE only)",
    )
    for p in network.parameters():
        p.requires_grad_(False)
    student.card.add_step(
        "distill",
        teacher=teacher.card.name,
        loss=loss,
        kd_weight=kd_weight,
        temperature=temperature,
        top_k=top_k,
        data=data.info,
        settings=asdict(s),
    )
    student.card.add_metric("distill", _metrics(result, before))
    student.train_result = result
    if _rank() == 0:
        student.save(out)
    return student
