"""``pocketlm route`` and ``pocketlm cascade`` (and ``cascade calibrate``)."""

from __future__ import annotations

import argparse
import json
import sys

from pocketlm.errors import InvalidArgument

ROUTE_EPILOG = """examples:
  pocketlm route router.yaml "my card was charged twice"          route, then answer
  pocketlm route router.yaml "my card was charged twice" --decide  only say which route
  pocketlm serve --router router.yaml                              model "auto" routes

router.yaml: routes (name; model, or url + model + api_key_env, or cascade; examples or
examples_csv; optional), fallback, threshold, embedder (see pocketlm/hybrid/router.py)."""

CASCADE_EPILOG = """examples:
  pocketlm cascade smollm2-135m-instruct qwen2.5-coder-1.5b-instruct "What is 7 x 8?" --threshold -0.8
  pocketlm cascade calibrate smollm2-135m-instruct qwen2.5-coder-1.5b-instruct --task arc_easy \\
      --limit 300 --target 0.97 --plot cascade.png"""


def cmd_route(a: argparse.Namespace) -> None:
    from pocketlm.hybrid import router as R

    config = R.load_config(a.config)
    r = R.Router(config)
    query = R.check_query(a.query)
    if a.decide:
        d = r.decide(query)
        print(json.dumps({"route": d.route, "confidence": d.confidence, "fallback": d.fallback,
                          "reason": d.reason, "scores": d.scores, "ms": d.seconds * 1000}, indent=2))
        return
    backends = R.Backends(config)
    ans = R.answer(r, backends, [{"role": "user", "content": query}],
                   max_tokens=a.max_tokens, temperature=a.temperature)
    print(ans.text)
    note = f" ({ans.note})" if ans.note else ""
    print(f"[route: {ans.route}, confidence {ans.decision.confidence:.2f}{note}]", file=sys.stderr)


def cmd_cascade(a: argparse.Namespace) -> None:
    from pocketlm.api import load
    from pocketlm.hybrid import cascade as C

    if a.small == "calibrate":  # pocketlm cascade calibrate SMALL LARGE --task TASK
        if not a.prompt or not a.task:
            raise InvalidArgument("usage: pocketlm cascade calibrate SMALL LARGE --task TASK")
        return _calibrate(load(a.large), load(a.prompt), a)
    if a.threshold is None or not a.prompt:
        raise InvalidArgument("pocketlm cascade SMALL LARGE PROMPT needs --threshold "
                              "(pick one with `pocketlm cascade calibrate`)")
    c = C.Cascade(load(a.small), load(a.large), a.threshold, a.confidence)
    msgs = [{"role": "user", "content": a.prompt}]
    ans = c.chat(msgs, max_tokens=a.max_tokens, temperature=a.temperature)
    print(ans.text)
    print(f"[answered by the {ans.by} model; small-model confidence {ans.confidence:.3f}, "
          f"threshold {a.threshold}]", file=sys.stderr)


def _calibrate(small, large, a) -> None:
    from pocketlm.evaluate.tasks import Choice, load_task
    from pocketlm.hybrid import cascade as C

    items = [it for it in load_task(a.task).items if isinstance(it, Choice)]
    if not items:
        raise InvalidArgument(f"task {a.task!r} has no multiple-choice items to calibrate on")
    items = items[: a.limit] if a.limit else items
    r = C.calibrate_choices(small, large, items, a.target)
    ch = r["chosen"]
    print(f"{a.task}: {r['n']} items, small {r['small_accuracy']:.3f}, large {r['large_accuracy']:.3f}")
    print(f"threshold {ch.threshold:.4f} (margin): quality {ch.quality:.3f} "
          f"({ch.quality / r['large_accuracy']:.1%} of the large model's) with "
          f"{ch.large_share:.1%} of items sent to the large model")
    cascade_s = r["small_s"] + ch.large_share * r["large_s"]
    print(f"scoring time: cascade ~{cascade_s:.1f} s against {r['large_s']:.1f} s for the large "
          f"model alone ({1 - cascade_s / max(r['large_s'], 1e-9):.0%} saved)")
    if a.plot:
        C.plot({a.task: r["points"]}, a.plot, {a.task: r["large_accuracy"]}, {a.task: ch})
        print(f"plot: {a.plot}")


def register(sub) -> None:
    p = sub.add_parser("route", help="send a query to the right specialist (router YAML)",
                       description="Route a query with a router configuration (examples per "
                                   "route, MiniLM embeddings, a fallback) and let that route answer.",
                       epilog=ROUTE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="router YAML")
    p.add_argument("query")
    p.add_argument("--decide", action="store_true", help="only print the route and its scores (JSON)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("cascade", help="small model first, large one when unsure; calibrate T",
                       description="Answer with SMALL; when its confidence is under --threshold, "
                                   "LARGE answers. `cascade calibrate SMALL LARGE --task TASK` "
                                   "sweeps the threshold on labelled data and plots the curve.",
                       epilog=CASCADE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("small", help="the small model (or 'calibrate')")
    p.add_argument("large")
    p.add_argument("prompt", nargs="?", help="the question (calibrate: the large model)")
    p.add_argument("--threshold", type=float, default=None, help="escalate below this confidence")
    p.add_argument("--confidence", choices=["mean_logprob", "min_logprob", "entropy"],
                   default="mean_logprob", help="how the small model's confidence is measured")
    p.add_argument("--task", default=None, help="calibrate: a multiple-choice task (arc_easy, piqa, ...)")
    p.add_argument("--limit", type=int, default=None, help="calibrate: the first N items")
    p.add_argument("--target", type=float, default=0.97,
                   help="calibrate: quality to reach, as a share of the large model's (0.97)")
    p.add_argument("--plot", default=None, help="calibrate: write the quality-vs-cost curve (PNG)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_cascade)
