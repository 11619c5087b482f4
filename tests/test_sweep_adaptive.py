"""Adaptive sweeps with a real Optuna study (workflows/sweep/study.py) on the engine tests' tiny data:
ASHA stops a losing trial like a preemption (a checkpoint, state "pruned", its folder kept) and the
report lists every state and the compute saved; TPE with a fixed seed proposes the same trials in a
fresh folder, and a sweep interrupted mid-trial continues that trial in the same study trial and runs
none twice. The Slurm executor's adaptive sweep (array tasks sharing the journal, a preempted trial
resumed into its study trial) is case f of tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.sweeps import FIXED

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, root: Path, body: str, epochs: int, fixed: dict | None = None) -> Path:
    sets = {**FIXED, "data.root": str(root), "eval.batch_size": 160, **(fixed or {})}
    lines = [f'base = "{ROOT / "recipes" / "a3.toml"}"', body, "[budget]", f"epochs = {epochs}", "[set]"]
    lines += [f'"{k}" = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}' for k, v in sets.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def study_of(out: Path, name: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))


def evaluated_epochs(metrics: Path) -> int:
    return len({json.loads(ln)["epoch"] for ln in metrics.read_text().splitlines() if '"val_top1"' in ln})


# the good learning rate first: ASHA keeps the first trial at a rung (nothing to compare it with) and
# stops a later one whose val top-1 there is not the best of what it has seen
ASHA = ('seeds = [0]\n[grid]\n"optim.lr" = [0.01, 1e-06, 2e-06]\n'
        '[prune]\nkind = "asha"\nmin_epochs = 1\nreduction_factor = 3\n[run]\nparallel = 1\n')


def test_asha_stops_losing_trials_with_a_checkpoint_and_reports_every_state(fmnist_tree, tmp_path):
    spec = write(tmp_path / "asha.toml", fmnist_tree, ASHA, epochs=5)
    out = tmp_path / "out"
    proc = sweep(str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {json.loads((t / "trial.json").read_text())["swept"]["optim.lr"]: (t, json.loads((t / "trial.json")
               .read_text())) for t in (out / "trials").iterdir()}
    assert records[0.01][1]["status"] == "done"
    pruned = [(t, r) for lr, (t, r) in records.items() if r["status"] == "pruned"]
    assert pruned, {lr: r["status"] for lr, (_, r) in records.items()}
    study = study_of(out, "asha")
    by_folder = {t.user_attrs["folder"]: t for t in study.trials}
    for folder, record in pruned:
        assert record["pruned_at_epoch"] == 0  # the first rung: after 1 epoch of 5
        tags = [json.loads(Path(f"{c}.json").read_text())["tag"] for c in folder.glob("ckpt-*.pt")]
        assert "interrupted" in tags  # stopped as a preemption stops a run: with a checkpoint
        assert by_folder[str(folder)].state.name == "PRUNED" and 1 in by_folder[str(folder)].intermediate_values
    assert by_folder[str(records[0.01][0])].state.name == "COMPLETE"
    md = (out / "results.md").read_text()
    assert "| complete |" in md and "| pruned after epoch 0 |" in md
    # a pruned run may finish one more epoch before its SIGTERM lands (these epochs last a second):
    # the report counts the epochs each trial evaluated, not the rung it was stopped at
    used = sum(5 if r["status"] == "done" else evaluated_epochs(t / "metrics.jsonl") for t, r in records.values())
    assert used < 15 and f"Compute: {used:g} trial-epochs of the 15 that 3 trials of 5 epochs would take" in md, md
    assert "python -m engine.run" in md and "--set optim.lr=0.01" in md  # the best, ready to train
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = sweep(str(spec), "--out", str(out))  # finished and pruned trials are not run again
    assert again.returncode == 0 and all(json.loads((t / "trial.json").read_text())["launches"] == 1
                                         for t in (out / "trials").iterdir()), again.stdout + again.stderr


TPE = ('seeds = [0]\n[search]\nsampler = "tpe"\n[random]\ntrials = 2\nseed = 5\n'
       '"optim.lr" = {low = 1e-4, high = 1e-1, log = true}\n"optim.weight_decay" = [0.0, 0.05]\n[run]\nparallel = 1\n')


def proposed(out: Path) -> list[tuple]:
    trials = [json.loads((t / "trial.json").read_text()) for t in (out / "trials").iterdir()]
    return sorted((r["swept"]["optim.lr"], r["swept"]["optim.weight_decay"]) for r in trials)


def test_tpe_repeats_itself_and_an_interrupted_sweep_runs_no_trial_twice(fmnist_tree, tmp_path):
    spec = write(tmp_path / "tpe.toml", fmnist_tree, TPE, epochs=2)
    first = sweep(str(spec), "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(list((tmp_path / "a" / "trials").iterdir())) == 2
    # interrupted in its second trial: Ctrl-C reaches the sweep and its engine, which checkpoint and stop
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "tools/sweep.py", str(spec), "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + 300
    second = None
    while second is None and time.monotonic() < deadline and proc.poll() is None:
        second = next((t for t in out.glob("trials/*") if _number(t) == 1 and _evaluated_epoch_0(t)), None)
        time.sleep(0.1)
    assert second is not None, "the sweep did not reach the end of its second trial's first epoch"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    number = json.loads((second / "study.json").read_text())["number"]
    rerun = sweep(str(spec), "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    records = {t.name: json.loads((t / "trial.json").read_text()) for t in (out / "trials").iterdir()}
    assert len(records) == 2 and records[second.name]["status"] == "done" and records[second.name]["launches"] == 2
    assert sorted(r["launches"] for r in records.values()) == [1, 2]  # no trial run twice from scratch
    assert json.loads((second / "study.json").read_text())["number"] == number  # the same study trial
    assert "resumed from" in (second / "log.txt").read_text()
    study = study_of(out, "tpe")
    assert len(study.trials) == 2 and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert proposed(out) == proposed(tmp_path / "a")  # the same proposals as the uninterrupted sweep


def _number(trial: Path) -> int | None:
    try:
        return json.loads((trial / "study.json").read_text())["number"]
    except (OSError, ValueError, KeyError):
        return None


def _evaluated_epoch_0(trial: Path) -> bool:
    """Epoch 0's evaluation is logged (and reported to the study): a stop from here lands in epoch 1,
    the whole of its training and evaluation to land in."""
    try:
        lines = (trial / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return any("val_top1" in r and r.get("epoch") == 0 for r in records)


def test_sqlite_on_a_shared_file_system_is_refused_in_one_line(tmp_path, monkeypatch):
    """Optuna's issues #815, #820, #1300, #6036: SQLite's fcntl locks break on NFS and trials are lost."""
    import workflows.slurm_launch as launch
    from workflows.sweep.plan import SweepError
    from workflows.sweep.study import storage_for

    monkeypatch.setattr(launch, "file_system", lambda path, mounts=None: ("/shared", "nfs4"))
    with pytest.raises(SweepError, match=r"--storage sqlite:////shared/s\.db: SQLite on a shared file system \(nfs4 at "
                                         r"/shared\) .* use the default journal file"):
        storage_for(tmp_path, "sqlite:////shared/s.db")
    monkeypatch.setattr(launch, "file_system", lambda path, mounts=None: ("/", "ext4"))
    storage_for(tmp_path, f"sqlite:///{tmp_path / 'local.db'}")  # a local disk: allowed
    storage_for(tmp_path, None)
    assert (tmp_path / "study.journal").parent.is_dir()
