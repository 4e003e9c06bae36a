"""The ``pocketlm`` command: one sub-command per verb, each a thin call into the Python API.

Errors a user can cause (``PocketError``) print as one line with the fix, no traceback;
``--debug`` shows the traceback. Other verbs (eval, quantize, serve, ...) register their
sub-commands from their own packages (see ``_PLUGINS``), so this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from pocketlm.errors import PocketError

# Packages that add sub-commands: each has a ``commands`` module with ``register(subparsers)``.
_PLUGINS = [
    "pocketlm.evaluate.commands",
    "pocketlm.compress.commands",
    "pocketlm.compress.prune_commands",
    "pocketlm.train.commands",
    "pocketlm.serve.commands",
    "pocketlm.recipes.commands",
    "pocketlm.hybrid.commands",
]

EPILOG = """examples:
  pocketlm pull smollm2-135m-instruct          fetch the default model (once)
  pocketlm run smollm2-135m-instruct "Hi!"     one answer, streamed
  pocketlm chat smollm2-135m-instruct          talk to it; /reset, /exit
  pocketlm bench smollm2-135m-instruct --json  prefill/decode speed and memory

MODEL is a known name (pocketlm list --known), a .gguf file, a Hugging Face folder
(config.json + safetensors + tokenizer.json) or a folder pocketlm saved.
Nothing leaves this machine; models are stored under $POCKETLM_HOME (~/.cache/pocketlm)."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, .gguf file or model folder")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: $POCKETLM_THREADS or all cores)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights in memory: auto (default) keeps a GGUF file's quantized and "
                        "16-bit tensors packed, as in the file; float32/bfloat16 dequantize "
                        "every weight to that dtype")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (256)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"randomness; 0 = greedy, always the same answer ({temperature})")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = off (40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (0.95)")
    g.add_argument("--min-p", type=float, default=0.05,
                   help="drop tokens less likely than min-p x the best one (0.05)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="if the prompt is longer than the context: fail (none) or drop the oldest tokens (left)")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="draft for speculative decoding: a model with the same tokenizer, "
                        "'self[:L]' (the model's first L layers) or 'lookup[:N]' (prompt lookup, "
                        "no model); output is the model's own")
    g.add_argument("--draft-tokens", default="auto", metavar="K|auto",
                   help="tokens drafted per verification pass (auto: adapts to acceptance)")


def with_draft(m, a: argparse.Namespace):
    """The model, or the model speculating with --draft (loaded with the same --dtype)."""
    if not getattr(a, "draft", None):
        return m
    from pocketlm.engine.speculative import Speculative

    k = a.draft_tokens if a.draft_tokens == "auto" else _int_or_fail(a.draft_tokens)
    draft = a.draft
    if draft.partition(":")[0] not in ("lookup", "prompt-lookup", "self"):
        draft = load_from_args(argparse.Namespace(**{**vars(a), "model": a.draft}))
        draft.card.name = draft.card.name or a.draft
    return Speculative(m, draft=draft, draft_tokens=k)


def _int_or_fail(s: str) -> int:
    from pocketlm.errors import InvalidArgument

    if not s.isdigit():
        raise InvalidArgument(f"--draft-tokens takes a whole number or 'auto', got {s!r}")
    return int(s)


def _report_draft(m) -> None:
    st = getattr(m, "stats", None)
    if st is not None and st.passes:
        print(f"[speculative ({st.kind}): {st.acceptance_rate:.0%} of {st.drafted} drafted tokens "
              f"kept, {st.tokens_per_pass:.2f} tokens per target pass]", file=sys.stderr)


def sampling_from_args(a: argparse.Namespace) -> dict:
    return {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_k": a.top_k,
            "top_p": a.top_p, "min_p": a.min_p, "repetition_penalty": a.repetition_penalty,
            "seed": a.seed, "stop": a.stop}


def load_from_args(a: argparse.Namespace):

    from pocketlm.api import load

    return load(a.model, dtype=parse_dtype(getattr(a, "dtype", "auto")),
                threads=getattr(a, "threads", None))


def parse_dtype(name: str):
    """--dtype's value as load()'s dtype: None ("auto": GGUF blocks stay packed) or a torch dtype."""
    import torch

    return {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -- engine verbs ---------------------------------------------------------------------------
def cmd_pull(a):
    from pocketlm.formats.registry import pull

    path = pull(a.name, accept_license=a.accept_license)
    print(path)


def cmd_list(a):
    from pocketlm.formats.registry import known_models, list_models

    if a.known:
        print(f"{'NAME':28s} {'SIZE':>9s} {'ARCH':7s} {'QUANT':7s} {'LICENCE':38s} PULLED")
        for k in known_models():
            licence = k["license"] + (" (--accept-license)" if k["license_needs_acceptance"] else "")
            print(f"{k['name']:28s} {k['size'] / 2**20:7.1f}MB {k['architecture']:7s} "
                  f"{k['quantization']:7s} {licence:38s} {'yes' if k['pulled'] else 'no'}")
        return
    rows = list_models()
    if not rows:
        print("no models stored yet; try `pocketlm pull smollm2-135m-instruct`")
        return
    print(f"{'NAME':28s} {'SIZE':>9s} {'QUANT':6s} SOURCE")
    for r in rows:
        print(f"{r['name']:28s} {r['size'] / 2**20:7.1f}MB {r.get('quantization', '?'):6s} {r['source']}")


def cmd_rm(a):
    from pocketlm.formats.registry import remove

    remove(a.name)
    print(f"removed {a.name}")


def cmd_run(a):
    m = with_draft(load_from_args(a), a)
    sampling = sampling_from_args(a)
    truncate = None if a.truncate == "none" else a.truncate
    if a.raw or not m.tokenizer.has_chat_template:
        pieces = m.generate(a.prompt, stream=True, truncate=truncate, **sampling)
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        pieces = m.chat(messages, stream=True, truncate=truncate, **sampling)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report_draft(m)


def cmd_chat(a):
    from pocketlm.errors import ContextOverflow

    m = with_draft(load_from_args(a), a)
    sampling = sampling_from_args(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = []
    print(f"chatting with {m.card.name} — /reset clears the history, /exit or Ctrl-D leaves")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for piece in m.chat(system + history, stream=True, **sampling):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextOverflow:
            history.pop()
            print(f"(the conversation no longer fits the {m.config.max_seq_len}-token context; "
                  "/reset to start over)")
            continue
        except KeyboardInterrupt:
            print(" [interrupted]")
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_bench(a):
    from pocketlm.engine.bench import bench

    m = load_from_args(a)
    if a.draft:
        return _bench_draft(m, a)
    batch_sizes = tuple(sorted(set([1] + a.batch_size)))
    r = bench(m.network, prompt_lengths=tuple(a.prompt_lengths), new_tokens=a.new_tokens,
              batch_sizes=batch_sizes, contexts=tuple(a.context))
    r["model"] = m.card.name
    r["dtype"] = a.dtype
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(f"{m.card.name}  dtype={a.dtype}  threads={r['threads']}  weights={r['weight_bytes'] / 1e6:.0f} MB"
          f"  peak RSS={r['peak_rss_bytes'] / 2**20:.0f} MiB (whole process)")
    for n in a.prompt_lengths:
        print(f"  prefill {n:5d} tokens : {r[f'prefill_{n}_tokens_per_s']:8.1f} tokens/s")
    print(f"  time to first token  : {r['time_to_first_token_s'] * 1000:8.1f} ms "
          f"({r['time_to_first_token_prompt_tokens']}-token prompt)")
    print(f"  decode (batch 1)     : {r['decode_tokens_per_s']:8.1f} tokens/s over {a.new_tokens} tokens"
          f" ({r['decode_path']} decode step)")
    if len(r["decode_sweep"]) > 1:
        print("  decode sweep:  batch  context   aggregate tok/s   per-sequence tok/s")
        for s in r["decode_sweep"]:
            print(f"                {s['batch_size']:5d}  {s['context']:7d}   {s['tokens_per_s']:15.1f}"
                  f"   {s['per_sequence_tokens_per_s']:18.1f}")
    print(f"  peak memory (RSS)    : {r['peak_rss_bytes'] / 2**20:8.0f} MiB")


DRAFT_PROMPTS = [
    "Write a Python function that parses a CSV file into a list of dictionaries, with a docstring.",
    ("Refactor this loop into a list comprehension:\n\nresult = []\nfor x in items:\n"
     "    if x > 0:\n        result.append(x * 2)\n"),
    "I was charged twice for my order. How do I get a refund for the second payment?",
]


def _bench_draft(m, a) -> None:
    from pocketlm.engine.speculative import bench as spec_bench

    draft = with_draft(m, a).draft
    prompts = [m.chat_prompt([{"role": "user", "content": q}]) if m.tokenizer.has_chat_template
               else m.encode(q) for q in a.draft_prompt or DRAFT_PROMPTS]
    k = a.draft_tokens if a.draft_tokens == "auto" else _int_or_fail(a.draft_tokens)
    r = spec_bench(m, draft, prompts, new_tokens=a.new_tokens, draft_tokens=k)
    r["model"], r["draft_model"] = m.card.name, a.draft
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{m.card.name} with draft {a.draft} ({r['draft']}), greedy, {a.new_tokens} new tokens, "
              f"{len(prompts)} prompt(s)")
        print(f"  target alone       : {r['target_tokens_per_s']:8.1f} tokens/s")
        print(f"  speculative        : {r['speculative_tokens_per_s']:8.1f} tokens/s  "
              f"(x{r['speed_up']:.2f})")
        print(f"  acceptance         : {r['acceptance_rate']:8.1%} of {r['drafted']} drafted tokens")
        print(f"  tokens/target pass : {r['tokens_per_pass']:8.2f}")
        print(f"  time drafting      : {r['draft_s']:8.2f} s, verifying {r['verify_s']:.2f} s")
        print(f"  identical output   : {'yes' if r['identical'] else 'NO'}")
    if r["speed_up"] < 1:
        print(f"warning: speculation is slower here (x{r['speed_up']:.2f}): drafting plus "
              "verification cost more than the tokens they save on this CPU", file=sys.stderr)


# -- wiring ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Run, measure, compress, distill, fine-tune and serve small language models on a CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a known model into the local store",
                       description="Fetch a known model (checked by sha256) into $POCKETLM_HOME. "
                                   "Pulling again is instant; an interrupted pull stores nothing.")
    p.add_argument("name", help="a known model name (see `pocketlm list --known`)")
    p.add_argument("--accept-license", action="store_true",
                   help="accept the model's licence where it needs accepting (Gemma Terms of Use)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="show stored models", description="Show the models in the local store.")
    p.add_argument("--known", action="store_true",
                   help="show every model pocketlm can pull: size, architecture, licence, pulled")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="remove a stored model", description="Delete a pulled model from the store.")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("run", help="answer one prompt, streamed",
                       description="Answer one prompt, streamed to stdout. Instruct models get their "
                                   "chat template; --raw continues the text as written.")
    add_model_args(p)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    p.add_argument("--system", default=None, help="a system message (chat models)")
    add_sampling_args(p)
    add_draft_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat",
                       description="Chat in the terminal, keeping the history. /reset clears it, "
                                   "/exit or Ctrl-D leaves, Ctrl-C stops an answer.")
    add_model_args(p)
    p.add_argument("--system", default=None, help="a system message")
    add_sampling_args(p)
    add_draft_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, memory",
                       description="Measure prefill and decode speed, time to first token, peak "
                                   "memory and weight bytes on this machine.")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512],
                   help="prefill prompt lengths in tokens (128 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps to time (128)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1],
                   help="decode batch sizes to sweep, e.g. 1 4 8")
    p.add_argument("--context", type=int, nargs="+", default=[16],
                   help="decode after prompts of these lengths, e.g. 16 512 2048")
    add_draft_args(p)
    p.add_argument("--draft-prompt", action="append", default=None, metavar="TEXT",
                   help="with --draft: a prompt to decode (repeatable; default: two coding "
                        "and one customer-support question)")
    p.set_defaults(func=cmd_bench)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # that verb's package is not there yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return 0
    try:
        a.func(a)
    except PocketError as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
