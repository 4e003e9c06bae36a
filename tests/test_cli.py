"""The `pocketlm` command as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pocketlm.cli import build_parser, main
from pocketlm.engine.bench import peak_rss_bytes


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], capture_output=True,
                          text=True, input=input, timeout=300, check=False)


def test_help_teaches_every_sub_command(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ["pull", "list", "rm", "run", "chat", "bench"]:
        assert name in sub.choices
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description or p.format_usage(), name
        assert "usage:" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "pocketlm pull smollm2-135m-instruct" in capsys.readouterr().out


def test_run_streams_an_answer_from_a_saved_folder(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "tiny")
    r = run_cli("run", str(folder), "hello", "--temperature", "0", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    expected = tiny_model.chat([{"role": "user", "content": "hello"}], temperature=0, max_tokens=8)
    assert r.stdout == expected + "\n"
    raw = run_cli("run", str(folder), "hello", "--raw", "--temperature", "0", "--max-tokens", "8")
    assert raw.stdout == tiny_model.generate("hello", temperature=0, max_tokens=8) + "\n"


def test_bad_input_is_one_line_without_traceback(tmp_path, tiny_model):
    r = run_cli("run", "no-such-model", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown model 'no-such-model'")
    assert "Traceback" not in r.stderr
    folder = tiny_model.save(tmp_path / "tiny")
    r = run_cli("run", str(folder), "hi", "--temperature", "-1")
    assert r.returncode == 2 and "temperature must be >= 0" in r.stderr
    r = run_cli("run", str(folder), "hi", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p must be in (0, 1]" in r.stderr
    r = run_cli("run", str(folder), "word " * 300)
    assert r.returncode == 2 and "--truncate left" in r.stderr


def test_chat_keeps_history_resets_and_exits(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "tiny")
    session = "hi\n/reset\nhello again\n/exit\n"
    r = run_cli("chat", str(folder), "--temperature", "0", "--max-tokens", "4", input=session)
    assert r.returncode == 0, r.stderr
    assert "(history cleared)" in r.stdout
    r = run_cli("chat", str(folder), "--max-tokens", "4", input="hi\n")  # Ctrl-D after one turn
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_chat_says_when_the_conversation_outgrows_the_context(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "tiny")
    r = run_cli("chat", str(folder), "--max-tokens", "4", input="word " * 300 + "\n/exit\n")
    assert r.returncode == 0
    assert "no longer fits the 256-token context" in r.stdout


def test_bench_json_has_the_figures_scripts_read(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "tiny")
    r = run_cli("bench", str(folder), "--json", "--prompt-lengths", "16", "64", "--new-tokens", "8",
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ["decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s",
                "peak_rss_bytes", "weight_bytes", "threads"]:
        assert key in out
        assert out[key] > 0
    assert out["threads"] == 1
    assert out["weight_bytes"] == sum(p.numel() * 4 for p in tiny_model.network.parameters())
    assert out["decode_path"] in ("fused", "pytorch")


def test_list_known_names():
    r = run_cli("list", "--known")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout


def test_bench_table_prints_the_peak_memory(tmp_path, tiny_model):
    """The peak is the bench process's own, even when its parent holds far more (CI once
    reported 6 GB for a tiny model: ru_maxrss carries a forking parent's peak over exec)."""
    import torch

    folder = tiny_model.save(tmp_path / "tiny")
    ballast = torch.ones(2**30, dtype=torch.uint8)  # 1 GiB, touched: the parent's peak
    r = run_cli("bench", str(folder), "--prompt-lengths", "16", "--new-tokens", "4",
                "--threads", "1")
    del ballast
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[0]
    mib = int(line.split("peak RSS=")[1].split()[0])
    assert 50 < mib < peak_rss_bytes() / 2**20 - 512  # a whole Python + torch process holding a tiny model
