"""One writer per output: a lock file beside each folder or file pocketlm writes.

``with output_lock("runs/quick"):`` creates ``runs/quick.lock`` holding the writer's pid, host,
command and start time, and takes an ``flock`` on it. A second process asking for the same
output fails at once with ``OutputLocked`` naming the holder. The kernel drops the ``flock``
when its holder dies (crash, ``kill -9``), so a lock file left behind is *stale*: the next
writer sees nobody holds it, logs whose it was and takes it over; no stale file ever blocks.
Within one process the lock is re-entrant (a recipe step holds its folder while the step's own
``Model.save`` locks it again).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pocketlm.errors import PocketError

log = logging.getLogger(__name__)


class OutputLocked(PocketError):
    """Another process is writing the same output folder or file."""


_held: dict[str, list] = {}  # lock path -> [fd, depth], this process's locks
_mutex = threading.Lock()


def lock_path(target: str | Path) -> Path:
    """``OUT`` -> ``OUT.lock`` beside it (outside it: exports rename a temp folder onto OUT)."""
    target = Path(target).expanduser().absolute()
    return target.with_name(target.name + ".lock")


def holder(target: str | Path) -> dict | None:
    """What the lock file says about its writer ({pid, host, command, since}), or None."""
    try:
        return json.loads(lock_path(target).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (its lock file is empty: it is starting)"
    since = time.strftime("%H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
    return f"pid {info.get('pid')}{where} (`{info.get('command', '?')}`, since {since})"


def acquire(target: str | Path) -> Path:
    """Take the lock of ``target``; returns the lock file. Raises OutputLocked if held."""
    path = lock_path(target)
    key = str(path)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputLocked(
                    f"{Path(target)} is being written by {_describe(holder(target))}; wait for "
                    f"it to finish or stop it, or write to another folder (lock: {path})"
                ) from None
            # The file we locked may have been unlinked by its previous holder meanwhile:
            # then the lock is on a dead inode, and we try again on the path's new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.read(fd, 4096)
        if old.strip():
            try:
                stale = json.loads(old)
            except json.JSONDecodeError:
                stale = None
            log.warning("taking over the stale lock %s of %s, which is no longer running",
                        path, _describe(stale))
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
                "since": time.time()}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        _held[key] = [fd, 1]
        return path


def release(target: str | Path) -> None:
    """Give back one hold of ``target``'s lock; the last one removes the lock file."""
    key = str(lock_path(target))
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        try:
            os.unlink(key)  # before closing: nobody can lock this inode and think it is live
        except FileNotFoundError:
            pass
        os.close(entry[0])


@contextmanager
def output_lock(target: str | Path):
    """Hold ``target``'s lock for the block (see the module docstring). Raises OutputLocked."""
    acquire(target)
    try:
        yield
    finally:
        release(target)


def is_stale(target: str | Path) -> bool:
    """Whether a lock file exists that no live process holds."""
    path = lock_path(target)
    if not path.exists() or str(path) in _held:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
