"""Training across processes: a run killed with SIGKILL resumes to the same weights, and
``torchrun --nproc-per-node 2`` (DDP, or FSDP with --fsdp, on gloo) matches one process at the
same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_model

from pocketlm.cli import main

REPO = Path(__file__).resolve().parents[1]


def corpus(path: Path) -> Path:
    """Blank-line separated documents of varied length (deterministic)."""
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "it",
        "rained",
        "in",
        "the",
        "old",
        "town",
        "by",
        "the",
        "sea",
    ]
    docs = [
        " ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 11)) for i in range(120)
    ]
    path.write_text("\n\n".join(docs))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tmp_path):
    make_tiny_model().save(tmp_path / "tiny")
    data = corpus(tmp_path / "docs.txt")
    args = [
        "finetune",
        str(tmp_path / "tiny"),
        "--data",
        str(data),
        "--seq-len",
        "16",
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--eval-every",
        "0",
        "--eval-rows",
        "2",
        "--checkpoint-every",
        "4",
        "--threads",
        "1",
    ]

    proc = subprocess.Popen(
        [sys.executable, "-m", "pocketlm.cli", *args, "-o", str(tmp_path / "b")],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert last.exists() and not (tmp_path / "b" / "config.json").exists()  # killed mid-way
    step = torch.load(last, weights_only=False)["step"]
    assert 4 <= step < 24

    assert main([*args, "-o", str(tmp_path / "a")]) == 0  # uninterrupted
    assert main([*args, "-o", str(tmp_path / "b"), "--resume"]) == 0
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)


def two_process_args(tmp_path: Path) -> list[str]:
    """A 3-step finetune of the tiny model: 4 rows x 2 micro-batches per step."""
    make_tiny_model().save(tmp_path / "tiny")
    data = corpus(tmp_path / "docs.txt")
    return [
        "finetune",
        str(tmp_path / "tiny"),
        "--data",
        str(data),
        "--seq-len",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--eval-every",
        "0",
        "--eval-rows",
        "2",
        "--checkpoint-every",
        "0",
        "--threads",
        "1",
    ]


def torchrun(args: list[str]) -> None:
    """Run the CLI in 2 processes; fail with their stderr."""
    exe = Path(sys.executable).with_name("torchrun")
    if not exe.exists():
        pytest.skip("torchrun is not installed next to this python")
    r = subprocess.run(
        [str(exe), "--nproc-per-node", "2", "-m", "pocketlm.cli", *args],
        check=False,
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.integration
def test_torchrun_two_processes_match_one_at_the_same_global_batch(tmp_path):
    args = two_process_args(tmp_path)
    torchrun([*args, "-o", str(tmp_path / "ddp")])
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert_same_weights(tmp_path / "one", tmp_path / "ddp", atol=1e-5)


@pytest.mark.integration
def test_fsdp_two_processes_match_one_and_resume_from_a_sharded_run(tmp_path):
    args = two_process_args(tmp_path)
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    # FSDP, with a checkpoint at step 2 kept after the run
    fsdp = [*args, "--fsdp", "--checkpoint-every", "2", "--keep-checkpoint"]
    torchrun([*fsdp, "-o", str(tmp_path / "fsdp")])
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp", atol=1e-5)
    assert weights(tmp_path / "one").keys() == weights(tmp_path / "fsdp").keys()

    # a second FSDP run resumed from that step-2 checkpoint ends on the same weights
    saved = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 2 and saved["settings"]["fsdp"] is True
    assert all(not hasattr(t, "device_mesh") for t in saved["trainable"].values())  # full
    shutil.copytree(tmp_path / "fsdp" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    saved["history"][0]["loss"] = 123.0  # a mark that only a resumed run carries over
    torch.save(saved, tmp_path / "resumed" / "checkpoints" / "last.pt")
    torchrun([*fsdp, "--resume", "-o", str(tmp_path / "resumed")])
    history = json.loads((tmp_path / "resumed" / "train_log.json").read_text())["history"]
    assert [h["loss"] for h in history][:1] == [123.0] and len(history) == 3
    assert_same_weights(tmp_path / "fsdp", tmp_path / "resumed", atol=1e-6)


@pytest.mark.integration
def test_fsdp_trains_lora_adapters_like_one_process(tmp_path):
    # frozen base weights and trainable adapters share FSDP units
    args = [*two_process_args(tmp_path), "--lora", "4"]
    torchrun([*args, "--fsdp", "-o", str(tmp_path / "fsdp")])
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28  # A and B of 7 modules x 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
