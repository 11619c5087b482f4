"""tools/sweep.py end to end on CPU: a 2 x 2 grid runs, a rerun launches nothing, the tables are
sorted and agree with the engine's own metrics.jsonl, seed means/stds agree with Python's statistics
module; a converter-made subset; resume of an unfinished trial; one-line user errors before anything
is launched. The Slurm executor runs against a real cluster in tests/test_slurm.py."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.sweep.plan import SweepError, TrialSpec, configurations, plan, read_sweep
from workflows.sweep.run import pending, read_trial, run_trial

ROOT = Path(__file__).resolve().parents[1]

from tests.helpers.sweeps import FIXED, toml_value  # noqa: E402  (the tiny trial recipe)


def write_sweep(path: Path, root: Path | None, body: str, fixed: dict | None = None, budget: str = "max_steps = 2") -> Path:
    sets = {**FIXED, **({"data.root": str(root)} if root else {}), **(fixed or {})}
    sets = {k: v for k, v in sets.items() if v is not None}
    # body first: its top-level keys (seeds) must come before any table header
    lines = [f'base = "{ROOT / "recipes" / "a3.toml"}"', body, "[budget]", budget, "[set]"]
    lines += [f'"{k}" = {toml_value(v)}' for k, v in sets.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def last_eval(folder: Path) -> dict:
    recs = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "val_top1" in r][-1]


GRID = 'seeds = [0, 1]\n[grid]\n"optim.lr" = [0.001, 0.05]\n[run]\nparallel = 2\n'


def test_grid_sweep_runs_then_rerun_launches_nothing(fmnist_tree, tmp_path):
    spec = write_sweep(tmp_path / "lr.toml", fmnist_tree, GRID)
    out = tmp_path / "out"
    proc = sweep(str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4
    records = [read_trial(t) for t in trials]
    assert all(r["status"] == "done" and r["launches"] == 1 for r in records)
    assert sorted((r["swept"]["optim.lr"], r["seed"]) for r in records) == [(0.001, 0), (0.001, 1), (0.05, 0), (0.05, 1)]
    for t, r in zip(trials, records):  # each trial ran the command it claims, with its own seed
        cmd = r["command"]
        assert f"optim.lr={r['swept']['optim.lr']!r}" in cmd and f"train.seed={r['seed']}" in cmd
        assert cmd[cmd.index("--max-steps") + 1] == "2" and last_eval(t)["step"] == 2

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    order = [(-float(r["val_top1"]), float(r["val_loss"])) for r in rows]
    assert order == sorted(order)  # best top-1 first; ties broken by the lower val loss
    for r in rows:  # the table's numbers are the engine's final eval records, not recomputed ones
        engine = last_eval(Path(r["folder"]))
        assert float(r["val_top1"]) == engine["val_top1"] and float(r["val_loss"]) == engine["val_loss"]

    md = (out / "results.md").read_text()
    assert "| optim.lr | seed | val top-1 |" in md and "| optim.lr | n | mean top-1 | std top-1 |" in md
    table = md.split("## Trials")[1].split("## Seed")[0]
    md_top1 = [float(ln.split("|")[3]) for ln in table.splitlines() if ln.startswith("| 0.")]
    assert md_top1 == sorted(md_top1, reverse=True) and len(md_top1) == 4
    for lr in ("0.001", "0.05"):
        vals = [float(r["val_top1"]) for r in rows if r["optim.lr"] == lr]
        line = next(ln for ln in md.split("## Seed")[1].splitlines() if ln.startswith(f"| {lr} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2/2"
        assert math.isclose(float(cells[2]), statistics.fmean(vals), abs_tol=0.006)
        assert math.isclose(float(cells[3]), statistics.stdev(vals), abs_tol=0.006)
        top5 = [float(r["val_top5"]) for r in rows if r["optim.lr"] == lr]
        assert math.isclose(float(cells[4]), statistics.fmean(top5), abs_tol=0.006)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep.toml").read_text() == spec.read_text()

    stamps = {t: (t / "metrics.jsonl").stat().st_mtime_ns for t in trials}
    again = sweep(str(spec), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all 4 trials are done" in again.stdout
    assert {t: (t / "metrics.jsonl").stat().st_mtime_ns for t in trials} == stamps
    assert all(read_trial(t)["launches"] == 1 for t in trials)
    with (out / "results.csv").open() as f:
        assert [r["trial"] for r in csv.DictReader(f)] == [r["trial"] for r in rows]


def test_subset_from_the_converter_and_resume_of_an_unfinished_trial(fmnist_tree, tmp_path):
    pytest.importorskip("nvidia.dali")
    body = ('[budget.subset]\nsrc = "%s"\nclasses = ["c0", "c3"]\nlimit_per_class = 8\nformats = ["dali"]\n'
            '[grid]\n"optim.lr" = [0.01]\n' % (fmnist_tree / ""))
    fixed = {"data.pipeline": "dali", "data.num_classes": None, "data.workers": 1, "train.global_batch_size": 8, "eval.batch_size": 16}
    spec = write_sweep(tmp_path / "subset.toml", None, body, fixed, budget="epochs = 1")
    out = tmp_path / "out"
    proc = sweep(str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (subset,) = out.glob("subset-*")
    manifest = json.loads((subset / "manifest.json").read_text())
    assert manifest["splits"]["train"]["classes"] == ["c0", "c3"] and manifest["splits"]["train"]["images"] == 16
    (trial,) = (out / "trials").iterdir()
    record = read_trial(trial)
    assert f"data.root={subset.resolve()}" in record["command"] and "data.num_classes=2" in record["command"]
    assert last_eval(trial)["val_images"] == 16  # 8 val images of each of the 2 classes
    # an unfinished trial (e.g. the sweep was killed after the run's last checkpoint) is relaunched
    # with --resume auto and not trained again from scratch
    record["status"] = "interrupted"
    (trial / "trial.json").write_text(json.dumps(record))
    again = sweep(str(spec), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    record = read_trial(trial)
    assert record["status"] == "done" and record["launches"] == 2 and record["command"][-2:] == ["--resume", "auto"]
    # the run itself had finished (only the sweep's record said otherwise): it continues from its last
    # checkpoint, finds nothing left to train, and is not trained again from scratch
    assert f"the run in {trial} is finished" in (trial / "log.txt").read_text()


def test_a_failing_trial_is_recorded_and_stays_pending(tmp_path):
    spec = TrialSpec(name="bad", folder=str(tmp_path / "bad"), base=str(ROOT / "recipes" / "a3.toml"), cwd=str(ROOT),
                     swept={}, seed=0, overrides=("data.root=/nonexistent/data", "data.pipeline=reference"),
                     max_steps=1)
    record = run_trial(spec)
    assert record["status"] == "failed" and record["returncode"] == 2 and record["metrics"] is None
    assert record["error"].startswith("error: data.root /nonexistent/data does not exist")
    assert pending([spec]) == [spec]


@pytest.mark.parametrize("body,message", [
    ('seed = [0]\n', "unknown key seed; did you mean seeds?"),
    ('[grid]\n"optim.lrr" = [0.1]\n', "unknown key optim.lrr; did you mean optim.lr?"),
    ('[grid]\n"optim.lr" = ["fast"]\n', "optim.lr=fast: expected float"),
    ('[grid]\n"optim.lr" = [0.1]\n[random]\n"optim.weight_decay" = [0.1]\n', "use [grid] or [random], not both"),
    ('[grid]\n"train.seed" = [1, 2]\n', "train.seed is set by seeds"),
    ('[run]\nexecutor = "pbs"\n', "executor = 'pbs' is not one of local, slurm"),
    ('[run]\nexecutor = "slurm"\n[run.slurm]\ntimeout_min = 60\n', "unknown key [run.slurm] timeout_min; did you mean time?"),
    ('[random]\n"optim.lr" = {low = 0.0, high = 0.1, log = true}\n', "log = true needs low > 0"),
    ('[budget.subset]\nsrc = "."\nlimit_per_class = 4\n', "needs data.pipeline = ffcv or dali"),
])
def test_user_errors_are_one_line_and_launch_nothing(tmp_path, capsys, body, message):
    from tools.sweep import main

    spec = write_sweep(tmp_path / "bad.toml", None if "subset" in body else tmp_path, body)
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (out / "trials").exists()


def test_missing_data_stops_before_any_trial(tmp_path, capsys):
    from tools.sweep import main

    spec = write_sweep(tmp_path / "s.toml", tmp_path / "nowhere", GRID)
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and not (tmp_path / "out" / "trials").exists()


def test_slurm_without_sbatch_is_one_line(fmnist_tree, tmp_path, capsys, monkeypatch):
    from tools.sweep import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, whatever the machine has
    spec = write_sweep(tmp_path / "s.toml", fmnist_tree, GRID + 'executor = "slurm"\n')
    assert main([str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch is not on PATH" in err[0] and not (tmp_path / "out" / "trials").exists()


def _subset_body(tree: Path) -> str:
    return ('[budget.subset]\nsrc = "%s"\nclasses = ["c0", "c3"]\nlimit_per_class = 8\nformats = ["dali"]\n'
            '[grid]\n"optim.lr" = [0.01]\n' % (tree / ""))


def test_a_typo_in_set_stops_before_the_subset_is_made(fmnist_tree, tmp_path, capsys):
    """On ImageNet the subset is a conversion: every trial's recipe is checked before it."""
    from tools.sweep import main

    fixed = {"data.pipeline": "dali", "data.num_classes": None, "optim.lrr": 0.1}
    spec = write_sweep(tmp_path / "s.toml", None, _subset_body(fmnist_tree), fixed, budget="epochs = 1")
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key optim.lrr; did you mean optim.lr?" in err[0], err
    assert not list(out.glob("subset-*")) and not (out / "trials").exists()


def test_slurm_without_a_controller_is_one_line_before_the_subset(fmnist_tree, tmp_path, capsys, monkeypatch):
    """Slurm's commands installed, no cluster to talk to (a laptop, a login node of a cluster that is down)."""
    from tools.sweep import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                                    "(connect failure)' >&2\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fixed = {"data.pipeline": "dali", "data.num_classes": None}
    spec = write_sweep(tmp_path / "s.toml", None, _subset_body(fmnist_tree) + '[run]\nexecutor = "slurm"\n', fixed,
                       budget="epochs = 1")
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: executor slurm: squeue cannot reach a Slurm controller (slurm_load_jobs error: Unable to "
                   "contact slurm controller (connect failure)); run the sweep on a Slurm login node, or use "
                   "--executor local"], err
    assert not list(out.glob("subset-*")) and not (out / "trials").exists()


def test_report_only_refuses_another_sweeps_folder(tmp_path, capsys):
    """A folder holds the trials of the sweep file copied into it; reporting it for another file would
    list that file's trials as pending and overwrite results.md."""
    from tools.sweep import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.toml").write_text(write_sweep(tmp_path / "first.toml", tmp_path, GRID).read_text())
    (out / "results.md").write_text("the first sweep's tables\n")
    other = write_sweep(tmp_path / "other.toml", tmp_path, 'seeds = [0]\n[grid]\n"optim.lr" = [0.1, 0.2, 0.3]\n')
    assert main([str(other), "--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}/sweep.toml is not {other}: ") and \
        f"{out}/sweep.toml --out {out} --report-only" in err[0], err
    assert (out / "results.md").read_text() == "the first sweep's tables\n"


def test_random_space_is_reproducible_and_in_range(tmp_path):
    body = ('seeds = [3]\n[random]\ntrials = 20\nseed = 7\n"optim.lr" = {low = 1e-4, high = 1e-1, log = true}\n'
            '"optim.weight_decay" = [0.01, 0.05]\n"train.epochs" = {low = 2, high = 5}\n')
    spec = write_sweep(tmp_path / "r.toml", tmp_path, body)
    a, b = configurations(read_sweep(spec)), configurations(read_sweep(spec))
    assert a == b and len(a) == 20
    assert all(1e-4 <= c["optim.lr"] <= 1e-1 and c["optim.weight_decay"] in (0.01, 0.05) for c in a)
    assert all(isinstance(c["train.epochs"], int) and 2 <= c["train.epochs"] <= 5 for c in a)
    # log-uniform: about as many draws below the geometric middle (3.2e-3) as above it
    assert 5 <= sum(c["optim.lr"] < math.sqrt(1e-4 * 1e-1) for c in a) <= 15
    assert len({c["optim.lr"] for c in a}) == 20


def test_trial_names_follow_the_whole_command(tmp_path):
    spec = write_sweep(tmp_path / "n.toml", tmp_path, GRID)
    names = [t.name for t in plan(read_sweep(spec), tmp_path)]
    assert names == [t.name for t in plan(read_sweep(spec), tmp_path)] and len(set(names)) == 4
    assert names[0].startswith("lr=0.001_seed=0-")
    # a changed budget makes new trials instead of reusing results made under the old one
    changed = write_sweep(tmp_path / "n.toml", tmp_path, GRID, budget="max_steps = 3")
    assert not set(names) & {t.name for t in plan(read_sweep(changed), tmp_path)}
    with pytest.raises(SweepError, match="not found"):
        read_sweep(tmp_path / "missing.toml")
