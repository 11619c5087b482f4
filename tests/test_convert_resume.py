"""Interrupting a conversion (kill -9 of the real CLI process, and Ctrl-C) and rerunning the same
command resumes it: the final outputs are byte-identical to an uninterrupted run's, so nothing
is duplicated or lost, and --verify passes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.convert_tree import TOOL, build_tree, manifest, run_tool

ARGS = ("--workers", "2", "--shard-size", "2", "--max-skip-frac", "0.5")
DELAY = {"RSB_CONVERT_TEST_DELAY": "0.08"}  # seconds per image, so there is time to interrupt


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    src = build_tree(base / "src", per_class=5, val_per_class=2)
    run_tool(src, base / "clean", *ARGS)
    return base, src


def _records(out: Path) -> int:
    return len(list((out / ".convert").glob("*/chunk-*.json")))


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TOOL), str(src), str(out), "--quiet", *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **DELAY})


def _interrupt_after(proc: subprocess.Popen, out: Path, records: int, sig: int) -> None:
    deadline = time.time() + 120
    while _records(out) < records:
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)


def _rerun(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Rerun; a killed run's workers get SIGKILL from the kernel when their parent dies, but may take a
    moment to exit and release the lock, which the tool reports as a user error (exit 2)."""
    for _ in range(50):
        proc = run_tool(src, out, *ARGS, *extra, check=False)
        if not (proc.returncode == 2 and "another conversion" in proc.stderr):
            return proc
        time.sleep(0.1)
    return proc


def _outputs(out: Path) -> dict:
    m = manifest(out)
    return {name: (s["images"], s["labels_sha256"], s["class_counts"], s["ffcv"]["sha256"], s["items"],
                   [(sh["path"], sh["sha256"], sh["index_sha256"]) for sh in s["shards"]], s["skipped"])
            for name, s in m["splits"].items()}


def test_kill_9_twice_then_resume_gives_identical_outputs(clean):
    base, src = clean
    out = base / "killed"
    total_chunks = sum(-(-(s["images"] + len(s["skipped"])) // 2) for s in manifest(base / "clean")["splits"].values())

    proc = _start(src, out)
    _interrupt_after(proc, out, 2, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    first = _records(out)
    assert 2 <= first < total_chunks and not (out / "manifest.json").exists()

    # second run, killed again further on; it must not redo the committed chunks
    proc = _start(src, out)
    _interrupt_after(proc, out, first + 3, signal.SIGKILL)
    assert not (out / "manifest.json").exists()

    final = _rerun(src, out, "--verify")
    assert final.returncode == 0, final.stderr
    assert "resuming:" in final.stdout and "verify: ok" in final.stdout
    assert _outputs(out) == _outputs(base / "clean")
    assert not list(out.rglob("*.tmp-*"))


def test_ctrl_c_exits_130_and_resumes(clean):
    base, src = clean
    out = base / "ctrl_c"
    proc = _start(src, out)
    _interrupt_after(proc, out, 1, signal.SIGINT)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    final = _rerun(src, out)
    assert final.returncode == 0, final.stderr
    assert _outputs(out) == _outputs(base / "clean")
