"""A run started in one folder, used from another: the tools resolve the recipe's relative data.root
against the working folder the run recorded (or name the paths they tried), and the exports are
written with the user's umask (they are for sharing), not private like safetensors makes them."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli import run_main
from tests.helpers.engine_runs import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_relative_data_root_resolves_against_the_runs_working_folder(fmnist_tree, tmp_path):
    from tools.evaluate import main as evaluate

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "fm").symlink_to(fmnist_tree)
    sets = [*TINY, "data.root=data/fm", "train.epochs=1"]
    cmd = [sys.executable, "-m", "engine.run", str(ROOT / "recipes" / "a3.toml"), "--out", "runs/tiny"] + \
        [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / "runs" / "tiny"
    engine_top1 = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_top1"]

    # exports: 0666 less the run's umask 022, as any file the user writes (safetensors alone makes 0600)
    for name in ("model.safetensors", "best.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name

    assert Path.cwd() != work and not Path("data/fm").exists()  # the tools run from another folder
    for weights in (run / "model.safetensors", sorted(run.glob("ckpt-*.pt"))[-1]):
        got = run_main(evaluate, [weights, "--json", tmp_path / "eval.json"])
        assert got.returncode == 0, got.stderr
        result = json.loads((tmp_path / "eval.json").read_text())
        assert result["data"] == str(work / "data" / "fm") and result["val_top1"] == engine_top1

    # the run's folder moved away: one line naming the paths tried
    work.rename(tmp_path / "moved")
    got = run_main(evaluate, [tmp_path / "moved" / "runs" / "tiny" / "model.safetensors"])
    assert got.returncode == 2 and got.stderr.count("\n") == 1, got.stderr
    assert f"tried {work / 'data' / 'fm'} or {Path.cwd() / 'data' / 'fm'}" in got.stderr, got.stderr
    assert "pass --data" in got.stderr
