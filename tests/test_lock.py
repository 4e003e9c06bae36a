"""Output locks: a second writer is refused naming the first; a dead writer's lock is stale."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pocketlm.lock import OutputLocked, holder, is_stale, lock_path, output_lock

HOLD = textwrap.dedent("""
    import sys, time
    from pocketlm.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder_process(target):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "model"
    p = _holder_process(out)
    try:
        with pytest.raises(OutputLocked, match=f"pid {p.pid}") as e, output_lock(out):
            pass
        assert str(out) in str(e.value) and "another folder" in str(e.value)
        assert holder(out)["pid"] == p.pid
    finally:
        p.kill()
        p.wait()
    # the holder died without cleaning up: its file is stale and taken over at once
    assert lock_path(out).exists() and is_stale(out)
    with output_lock(out):
        assert holder(out)["pid"] != p.pid
    assert not lock_path(out).exists()


def test_stale_lock_file_from_a_dead_pid_does_not_block(tmp_path, caplog):
    out = tmp_path / "export.gguf"
    lock_path(out).write_text(json.dumps({"pid": 999999, "host": "x", "command": "old",
                                          "since": 0}))
    with caplog.at_level("WARNING"), output_lock(out):
        pass
    assert "stale" in caplog.text and "999999" in caplog.text
    assert not lock_path(out).exists()


def test_reentrant_within_one_process(tmp_path):
    out = tmp_path / "m"
    with output_lock(out):
        with output_lock(out):
            assert lock_path(out).exists()
        assert lock_path(out).exists()  # the outer hold is still there
    assert not lock_path(out).exists()


def test_two_model_saves_of_one_folder(tmp_path, tiny_model):
    out = tmp_path / "saved"
    p = _holder_process(out)
    try:
        with pytest.raises(OutputLocked, match=str(p.pid)):
            tiny_model.save(out)
    finally:
        p.kill()
        p.wait()
    tiny_model.save(out)
    assert (out / "config.json").is_file() and (out / "README.md").is_file()


def test_finetune_and_quantize_refuse_a_folder_in_use(tmp_path, tiny_model, capsys):
    from pocketlm.cli import main

    src = tiny_model.save(tmp_path / "src")
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"the cat {i} sat on the mat" for i in range(40)))
    out = tmp_path / "out"
    p = _holder_process(out)
    try:
        for argv in (["finetune", str(src), "--data", str(data), "--steps", "1", "-o", str(out)],
                     ["quantize", str(src), "--bits", "8", "-o", str(out)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"pid {p.pid}" in err and "being written" in err
        assert not out.exists()  # refused before anything was written
    finally:
        p.kill()
        p.wait()
