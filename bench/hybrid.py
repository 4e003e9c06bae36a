"""Hybrids on this machine: speculative decoding, the router, the cascade (issue 21's bars).

    .venv/bin/python bench/hybrid.py speculative --target qwen2.5-coder-1.5b-instruct \\
        --draft qwen2.5-coder-0.5b-instruct --draft lookup --new-tokens 192
    .venv/bin/python bench/hybrid.py speculative --target smollm2-135m-instruct --draft lookup --draft self
    .venv/bin/python bench/hybrid.py router              # banking77, 6 routes x 10 examples
    .venv/bin/python bench/hybrid.py cascade --small smollm2-135m-instruct \\
        --large qwen2.5-coder-1.5b-instruct --task arc_easy --task piqa --limit 500
    .venv/bin/python bench/hybrid.py speculative --target /tmp/tinyA --draft lookup --quick

Each part writes its figures under its key in bench/results/hybrid.json and appends a section
to BENCHMARKS.md (not with --quick, a smoke run on tiny inputs). Speculative: greedy, batch
1, the target alone and speculating side by side in one process, on coding prompts and on
Bitext customer-support prompts; the llama.cpp peer (llama-speculative, K=8) runs in the same
bench when it is built (bench/build_llama_cpp.sh) and given the two GGUF files.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, append_section, llama_bin, markdown_table, merge_results

CODING = [
    "Write a Python function that parses a CSV file into a list of dictionaries, with a docstring.",
    "Write a function is_palindrome(s) in Python that ignores case and punctuation, with tests.",
    ("Refactor this into a list comprehension:\nresult = []\nfor x in items:\n    if x > 0:\n"
     "        result.append(x * 2)\n"),
    "Implement binary search in Python and explain its complexity.",
]

# banking77 intents grouped into six specialist routes (the bar asks for 5-8)
BANKING_ROUTES = {
    "cards": ["card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "declined_card_payment",
              "card_not_working", "activate_my_card", "card_swallowed"],
    "transfers": ["transfer_not_received_by_recipient", "pending_transfer", "failed_transfer",
                  "transfer_timing", "cancel_transfer", "beneficiary_not_allowed"],
    "cash": ["cash_withdrawal_charge", "atm_support", "pending_cash_withdrawal",
             "declined_cash_withdrawal", "wrong_amount_of_cash_received"],
    "topup": ["top_up_failed", "pending_top_up", "top_up_limits", "topping_up_by_card",
              "top_up_reverted"],
    "identity": ["verify_my_identity", "unable_to_verify_identity", "why_verify_identity",
                 "verify_source_of_funds"],
    "account": ["terminate_account", "edit_personal_details", "passcode_forgotten",
                "change_pin", "get_physical_card"],
}


def bitext_prompts(n: int) -> list[str]:
    path = SHARED / "data/bitext-customer-support/bitext_customer_support_4514.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["instruction"] for r in rows[:: max(1, len(rows) // n)][:n]]


def speculative(a) -> dict:
    import pocketlm
    from pocketlm.engine.speculative import bench as spec_bench

    target = pocketlm.load(a.target)
    sets = {"coding": CODING[: a.prompts], "bitext": bitext_prompts(a.prompts)}
    if a.quick:
        sets = {"coding": CODING[:1], "bitext": bitext_prompts(1)}
    out = {"target": a.target, "new_tokens": a.new_tokens, "runs": []}
    for draft in a.draft:
        spec = draft if draft.partition(":")[0] in ("lookup", "self") else pocketlm.load(draft)
        for name, texts in sets.items():
            ids = [target.chat_prompt([{"role": "user", "content": t}]) for t in texts]
            r = spec_bench(target, spec, ids, new_tokens=a.new_tokens, draft_tokens=a.draft_tokens)
            r.update(prompt_set=name, draft_model=draft)
            out["runs"].append(r)
            print(f"{draft:32s} {name:7s} x{r['speed_up']:.2f}  accept {r['acceptance_rate']:.1%}  "
                  f"{r['tokens_per_pass']:.2f} tok/pass  identical={r['identical']}", flush=True)
    peer = llama_bin("llama-speculative")
    if peer and a.peer_target and a.peer_draft:
        out["peer"] = llama_speculative(peer, a.peer_target, a.peer_draft, CODING[0], a.new_tokens)
    return out


def llama_speculative(binary: Path, target: str, draft: str, prompt: str, n: int) -> dict:
    """llama.cpp's llama-speculative (K=8, greedy) against llama-bench decoding the target alone
    (``-n n``, same threads): both speeds, their ratio, the acceptance, and the summary lines."""
    import json
    import re

    cmd = [str(binary), "-m", target, "-md", draft, "-p", prompt, "-n", str(n), "--draft-max", "8",
           "--temp", "0", "-t", "2", "-td", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    text = p.stdout + p.stderr
    lines = [ln for ln in text.splitlines() if "accept" in ln or "decoded" in ln or "speed" in ln]
    out = {"cmd": " ".join(cmd), "returncode": p.returncode, "summary": lines[-8:]}
    speed = re.findall(r"decoded\s+\d+\s+tokens in\s+[\d.]+\s+seconds, speed:\s+([\d.]+) t/s", text)
    accept = re.findall(r"accept\s*=\s*([\d.]+)%", text)
    if speed:
        out["speculative_tokens_per_s"] = float(speed[-1])
    if accept:
        out["acceptance_rate"] = float(accept[-1]) / 100
    bench = llama_bin("llama-bench")
    if bench:
        b = subprocess.run([str(bench), "-m", target, "-t", "2", "-p", "0", "-n", str(n), "-r", "1",
                            "-o", "json"], capture_output=True, text=True, timeout=1800, check=False)
        try:
            out["target_tokens_per_s"] = float(json.loads(b.stdout)[0]["avg_ts"])
        except (ValueError, KeyError, IndexError):
            out["target_error"] = b.stderr[-500:]
    if "speculative_tokens_per_s" in out and "target_tokens_per_s" in out:
        out["speed_up"] = out["speculative_tokens_per_s"] / out["target_tokens_per_s"]
    return out


def route_examples(train: list[dict], intents: list[str], n: int) -> list[str]:
    """``n`` training texts for a route, taken in turn from each of its intents (the train file
    is sorted by intent: its first ``n`` rows of a route would all be one intent's)."""
    by_intent = [[r["text"] for r in train if r["category"] == i] for i in intents]
    out, k = [], 0
    while len(out) < n and any(k < len(t) for t in by_intent):
        out += [t[k] for t in by_intent if k < len(t)][: n - len(out)]
        k += 1
    return out


def router(a) -> dict:
    from pocketlm.hybrid import router as R

    label = {i: g for g, intents in BANKING_ROUTES.items() for i in intents}

    def rows(split):
        with open(SHARED / f"data/banking77/{split}.csv", newline="") as f:
            return [r for r in csv.DictReader(f) if r["category"] in label]

    train, test = rows("train"), rows("test")
    if a.quick:
        test = test[:50]
    out = {}
    for emb in a.embedder:
        routes = [R.Route(g, model="-", examples=route_examples(train, intents, a.examples))
                  for g, intents in BANKING_ROUTES.items()]
        r = R.Router(R.RouterConfig(routes, "account", emb))
        r.decide("warm-up")
        ms, right = [], 0
        for t in test:
            d = r.decide(t["text"])
            ms.append(d.seconds * 1000)
            right += d.route == label[t["category"]]
        ms.sort()
        out[emb] = {"accuracy": right / len(test), "n_test": len(test), "examples_per_route": a.examples,
                    "p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))]}
        print(emb, out[emb], flush=True)
    out["routes"] = BANKING_ROUTES
    return out


def cascade(a) -> dict:
    import pocketlm
    from pocketlm.evaluate.tasks import Choice, load_task
    from pocketlm.hybrid import cascade as C

    small, large = pocketlm.load(a.small), pocketlm.load(a.large)
    out, curves, large_q, chosen = {"small": a.small, "large": a.large}, {}, {}, {}
    for task in a.task:
        items = [it for it in load_task(task).items if isinstance(it, Choice)][: 10 if a.quick else a.limit]
        r = C.calibrate_choices(small, large, items, a.quality_target)  # one timed pass each
        ch, t_small, t_large = r["chosen"], r["small_s"], r["large_s"]
        curves[task], large_q[task], chosen[task] = r["points"], r["large_accuracy"], ch
        # wall time of the cascade at the chosen point: small on all, large on the escalated share
        cascade_s = t_small + ch.large_share * t_large
        out[task] = {"n": r["n"], "small_accuracy": r["small_accuracy"], "large_accuracy": r["large_accuracy"],
                     "threshold": ch.threshold, "quality": ch.quality, "large_share": ch.large_share,
                     "quality_vs_large": ch.quality / r["large_accuracy"] if r["large_accuracy"] else None,
                     "small_s": t_small, "large_s": t_large, "cascade_s": cascade_s,
                     "wall_saved_vs_large": 1 - cascade_s / t_large,
                     "curve": [(p.large_share, p.quality) for p in r["points"]]}
        print(task, {k: v for k, v in out[task].items() if k != "curve"}, flush=True)
    png = Path("/tmp/hybrid_cascade_quick.png") if a.quick else (
        Path(__file__).resolve().parent / "results" / "hybrid_cascade.png")
    C.plot(curves, str(png), large_q, chosen)
    out["plot"] = str(png.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["speculative", "router", "cascade"])
    ap.add_argument("--quick", action="store_true", help="a smoke run; writes nothing")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", action="append", default=None)
    ap.add_argument("--draft-tokens", default="auto", type=lambda s: s if s == "auto" else int(s))
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--peer-target", default=None, help="GGUF for llama-speculative's target")
    ap.add_argument("--peer-draft", default=None, help="GGUF for llama-speculative's draft")
    ap.add_argument("--embedder", action="append", default=None)
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--small", default="smollm2-135m-instruct")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--task", action="append", default=None)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--target-quality", dest="quality_target", type=float, default=0.97)
    a = ap.parse_args()
    a.draft = a.draft or ["qwen2.5-coder-0.5b-instruct", "lookup"]
    a.embedder = a.embedder or ["minilm", "hashing"]
    a.task = a.task or ["arc_easy", "piqa"]
    figures = {"speculative": speculative, "router": router, "cascade": cascade}[a.part](a)
    if a.quick:
        return
    merge_results("hybrid", a.part, figures)
    if a.part == "speculative":
        rows = [[r["draft_model"], r["prompt_set"], r["target_tokens_per_s"], r["speculative_tokens_per_s"],
                 r["speed_up"], r["acceptance_rate"], r["tokens_per_pass"], r["identical"]] for r in figures["runs"]]
        peer = figures.get("peer") or {}
        if "speed_up" in peer:  # llama-speculative on the first coding prompt, K=8
            rows.append(["llama.cpp llama-speculative (K=8)", "coding[0]", peer["target_tokens_per_s"],
                         peer["speculative_tokens_per_s"], peer["speed_up"], peer.get("acceptance_rate"),
                         "-", "-"])
        body = markdown_table(["draft", "prompts", "target tok/s", "spec tok/s", "speed-up", "acceptance",
                               "tok/pass", "identical"], rows)
    elif a.part == "router":
        rows = [[k, v["accuracy"], v["p50_ms"], v["p95_ms"]] for k, v in figures.items() if k != "routes"]
        body = markdown_table(["embedder", "accuracy", "p50 ms", "p95 ms"], rows)
    else:
        rows = [[t, v["small_accuracy"], v["large_accuracy"], v["quality"], v["large_share"],
                 v["wall_saved_vs_large"]] for t, v in figures.items() if isinstance(v, dict)]
        body = markdown_table(["task", "small acc", "large acc", "cascade acc", "share to large",
                               "wall saved"], rows)
    append_section(f"hybrid: {a.part} (bench/hybrid.py)", body)


if __name__ == "__main__":
    main()
