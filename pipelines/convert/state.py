"""Crash-safe bookkeeping for a resumable conversion.

Every output file is written under a temporary name (``<final>.tmp-<pid>``), fsynced, then
renamed; a rename is atomic on POSIX, so a final name always holds a complete file. A chunk's
*completion record* (``OUT/.convert/<split>/chunk-NNNNN.json``) is written the same way after
its outputs: the record is the commit point. After ``kill -9`` a rerun trusts only chunks with a
record, redoes the others (overwriting any files they had renamed), and deletes stray temps.

An exclusive ``flock`` on ``OUT/.convert/lock`` keeps two runs off one OUT; worker processes
inherit it, so a run cannot start while workers of a killed run are still alive.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from common.fileio import commit

STATE_DIR = ".convert"


class StateError(ValueError):
    """OUT holds a conversion that does not match this command; one-line message."""


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.write_bytes(data)
    commit(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_temps(out: Path) -> int:
    """Delete temporaries left by a killed run (call only while holding the lock)."""
    n = 0
    for root, _, files in os.walk(out):
        for f in files:
            if ".tmp-" in f:
                os.unlink(os.path.join(root, f))
                n += 1
    return n


class Lock:
    """Exclusive lock on OUT for the life of a run."""

    def __init__(self, out: Path):
        self.path = out / STATE_DIR / "lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StateError(f"another conversion is writing {self.path.parent.parent} "
                             "(or its workers are still exiting); wait for it or stop it") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def chunk_record_path(out: Path, split: str, chunk: int) -> Path:
    return out / STATE_DIR / split / f"chunk-{chunk:05d}.json"


def check_plan(out: Path, plan: dict) -> None:
    """Record what this OUT is being converted from and with; refuse to mix two different plans."""
    path = out / STATE_DIR / "plan.json"
    old = read_json(path)
    if old is None:
        write_json(path, plan)
        return
    if old != plan:
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise StateError(f"{out} holds a conversion with different {', '.join(diff)}; "
                         "rerun the original command to resume it, or use a new OUT / --overwrite")
