"""``pocketlm recipe run|show`` and ``pocketlm export``: thin wrappers over recipes/ and
formats/export.py."""

from __future__ import annotations

import argparse

RECIPE_EPILOG = """examples:
  pocketlm recipe show quick                       the plan, and what a re-run would skip
  pocketlm recipe run quick -o runs/quick          a shipped recipe (pocketlm/recipes/quick.yaml)
  pocketlm recipe run my.yaml --set quantize.bits=8 --model ./my-model

A recipe is a YAML list of steps: load, finetune, distill, prune, prune_structured, quantize,
evaluate, report, export, save. Each step's settings are the parameters of the Python function
it calls (`pocketlm recipe show FILE --schema` lists them). Each step writes OUT/NN-step with
its model card; a re-run skips the steps whose inputs are unchanged and continues an
interrupted one from its checkpoints."""

EXPORT_EPILOG = """examples:
  pocketlm export my-int4 --format gguf -o my-int4.gguf        keeps GPTQ codes (Q4_0/Q4_1)
  pocketlm export smollm2-135m-instruct --format gguf --type f16 -o smollm2-f16.gguf
  pocketlm export my-model --format hf --dtype bf16 -o my-model-hf

--type auto: a model quantized to int4 (groups of 32, 64, 128 ...) keeps its integer codes as
Q4_0 (symmetric, bit-exact) or Q4_1 (asymmetric; codes and scales kept, the offset rounded to
fp16); int8 per row as Q8_0; a float model is written F16. 3-bit and asymmetric int8 grids
have no GGUF block type: they are refused, or requantized if you ask for q4_0/q4_1/q8_0."""


def cmd_recipe_show(a) -> None:
    from pathlib import Path

    from pocketlm.recipes.recipe import STEPS, default_out, describe, parse

    if a.schema:
        for kind in STEPS.values():
            print(f"{kind.name}: {kind.doc}")
            for p in kind.schema().values():
                print(f"    {p.describe()}")
        return
    recipe = parse(a.recipe, a.set, a.model)
    print(describe(recipe, Path(a.output) if a.output else default_out(recipe)))


def cmd_recipe_run(a) -> None:
    from pathlib import Path

    from pocketlm.recipes.recipe import default_out, format_summary, parse, run

    recipe = parse(a.recipe, a.set, a.model)
    out = Path(a.output) if a.output else default_out(recipe)
    rows = run(recipe, out)
    print()
    print(format_summary(rows))
    print(f"\nsteps in {out}; summary in {out / 'summary.md'}")


def cmd_export(a) -> None:
    from pocketlm.api import load
    from pocketlm.formats.export import export

    # loaded as stored (GGUF blocks and 16-bit rows stay packed): `--type auto` copies them
    # exactly; any other type dequantizes tensor by tensor
    m = load(a.model, dtype=None, threads=a.threads)
    path = export(m, a.output, a.format, a.type, a.dtype, a.force)
    print(f"wrote {path}")


def register(sub) -> None:
    p = sub.add_parser("recipe", help="run a YAML recipe of steps (finetune, distill, quantize, "
                       "evaluate, export ...)", description="Run or show a recipe.",
                       epilog=RECIPE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    for name, fn, helptext in (("run", cmd_recipe_run, "run the steps, skipping unchanged ones"),
                               ("show", cmd_recipe_show, "print the plan and what would be skipped")):
        r = rsub.add_parser(name, help=helptext, epilog=RECIPE_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        r.add_argument("recipe", nargs="?" if name == "show" else None,
                       help="a recipe file or a shipped recipe's name (quick, customer-support)")
        r.add_argument("-o", "--output", default=None, help="run folder (runs/NAME)")
        r.add_argument("--model", default=None, help="start from this model instead")
        r.add_argument("--set", action="append", default=[], metavar="STEP.SETTING=VALUE",
                       help="override a setting, e.g. quantize.bits=8 (repeatable)")
        if name == "show":
            r.add_argument("--schema", action="store_true",
                           help="list every step and the settings it takes")
        r.set_defaults(func=fn)

    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp) or a Hugging Face folder",
                       description="Export for llama.cpp/Ollama (GGUF) or transformers/vLLM (HF).",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model name, .gguf file or model folder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (all cores)")
    p.add_argument("--format", choices=["gguf", "hf"], required=True)
    p.add_argument("-o", "--output", required=True, help="the .gguf file or HF folder to write")
    p.add_argument("--type", default="auto",
                   choices=["auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"],
                   help="gguf tensor type (auto: keep quantized codes; F16 for a float model)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="hf: weight dtype (bf16)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)
