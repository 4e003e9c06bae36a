"""``pocketlm quantize``: weight-only quantization (RTN, GPTQ, AWQ) to a packed model folder."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  pocketlm quantize smollm2-135m-instruct --method rtn --bits 8 -o smollm2-int8
  pocketlm quantize smollm2-135m-instruct --method gptq --bits 4 --group-size 128 -o smollm2-int4
  pocketlm quantize smollm2-135m-instruct --method awq --bits 4 --calibration my_domain.txt -o out
  pocketlm quantize smollm2-135m-instruct --method gptq --bits 4 \\
      --tune-steps 470 --tune-norms -o smollm2-int4t   # good int4 quality, 25-50 min on 2 cores
  pocketlm quantize smollm2-135m-instruct --method gptq --bits 4 --tune-norms \\
      --tune-steps 905 --tune-generated 384 -o smollm2-int4g  # best pure int4, ~85 min
  pocketlm quantize smollm2-135m-instruct --method gptq --bits 4 \\
      --int8 'layers.[012].mlp.*,layers.2[89].mlp.*' \\
      --tune-steps 470 --tune-norms -o smollm2-int4mix # mixed int4/int8: +6.4 MB, best quality

Supported: rtn 8/4/3 bits, gptq 8/4/3 bits, awq 4/3 bits; group sizes 32, 64, 128, 256 or 0
(one scale per output channel; the default for 8 bits, 128 otherwise). The embedding and
output projection are stored int8 per row unless kept in float with --keep.
The output folder loads anywhere a model is accepted (pocketlm run OUT ...)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model's weights (rtn, gptq, awq) to a packed folder",
        description="Weight-only quantization to int8/int4/int3 with packed storage; the "
                    "result computes from the packed weights with CPU kernels.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model name, .gguf file or (float) model folder")
    p.add_argument("-o", "--output", required=True, help="folder to write the quantized model to")
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn",
                   help="rtn: round to nearest; gptq: error-compensating, needs calibration "
                        "text; awq: activation-aware scaling, needs calibration text (rtn)")
    p.add_argument("--bits", type=int, choices=[8, 4, 3], default=8, help="bits per weight (8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns sharing one scale: 32, 64, 128, 256, or 0 for one per "
                        "output channel (default: 0 for 8 bits, 128 otherwise)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid, zero point fixed (default for rtn and awq)")
    sym.add_argument("--asym", dest="sym", action="store_false",
                     help="asymmetric grid: a stored zero point per group (default for gptq)")
    p.add_argument("--clip", action="store_true",
                   help="search each group's range for the least rounding error instead of "
                        "plain min/max")
    p.add_argument("--keep", default="",
                   help="comma-separated parts to keep in float: embeddings,lm_head")
    p.add_argument("--int8", default="", metavar="PATTERNS",
                   help="comma-separated Linears to store at int8 per channel instead of --bits "
                        "(a mixed-precision model), as shell patterns over names like "
                        "layers.3.mlp.down_proj: e.g. 'layers.[0-2].mlp.*,layers.29.mlp.*'")
    g = p.add_argument_group("calibration (gptq, awq)")
    g.add_argument("--calibration", default=None,
                   help="plain-text file (default: WikiText-2 validation split in ../shared/data)")
    g.add_argument("--samples", type=int, default=64, help="calibration windows (64)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    g.add_argument("--seed", type=int, default=0, help="seed for picking the windows (0)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--act-order", dest="act_order", action="store_true", default=None,
                       help="gptq: quantize the most active input columns first, with group "
                            "grids fixed up front (default)")
    order.add_argument("--no-act-order", dest="act_order", action="store_false",
                       help="gptq: quantize columns left to right")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq: within each block, take each Linear's Hessian from the block with "
                        "the Linears before it already quantized (default); --no-sequential "
                        "takes them all from the float block (~1.5x faster, slightly worse)")
    g.add_argument("--damp", type=float, default=0.01,
                   help="gptq: Hessian damping, as a fraction of its mean diagonal (0.01)")
    t = p.add_argument_group(
        "scale tuning (after any method; on disjoint windows of the calibration file)",
        "Keeps every integer code and zero point and trains only the fp16 group scales (and\n"
        "with --tune-norms the RMSNorm weights) so the quantized model's next-token\n"
        "distribution matches the float model's (KL). Same format, same file size.\n"
        "It reads the calibration file cut into disjoint --seq-len windows (all of them unless\n"
        "--tune-samples), one window a step by default: WikiText-2 validation holds 521 of\n"
        "512 tokens, so --tune-steps 470 reads each of 470 once. Cost: a step is a forward +\n"
        "backward (3-6 s for SmolLM2-135M on 2 cores). Interrupted tuning resumes from its\n"
        "last checkpoint (every 2 minutes).\n"
        "SmolLM2-135M int4 g128, whole WikiText-2 test, word perplexity vs fp32: GPTQ +16.7%,\n"
        "GPTQ + --tune-steps 470 --tune-norms +8.7% (25-50 min on 2 cores); adding\n"
        "--tune-generated 384 with --tune-steps 905 +7.9% (~85 min); with five MLPs at\n"
        "--int8 (file 16.9% of fp32 instead of 15.7%) +5.9% (BENCHMARKS.md).")
    t.add_argument("--tune-steps", type=int, default=0,
                   help="AdamW steps of scale tuning; 0 = off (default)")
    t.add_argument("--tune-lr", type=float, default=2e-3,
                   help="learning rate, a relative step of each scale, cosine decay to 0 (2e-3)")
    t.add_argument("--tune-batch", type=int, default=1, help="calibration windows per step (1)")
    t.add_argument("--tune-norms", action="store_true",
                   help="also tune the RMSNorm weights (stored in float; size unchanged)")
    t.add_argument("--tune-samples", type=int, default=None,
                   help="disjoint windows of --seq-len tokens of the calibration file to tune "
                        "on (default: all of them; WikiText-2 validation holds 521)")
    t.add_argument("--tune-generated", type=int, default=0, metavar="N",
                   help="also tune on N windows the float model writes itself, each begun with "
                        "32 tokens of the calibration file (more text than the file holds; "
                        "~20 min for 384 on 2 cores); add N to --tune-steps to read them all")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $POCKETLM_THREADS or all cores)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(a: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from pocketlm.api import load
    from pocketlm.compress.qlinear import backend
    from pocketlm.compress.quantize import check_settings, quantize
    from pocketlm.compress.tune import check_tune_settings

    keep = tuple(k.strip() for k in a.keep.split(",") if k.strip())
    int8 = tuple(k.strip() for k in a.int8.split(",") if k.strip())
    group = a.group_size if a.group_size is not None else (0 if a.bits == 8 else 128)
    check_settings(a.method, a.bits, group, keep)  # fail before the slow load
    check_tune_settings(a.tune_steps, a.tune_lr, a.tune_batch, a.tune_samples, a.tune_generated)
    out = Path(a.output)
    from pocketlm.lock import output_lock

    with output_lock(out):  # one writer of OUT and its .partial checkpoints, refused at once
        model = load(a.model, dtype=torch.float32, threads=a.threads)  # steps change fp32 weights
        checkpoint = out.parent / (out.name + ".partial")
        try:
            q = quantize(model, a.method, a.bits, group, a.sym, keep, a.calibration, a.samples,
                         a.seq_len, a.seed, a.act_order, a.damp, a.clip,
                         checkpoint_dir=str(checkpoint), tune_steps=a.tune_steps,
                         tune_lr=a.tune_lr, tune_batch=a.tune_batch, tune_norms=a.tune_norms,
                         tune_samples=a.tune_samples, tune_generated=a.tune_generated,
                         int8=int8, sequential=a.sequential)
        except KeyboardInterrupt:
            if checkpoint.is_dir():
                print(f"finished work (layers, sampled windows, tuning steps) is saved in {checkpoint}; run the same "
                      "command again to resume from there", file=sys.stderr)
            raise
        q.save(out)
    size = (out / "model.safetensors").stat().st_size
    fp32 = model.config.n_params * 4
    print(f"wrote {out}: model.safetensors {size / 1e6:.1f} MB = {100 * size / fp32:.1f}% of "
          f"fp32 ({fp32 / 1e6:.0f} MB); kernel: {backend()}")
