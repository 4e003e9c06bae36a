"""Training across processes: a run killed with SIGKILL resumes to the same weights, and
``torchrun --nproc-per-node 2`` (DDP on gloo) matches one process at the same global batch."""

from __future__ import annotations

import os
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


@pytest.mark.integration
def test_torchrun_two_processes_match_one_at_the_same_global_batch(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
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
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc-per-node",
            "2",
            "-m",
            "pocketlm.cli",
            *args,
            "-o",
            str(tmp_path / "ddp"),
        ],
        check=False,
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert_same_weights(tmp_path / "one", tmp_path / "ddp", atol=1e-5)
