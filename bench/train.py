"""Distillation and fine-tuning on the customer-support domain, on this CPU.

    .venv/bin/python bench/train.py --phases students --eval-rows 64   # the student study
    .venv/bin/python bench/train.py [--tokens 32768] [--eval-rows 16]  # fine-tune + throughput
    (add --quick to either to check the script runs on tiny budgets)

Domain: bitext-customer-support (instruction -> response, chat template, loss on responses),
held-out = 10% of the rows by the seeded split (split seed 0), packed into 128-token rows;
each evaluation uses the first --eval-rows held-out rows. Teacher: the default model.

students (run alone; see students_study):
(a) KD vs CE-only for a student keeping 10 of the teacher's 30 layers (from-teacher:10),
    the same token budget (--student-tokens) each, the teacher corrected on the domain first
    and its top-k log-probs cached once; the curves in bench/results/train_students.png.
(b) from-teacher init vs random init (same shape, CE-only) at that budget.
lora, full, throughput:
(c) fine-tune the teacher (LoRA r16 on all linears, and full) on --tokens: held-out domain
    perplexity before/after, and WikiText-2 perplexity drift on fixed windows.
(d) training tokens/s: teacher full, teacher LoRA, the student under torchrun with 2
    processes, and the peer (Hugging Face transformers' LlamaForCausalLM, same weights, same
    batch, forward + backward + AdamW) measured in the same run.

Every run sees the same rows in the same order (training seed 0); a budget is rows x 128
tokens processed. Run it at `nice -n 10` with POCKETLM_THREADS=1 on a shared machine."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    SHARED,
    append_section,
    markdown_table,
    read_results,
    write_results,
)

import pocketlm
from pocketlm.train.data import Blocks, Data, load_data
from pocketlm.train.distill import make_student
from pocketlm.train.steps import distill, finetune
from pocketlm.train.trainer import TrainSettings, evaluate

CSV = SHARED / "data" / "bitext-customer-support" / "bitext_customer_support_4514.csv"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
SEQ = 128
BATCH = 2


def wikitext_windows(tokenizer, n: int) -> Blocks:
    """The first n non-overlapping 256-token windows of the WikiText-2 test set, all targets."""
    ids = tokenizer.encode(WIKI.read_text()[:400_000])[: n * SEQ + 1]
    rows = torch.stack([torch.tensor(ids[i * SEQ : (i + 1) * SEQ + 1]) for i in range(n)])
    return Blocks(rows, torch.ones_like(rows, dtype=torch.bool))


def ppl(network, blocks, rows=0) -> float:
    return evaluate(network, blocks, BATCH, rows=rows)["perplexity"]


def hf_peer_tokens_per_s(model, steps: int) -> float | None:
    """transformers' LlamaForCausalLM with our weights: tokens/s of full training steps."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    cfg = model.config.to_hf()
    cfg.pop("architectures")
    hf = LlamaForCausalLM(LlamaConfig(**cfg))
    state = {
        ("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
        for k, v in model.network.state_dict().items()
    }
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = hf(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # first step warms up
    return BATCH * SEQ / times[len(times) // 2]


def ours_step_tokens_per_s(model, steps: int) -> float:
    """Our network in the same bare loop as the peer (forward, loss, backward, AdamW step, no
    evaluation or clipping): the like-for-like figure beside ``hf_peer_tokens_per_s``."""
    import copy

    import torch.nn.functional as F

    net = copy.deepcopy(model.network).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x = torch.randint(0, model.config.vocab_size, (BATCH, SEQ + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        logits = net(x[:, :-1])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:-1].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # first step warms up
    return BATCH * SEQ / times[len(times) // 2]


def torchrun_tokens_per_s(out: Path, steps: int) -> dict | None:
    """The student, 2 processes under torchrun (gloo), CE-only; tokens/s over all processes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        return None
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "-m",
        "pocketlm.cli",
        "distill",
        "--teacher",
        "smollm2-135m-instruct",
        "--student",
        "from-teacher:10",
        "--data",
        str(CSV),
        "--kd-weight",
        "0",
        "--steps",
        str(steps),
        "--seq-len",
        str(SEQ),
        "--batch-size",
        str(BATCH),
        "--eval-every",
        "0",
        "--eval-rows",
        "1",
        "--checkpoint-every",
        "0",
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd,
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if r.returncode:
        print(r.stderr[-2000:])
        return None
    log = json.loads((out / "train_log.json").read_text())
    return {"tokens_per_s": log["tokens_per_s"], "wall_s": time.perf_counter() - t0}


def study_settings(steps: int, rows: int, lr: float, eval_every: int, eval_rows: int):
    """The student study's training settings: 10% warm-up, no checkpoints, seed 0."""
    return TrainSettings(
        steps=steps,
        batch_size=rows,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        eval_every=eval_every,
        eval_rows=eval_rows,
        checkpoint_every=0,
        seed=0,
    )


def students_study(a, say) -> None:
    """Priority bar: KD vs CE-only vs random init for a 10-of-30-layer student, same budget.

    The teacher is first corrected on the domain (full fine-tune on the first
    --correct-tokens of the students' own training rows; Minitron's "teacher correction"),
    its top-k log-probs are cached once, and the three students train on the same rows in the
    same order with the same settings; only the objective (KD or CE) or the init differs.
    Held-out perplexity is measured every budget/8 tokens on the first --eval-rows held-out
    rows; the last point is the table's figure. Nothing here is chosen by
    looking at the held-out figures: the settings were fixed before the run.
    """
    rows = a.student_batch
    steps = math.ceil(a.student_tokens / (rows * SEQ))
    budget = steps * rows * SEQ
    c_steps = math.ceil(a.correct_tokens / (rows * SEQ))
    work = Path(tempfile.mkdtemp(prefix="bench-students-"))
    teacher = pocketlm.load("smollm2-135m-instruct")
    data = load_data(
        CSV, teacher.tokenizer, seq_len=SEQ, format="instruction", held_out=0.1, split_seed=0
    )
    held = data.held_out.head(a.eval_rows)  # the curves and the final figures
    st_data = Data(data.train.head(steps * rows), held, data.info)
    fig: dict = {
        "settings": {
            "student_tokens_per_run": budget,
            "student_steps": steps,
            "batch_rows": rows,
            "seq_len": SEQ,
            "lr": a.student_lr,
            "warmup_steps": max(1, steps // 10),
            "cosine_floor_ratio": 0.1,
            "kd_loss": "forward",
            "kd_weight": a.kd_weight,
            "temperature": 1.0,
            "top_k": a.top_k,
            "teacher_correction_tokens": c_steps * rows * SEQ,
            "teacher_correction_lr": 1e-4,
            "student": "from-teacher:10 (of 30 layers)",
            "random_student": RANDOM_SPEC,
            "split_seed": 0,
            "held_out_fraction": 0.1,
            "eval_rows": len(held),
            "eval_target_tokens": held.n_targets,
            "held_out_rows_available": len(data.held_out),
            "threads": torch.get_num_threads(),
            "nice": os.nice(0),
            "train_seed": 0,
        },
        "data": data.info,
        "load_average_start": os.getloadavg(),
    }
    say("students study:", fig["settings"])

    def settings(steps: int, lr: float, eval_every: int) -> TrainSettings:
        return study_settings(steps, rows, lr, eval_every, a.eval_rows)

    fig["teacher_domain_ppl"] = ppl(teacher.network, held)
    say("teacher held-out ppl", fig["teacher_domain_ppl"])
    corrected = finetune(
        pocketlm.load("smollm2-135m-instruct"),
        Data(data.train.head(c_steps * rows), held, data.info),
        work / "teacher-corrected",
        settings(c_steps, 1e-4, 0),
        eval_before=False,
    )
    fig["corrected_teacher_domain_ppl"] = ppl(corrected.network, held)
    fig["teacher_correction_seconds"] = corrected.train_result.seconds
    say("corrected teacher held-out ppl", fig["corrected_teacher_domain_ppl"])

    cache = work / "teacher_cache.safetensors"
    for name, spec, w in (
        ("kd", "from-teacher:10", a.kd_weight),
        ("ce", "from-teacher:10", 0.0),
        ("random_ce", RANDOM_SPEC, 0.0),
    ):
        st = make_student(spec, teacher, seed=0)
        t0 = time.perf_counter()
        st = distill(
            corrected,
            st,
            st_data,
            work / f"st-{name}",
            settings(steps, a.student_lr, max(1, steps // 8)),
            loss="forward",
            kd_weight=w,
            temperature=1.0,
            top_k=a.top_k if w else 0,
            cache_path=cache,
            eval_before=False,
        )
        r = st.train_result
        fig[name] = {
            "init": spec,
            "kd_weight": w,
            "domain_ppl": r.final["held_out_perplexity"],
            "curve_tokens_ppl": [(e["tokens"], e["perplexity"]) for e in r.evals],
            "train_ce_curve": [(h["tokens"], round(h["ce"], 4)) for h in r.history],
            "train_tokens_per_s": r.tokens_per_s,
            "train_seconds": r.seconds,
            "wall_s_with_cache": time.perf_counter() - t0,
            "load_average_after": os.getloadavg(),
        }
        say(name, {k: v for k, v in fig[name].items() if k != "train_ce_curve"})
    if cache.exists():
        fig["teacher_cache_bytes"] = cache.stat().st_size
    if a.quick:  # a check that the script runs: keep the measured plot and figures
        return
    plot_students(fig, REPO / "bench" / "results" / "train_students.png")
    previous = json.loads((REPO / "bench" / "results" / "train.json").read_text())
    previous.pop("machine", None)
    if "students" in previous:  # an earlier study, kept under a name that says how it differed
        old = previous.pop("students")
        ct = old["settings"].get("teacher_correction_tokens", 0) // 1024
        previous[f"students_teacher_{ct}k_superseded"] = old
    previous.pop("teacher_cache_bytes", None)
    previous["students"] = fig
    write_results("train", previous)
    report_students(fig)


def stronger_teacher_kd(a, say) -> None:
    """Follow-up to the student study (run after it, --phases students-teacher): the KD
    student again, with the teacher corrected on --correct-tokens of the same rows instead of
    the study's; every other setting is read from the study in train.json. Its curve and table
    row are added to the study's."""
    results = json.loads((REPO / "bench" / "results" / "train.json").read_text())
    fig = results["students"]
    s0 = fig["settings"]
    rows, steps = s0["batch_rows"], s0["student_steps"]
    c_steps = math.ceil(a.correct_tokens / (rows * SEQ))
    work = Path(tempfile.mkdtemp(prefix="bench-students-teacher-"))
    teacher = pocketlm.load("smollm2-135m-instruct")
    data = load_data(
        CSV, teacher.tokenizer, seq_len=SEQ, format="instruction", held_out=0.1, split_seed=0
    )
    held = data.held_out.head(s0["eval_rows"])
    st_data = Data(data.train.head(steps * rows), held, data.info)

    def settings(n: int, lr: float, eval_every: int) -> TrainSettings:
        return study_settings(n, rows, lr, eval_every, s0["eval_rows"])

    t0 = time.perf_counter()
    corrected = finetune(
        pocketlm.load("smollm2-135m-instruct"),
        Data(data.train.head(c_steps * rows), held, data.info),
        work / "teacher-corrected",
        settings(c_steps, s0["teacher_correction_lr"], 0),
        eval_before=False,
    )
    out = {
        "teacher_correction_tokens": c_steps * rows * SEQ,
        "teacher_correction_seconds": corrected.train_result.seconds,
        "corrected_teacher_domain_ppl": ppl(corrected.network, held),
    }
    say("corrected teacher", out)
    st = distill(
        corrected,
        make_student("from-teacher:10", teacher, seed=0),
        st_data,
        work / "st-kd",
        settings(steps, s0["lr"], max(1, steps // 8)),
        loss=s0["kd_loss"],
        kd_weight=s0["kd_weight"],
        temperature=s0["temperature"],
        top_k=s0["top_k"],
        cache_path=work / "teacher_cache.safetensors",
        eval_before=False,
    )
    r = st.train_result
    out.update(
        {
            "init": "from-teacher:10",
            "kd_weight": s0["kd_weight"],
            "domain_ppl": r.final["held_out_perplexity"],
            "curve_tokens_ppl": [(e["tokens"], e["perplexity"]) for e in r.evals],
            "train_ce_curve": [(h["tokens"], round(h["ce"], 4)) for h in r.history],
            "train_tokens_per_s": r.tokens_per_s,
            "wall_s": time.perf_counter() - t0,
            "load_average_after": os.getloadavg(),
        }
    )
    key = f"kd_teacher_{out['teacher_correction_tokens'] // 1024}k"
    fig[key] = out
    say(key, {k: v for k, v in out.items() if k != "train_ce_curve"})
    plot_students(fig, REPO / "bench" / "results" / "train_students.png")
    results.pop("machine", None)
    write_results("train", results)
    ce = fig["ce"]["domain_ppl"]
    append_section(
        "Distill: KD with a more corrected teacher (bench/train.py --phases students-teacher)",
        (
            f"Follow-up to the section above, after its KD student ended at its teacher's "
            f"perplexity ({fig['kd']['domain_ppl']:.3f} vs {fig['corrected_teacher_domain_ppl']:.3f})"
            f" while CE only went below it ({ce:.3f}). The teacher is now corrected on "
            f"{out['teacher_correction_tokens']:,} tokens of the same rows (was "
            f"{s0['teacher_correction_tokens']:,}): held-out ppl "
            f"{out['corrected_teacher_domain_ppl']:.3f}. KD student, every other setting as "
            f"above ({s0['student_tokens_per_run']:,} tokens): held-out ppl "
            f"{out['domain_ppl']:.3f} vs CE only {ce:.3f} "
            f"({100 * (out['domain_ppl'] / ce - 1):+.1f}%). Curve (ppl every "
            f"{s0['student_tokens_per_run'] // 8:,} tokens): "
            + " / ".join(f"{p:.2f}" for _, p in out["curve_tokens_ppl"])
            + ". Same 64 held-out rows; this is the second and last KD configuration tried."
        ),
    )


def confirm_students(a, say) -> None:
    """Re-score a finished student study (--phases students-confirm --students-dir DIR, the
    study's work folder) on the held-out rows it never looked at: every held-out row after the
    first --eval-rows, which drew the curves and on which earlier KD configurations were
    compared. Adds ``students.rest_of_held_out`` to train.json and a section to BENCHMARKS.md."""
    work = Path(a.students_dir)
    results = json.loads((REPO / "bench" / "results" / "train.json").read_text())
    fig = results["students"]
    s0 = fig["settings"]
    teacher = pocketlm.load("smollm2-135m-instruct")
    data = load_data(
        CSV, teacher.tokenizer, seq_len=SEQ, format="instruction", held_out=0.1, split_seed=0
    )
    rest = Blocks(data.held_out.tokens[s0["eval_rows"]:], data.held_out.mask[s0["eval_rows"]:])
    out: dict = {"rows": len(rest), "target_tokens": rest.n_targets,
                 "first_row": s0["eval_rows"], "ppl": {}}
    models = {"teacher": teacher, "corrected_teacher": work / "teacher-corrected",
              "kd": work / "st-kd", "ce": work / "st-ce", "random_ce": work / "st-random_ce"}
    for name, m in models.items():
        m = m if not isinstance(m, Path) else pocketlm.load(str(m))
        out["ppl"][name] = ppl(m.network, rest)
        say(name, out["ppl"][name])
    fig["rest_of_held_out"] = out
    results.pop("machine", None)
    write_results("train", results)
    p = out["ppl"]
    append_section(
        "Distill: the students on the held-out rows the study never looked at "
        "(bench/train.py --phases students-confirm)",
        (
            f"The study above drew its curves on the first {s0['eval_rows']} held-out rows, and "
            "three KD configurations have now been compared on them (teachers corrected on 8k, "
            "16k and 64k tokens), so those rows are no longer clean for the verdict. The same "
            f"saved models, scored once on the other {out['rows']} held-out rows "
            f"({out['target_tokens']:,} response tokens), never used for any choice:\n\n"
            + markdown_table(
                ["model", "held-out ppl (rows " + f"{out['first_row']}+)"],
                [[k, v] for k, v in p.items()],
            )
            + f"\n\nKD vs CE only: {p['kd']:.3f} vs {p['ce']:.3f} "
            f"({100 * (p['kd'] / p['ce'] - 1):+.1f}%); from-teacher vs random init (CE only): "
            f"{p['ce']:.3f} vs {p['random_ce']:.3f}."
        ),
    )


RANDOM_SPEC = "layers=10,dim=576,heads=9,kv_heads=3,hidden=1536"


def plot_students(fig: dict, path: Path) -> None:
    """Held-out perplexity along the run for each student in ``fig``, teachers as lines; and
    the training cross-entropy per step where the study recorded it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = fig["settings"]["student_tokens_per_run"]
    labels = {
        "kd": f"KD (from-teacher:10, kd_weight {fig['kd']['kd_weight']})",
        "ce": "CE only (from-teacher:10)",
        "random_ce": "CE only (random init)",
    }
    for key, v in fig.items():
        if key.startswith("kd_teacher_"):
            labels[key] = f"KD, teacher corrected on {v['teacher_correction_tokens']:,} tokens"
    f, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(labels):
        r = fig[name]
        left.plot(*zip(*r["curve_tokens_ppl"]), marker="o", color=f"C{i}", label=labels[name])
        if r.get("train_ce_curve"):
            right.plot(
                *zip(*r["train_ce_curve"]), color=f"C{i}", lw=0.8, alpha=0.7, label=labels[name]
            )
    lines = [
        (fig["teacher_domain_ppl"], "teacher (30 layers)", ":"),
        (
            fig["corrected_teacher_domain_ppl"],
            f"teacher corrected on {fig['settings']['teacher_correction_tokens']:,} tokens",
            "--",
        ),
    ]
    for key, v in fig.items():
        if key.startswith("kd_teacher_"):
            lines.append(
                (
                    v["corrected_teacher_domain_ppl"],
                    f"teacher corrected on {v['teacher_correction_tokens']:,} tokens",
                    "-.",
                )
            )
    for y, lab, ls in lines:
        left.axhline(y, color="gray", ls=ls, lw=1, label=f"{lab}: {y:.2f}")
    left.set_yscale("log")
    left.set_xlabel("training tokens")
    left.set_ylabel(f"held-out perplexity ({fig['settings']['eval_rows']} rows)")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=7)
    right.set_ylim(top=min(8.0, right.get_ylim()[1]))
    right.set_xlabel("training tokens")
    right.set_ylabel("training cross-entropy (nats/token)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    f.suptitle(f"10-of-30-layer students on bitext-customer-support, {budget:,} tokens each")
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def report_students(fig: dict) -> None:
    s = fig["settings"]
    rows = [
        ["teacher (30 layers)", "", "", fig["teacher_domain_ppl"], "", ""],
        [
            "teacher after correction",
            "full fine-tune",
            f"{s['teacher_correction_tokens']:,}",
            fig["corrected_teacher_domain_ppl"],
            "",
            "",
        ],
    ]
    for name, label in (
        ("kd", "student, KD"),
        ("ce", "student, CE only"),
        ("random_ce", "student, CE only, random init"),
    ):
        r = fig[name]
        rows.append(
            [
                label,
                r["init"],
                f"{s['student_tokens_per_run']:,}",
                r["domain_ppl"],
                " / ".join(f"{p:.1f}" for _, p in r["curve_tokens_ppl"]),
                r["train_tokens_per_s"],
            ]
        )
    kd, ce, rnd = (fig[k]["domain_ppl"] for k in ("kd", "ce", "random_ce"))
    intro = (
        f"Same budget for every student: {s['student_tokens_per_run']:,} tokens "
        f"({s['student_steps']} steps x {s['batch_rows']} rows x {s['seq_len']} tokens, the same "
        f"rows in the same order), AdamW lr {s['lr']}, {s['warmup_steps']} warm-up steps, cosine "
        f"to {s['cosine_floor_ratio']} x. KD: forward KL at T = {s['temperature']} against the "
        f"teacher's cached top-{s['top_k']} log-probs, weight {s['kd_weight']} (+ "
        f"{1 - s['kd_weight']:.1f} x CE). The teacher is first corrected on the domain (Minitron's "
        f"teacher correction): a full fine-tune on the first "
        f"{s['teacher_correction_tokens']:,} tokens of the same training rows, lr "
        f"{s['teacher_correction_lr']}. Held-out = the first {s['eval_rows']} of the "
        f"{s['held_out_rows_available']} held-out rows ({s['eval_target_tokens']:,} response "
        "tokens; split seed 0), measured every budget/8 tokens (the curve column). "
        f"{s['threads']} thread, `nice {s['nice']}`, shared machine (load average "
        f"{fig['load_average_start'][0]:.1f} at the start), so tokens/s are not quiet-machine "
        "figures."
    )
    outcome = (
        f"KD vs CE only: {kd:.3f} vs {ce:.3f} ({100 * (kd / ce - 1):+.1f}%). From-teacher vs "
        f"random init (CE only): {ce:.3f} vs {rnd:.3f} ({100 * (ce / rnd - 1):+.1f}%). Curves: "
        "`bench/results/train_students.png`; figures: `bench/results/train.json` (`students`)."
    )
    body = [
        intro,
        "",
        markdown_table(
            ["model", "init", "train tokens", "held-out ppl", "curve (ppl)", "train tokens/s"],
            rows,
        ),
        "",
        outcome,
    ]
    append_section(
        f"Distill: students at {s['student_tokens_per_run']:,} tokens "
        "(bench/train.py --phases students)",
        "\n".join(body),
    )
    print("\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="fine-tuning tokens per run")
    ap.add_argument("--student-tokens", type=int, default=65_536, help="student tokens per run")
    ap.add_argument("--student-batch", type=int, default=4, help="student rows per step")
    ap.add_argument("--student-lr", type=float, default=5e-4)
    ap.add_argument(
        "--correct-tokens", type=int, default=8192, help="teacher correction (fine-tune) tokens"
    )
    ap.add_argument("--eval-rows", type=int, default=4, help="held-out rows per evaluation")
    ap.add_argument("--wiki-windows", type=int, default=4, help="WikiText-2 windows of SEQ tokens")
    ap.add_argument("--kd-weight", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--phases",
        default="lora,full,throughput",
        help="which parts to run, in this order; 'students' alone runs the student study",
    )
    ap.add_argument(
        "--limit-min",
        type=float,
        default=0,
        help="skip the phases not started after this many minutes (0 = no limit)",
    )
    ap.add_argument(
        "--students-dir", default="", help="with --phases students-confirm: the study's work folder"
    )
    ap.add_argument("--quick", action="store_true", help="tiny budgets: check the script runs")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.student_tokens, a.eval_rows, a.wiki_windows = BATCH * SEQ, BATCH * SEQ, 2, 1
    t_zero = time.perf_counter()

    def say(*args):  # timestamped progress lines
        print(f"[{time.perf_counter() - t_zero:7.1f}s]", *args, flush=True)

    pocketlm.set_threads(int(os.environ.get("POCKETLM_THREADS", "0")) or None)
    if a.phases == "students-confirm":
        confirm_students(a, say)
        return
    if a.phases == "students-teacher":
        stronger_teacher_kd(a, say)
        return
    if a.phases == "students":
        if a.quick:
            a.student_tokens, a.correct_tokens, a.eval_rows = 4 * SEQ * 2, 4 * SEQ, 2
        students_study(a, say)
        return
    ft_steps = math.ceil(a.tokens / (BATCH * SEQ))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    figures: dict = {
        "settings": {
            "finetune_tokens_per_run": ft_steps * BATCH * SEQ,
            "finetune_steps": ft_steps,
            "batch_rows": BATCH,
            "seq_len": SEQ,
            "split_seed": 0,
            "held_out_fraction": 0.1,
            "eval_rows": a.eval_rows,
            "wikitext2_windows": a.wiki_windows,
            "threads": torch.get_num_threads(),
            "lora": "rank 16, alpha 32, q,k,v,o,gate,up,down",
            "train_seed": 0,
            "nice": os.nice(0),
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "phases_requested": a.phases,
        },
        "phases_done": [],
        "phases_skipped": [],
    }

    def save_partial():  # keeps the student study's figures (--phases students)
        figures["wall_s"] = time.perf_counter() - t_zero
        students = read_results("train", "students")
        write_results("train", {**figures, **({"students": students} if students else {})})

    teacher = pocketlm.load("smollm2-135m-instruct")
    data = load_data(
        CSV, teacher.tokenizer, seq_len=SEQ, format="instruction", held_out=0.1, split_seed=0
    )
    figures["data"] = data.info
    held = data.held_out.head(a.eval_rows)
    # only the rows the budget reaches
    ft_data = Data(data.train.head(ft_steps * BATCH), held, data.info)
    wiki = wikitext_windows(teacher.tokenizer, a.wiki_windows)
    figures["settings"]["held_out_target_tokens"] = held.n_targets

    def settings(lr: float, steps: int) -> TrainSettings:
        return TrainSettings(
            steps=steps,
            batch_size=BATCH,
            lr=lr,
            warmup_steps=max(1, steps // 10),
            eval_every=max(1, steps // 2),
            eval_rows=a.eval_rows,
            checkpoint_every=0,
            seed=0,
        )

    base_domain = ppl(teacher.network, held)
    base_wiki = ppl(teacher.network, wiki) if "lora" in a.phases or "full" in a.phases else None
    figures["teacher"] = {"domain_ppl": base_domain, "wikitext2_ppl": base_wiki}
    say(f"teacher: domain held-out ppl {base_domain:.3f}, wikitext-2 ppl {base_wiki}")
    save_partial()
    runs, tp = {}, {}
    figures["train_tokens_per_s"] = tp

    def finetune_phase(name: str, kw: dict, lr: float) -> None:
        m = pocketlm.load("smollm2-135m-instruct")
        m = finetune(
            m, ft_data, work / f"ft-{name}", settings(lr, ft_steps), eval_before=False, **kw
        )
        r = m.train_result
        runs[f"teacher {name}"] = r
        tp[f"teacher_{name}"] = r.tokens_per_s
        dom, wk = ppl(m.network, held), ppl(m.network, wiki)
        figures[f"finetune_{name}"] = {
            "lr": lr,
            "domain_ppl_before": base_domain,
            "domain_ppl_after": dom,
            "domain_ppl_drop_pct": 100 * (1 - dom / base_domain),
            "wikitext2_ppl_before": base_wiki,
            "wikitext2_ppl_after": wk,
            "wikitext2_ppl_drift_pct": 100 * (wk / base_wiki - 1),
            "train_tokens_per_s": r.tokens_per_s,
            "seconds": r.seconds,
            "curve": [(e["tokens"], e["perplexity"]) for e in r.evals],
        }
        say(name, figures[f"finetune_{name}"])

    def throughput_phase() -> None:
        for _ in range(2):  # A B A B; the last pair is kept
            ours = ours_step_tokens_per_s(teacher, steps=3)
            peer = hf_peer_tokens_per_s(teacher, steps=3)
        tp["ours_teacher_full_bare_step"] = ours
        if peer:
            tp["peer_transformers_teacher_full"] = peer
        say("ours (bare step)", ours, "peer", peer)
        save_partial()
        tr = torchrun_tokens_per_s(work / "ddp", steps=3)
        if tr:
            tp["student_torchrun_2proc"] = tr["tokens_per_s"]
        say("torchrun", tr)

    phases = {
        "lora": lambda: finetune_phase("lora", {"lora_rank": 16, "merge": True}, 1e-3),
        "full": lambda: finetune_phase("full", {}, 1e-4),
        "throughput": throughput_phase,
    }
    for name in a.phases.split(","):
        if a.limit_min and time.perf_counter() - t_zero > 60 * a.limit_min:
            figures["phases_skipped"].append(name)
            say(f"skipping {name}: past --limit-min {a.limit_min}")
            continue
        phases[name]()
        figures["phases_done"].append(name)
        save_partial()
    report(figures, a, ft_steps, held.n_targets)


def report(figures: dict, a, ft_steps: int, held_targets: int) -> None:
    tp, t = figures["train_tokens_per_s"], figures["teacher"]
    body = [
        f"{figures['settings']['threads']} thread(s), `nice {figures['settings']['nice']}`, load "
        f"average {figures['settings'].get('load_average_at_start', '?')} at the start. Budgets: fine-tuning "
        f"{ft_steps * BATCH * SEQ:,} tokens per run ({BATCH} rows x {SEQ} tokens per step). Domain = bitext-customer-support, "
        f"90/10 split by seed 0; held-out perplexity on the responses of the first "
        f"{a.eval_rows} held-out rows ({held_targets} target tokens); WikiText-2 drift on "
        f"{a.wiki_windows} windows of {SEQ} tokens. Phases run: {', '.join(figures['phases_done'])}"
        + (
            f"; not run (time): {', '.join(figures['phases_skipped'])}"
            if figures["phases_skipped"]
            else ""
        )
        + ".",
        "",
    ]
    rows = []
    for name, label in (("lora", "teacher LoRA r16"), ("full", "teacher full")):
        f = figures.get(f"finetune_{name}")
        if f:
            rows.append(
                [
                    f"{label} (lr {f['lr']})",
                    f["domain_ppl_before"],
                    f["domain_ppl_after"],
                    f"{-f['domain_ppl_drop_pct']:+.1f}%",
                    f"{f['wikitext2_ppl_after']:.3f} ({f['wikitext2_ppl_drift_pct']:+.1f}%)",
                    f["train_tokens_per_s"],
                ]
            )
    body.append(
        markdown_table(
            [
                "run",
                "held-out ppl before",
                "after",
                "change",
                "WikiText-2 ppl after",
                "train tokens/s",
            ],
            rows,
        )
    )
    body += [
        "",
        (
            f"Teacher: domain held-out ppl {t['domain_ppl']:.3f}, WikiText-2 ppl "
            f"{t['wikitext2_ppl']}."
        ),
        "",
    ]
    if tp:
        body.append(
            markdown_table(["training throughput", "tokens/s"], [[k, v] for k, v in tp.items()])
        )
        body.append(
            "\nteacher_lora / teacher_full: whole `finetune` runs (warm-up step and held-out "
            "evaluations included). ours_teacher_full_bare_step and peer_transformers_teacher_full: "
            f"the median of bare training steps ({BATCH} x {SEQ} tokens: forward, loss, backward, "
            "AdamW), ours and transformers alternated in one process. student_torchrun_2proc: "
            "`torchrun --nproc-per-node 2`, one thread each."
        )
    append_section("Distill and fine-tune (bench/train.py)", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
