"""``pocketlm prune``: unstructured / N:M pruning, or structured removal of heads, channels, layers."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  pocketlm prune smollm2-135m-instruct --method wanda --sparsity 0.5 -o wanda50
  pocketlm prune smollm2-135m-instruct --method sparsegpt --pattern 2:4 -o sgpt24
  pocketlm prune smollm2-135m-instruct --structured mlp --ratio 0.4 -o mlp40
  pocketlm prune smollm2-135m-instruct --structured heads --ratio 0.34 --whole-groups -o kv2

Unstructured and N:M pruning zero weights of every block's linear layers. The folder stores
them as nonzero values + a bitmask (--storage bitmask, the default: 2.125 instead of 4
bytes a weight at 50%; the default model's file is 339 MB instead of 538 MB) or as plain dense safetensors (--storage dense); either way they run
with dense kernels, at the same speed as the unpruned model. Structured pruning
removes the same number of heads / MLP channels from every layer, or whole layers, so the
saved model is genuinely smaller and faster. Calibration text defaults to WikiText-2's
validation split; the card (card.json) records method, settings and the text's sha256."""


def register(sub) -> None:
    from pocketlm.cli import add_model_args

    p = sub.add_parser(
        "prune", help="prune weights (magnitude, Wanda, SparseGPT) or heads/channels/layers",
        description="Prune a model and save it as a new model folder.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="folder to write the pruned model to")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"],
                     help="unstructured / N:M pruning method")
    how.add_argument("--structured", choices=["heads", "mlp", "layers"],
                     help="remove whole query heads, MLP channels or layers")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, help="fraction of weights removed, e.g. 0.5")
    amount.add_argument("--pattern", help="N:M sparsity, keep N of every M weights, e.g. 2:4")
    amount.add_argument("--ratio", type=float,
                        help="--structured: fraction of heads / channels / layers removed")
    p.add_argument("--whole-groups", action="store_true",
                   help="--structured heads: remove whole key/value groups (with their query "
                        "heads) instead of query heads within every group")
    p.add_argument("--storage", choices=["bitmask", "dense"], default="bitmask",
                   help="--method: save nonzeros + a 1-bit mask (bitmask: at 50%% sparsity the "
                        "default model's file is 63%% of dense; pocketlm reads it) or plain dense safetensors that every "
                        "Hugging Face tool reads (dense)")
    g = p.add_argument_group("calibration (wanda, sparsegpt, structured)")
    g.add_argument("--calibration", default=None,
                   help="plain-text file (default ../shared/data/wikitext-2-raw/wiki.valid.raw)")
    g.add_argument("--samples", type=int, default=None,
                   help="windows of calibration text (64 unstructured, 32 structured)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    g.add_argument("--seed", type=int, default=0, help="which windows are drawn (0)")
    p.set_defaults(func=cmd_prune)


def cmd_prune(a) -> None:
    from pocketlm.cli import load_from_args
    from pocketlm.errors import InvalidArgument

    if a.method and a.ratio is not None:
        raise InvalidArgument("--ratio goes with --structured; use --sparsity or --pattern with --method")
    if a.structured and (a.sparsity is not None or a.pattern):
        raise InvalidArgument("--structured takes --ratio, not --sparsity/--pattern")
    if a.method and a.sparsity is None and not a.pattern:
        raise InvalidArgument("--method needs --sparsity (e.g. 0.5) or --pattern (e.g. 2:4)")
    if a.structured and a.ratio is None:
        raise InvalidArgument("--structured needs --ratio (fraction removed, e.g. 0.25)")
    model = load_from_args(a)
    calib = {"calibration": a.calibration, "seq_len": a.seq_len, "seed": a.seed}
    before = model.config.n_params
    if a.method:
        from pocketlm.compress.prune import prune

        out = prune(model, a.method, sparsity=a.sparsity, pattern=a.pattern,
                    samples=a.samples or 64, **calib)
    else:
        from pocketlm.compress.structured import prune_structured

        out = prune_structured(model, a.structured, a.ratio, whole_groups=a.whole_groups,
                               samples=a.samples or 32, **calib)
    del model
    if a.method and a.storage == "bitmask":
        from pocketlm.compress.prune import save_bitmask

        folder = save_bitmask(out, a.output)
    else:
        folder = out.save(a.output)
    s = out.card.steps[-1]["settings"]
    if a.method:
        size = (folder / "model.safetensors").stat().st_size
        print(f"{a.method}: {s['achieved_sparsity']:.1%} of block weights are zero; stored "
              f"{a.storage}, {size / 1e6:.1f} MB (decode speed is unchanged: dense kernels)")
    else:
        after = out.config.n_params
        print(f"{a.structured}: {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters "
              f"({1 - after / before:.1%} fewer)")
    print(f"saved {folder}")
