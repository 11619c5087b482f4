"""End-to-end engine behaviour on CPU: metrics, checkpoints, exact resume after kill -9, DDP, W&B,
and the failures a user meets (NaN loss, missing data, wrong class count, Ctrl-C)."""
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

from engine.setup import batch_composition
from tests.helpers.engine_runs import comparable, engine_cmd, metrics, newest_per_point, run_engine

ROOT = Path(__file__).resolve().parents[1]


def test_batch_composition():
    assert batch_composition(2048, 8, 0) == (256, 1)
    assert batch_composition(2048, 8, 64) == (64, 4)
    assert batch_composition(256, 1, 32) == (32, 8)
    from common.config import ConfigError
    with pytest.raises(ConfigError, match=r"per_device_batch_size 48 does not divide the 256 images per process "
                                          r"\(global batch 2048 / 8 processes\): set one that does, e\.g\. "
                                          r"train\.per_device_batch_size=32 \(8 accumulation steps\)"):
        batch_composition(2048, 8, 48)
    # the advice must be followable: 256 does not split over 3 processes at all, whatever the per-device batch
    for per_device in (0, 85):
        with pytest.raises(ConfigError) as e:
            batch_composition(256, 3, per_device)
        assert str(e.value) == ("train.global_batch_size 256 does not split over 3 processes: set a global batch "
                                "that does (e.g. train.global_batch_size=255 or 258), or use a process count that "
                                "divides 256 (e.g. 2 or 4)")
    for fix in ((255, 3, 0), (258, 3, 0), (256, 2, 0), (256, 4, 0), (2048, 8, 32)):
        batch_composition(*fix)  # each fix the messages name works


def test_run_writes_metrics_checkpoints_and_exports(fmnist_tree, tmp_path):
    out = tmp_path / "run"
    proc = run_engine(fmnist_tree, out, "train.log_every=4")
    recs = metrics(out)
    train = [r for r in recs if "train_loss" in r]
    evals = [r for r in recs if "val_top1" in r]
    assert train and evals and evals[-1]["epoch"] == 1
    for r in train:
        assert set(r) >= {"epoch", "step", "batch", "lr", "train_loss", "images_per_s", "data_wait_frac"}
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] <= 1
    # 640 images / 64 = 10 steps per epoch; log points every 4th step *within* the epoch and at its end
    # (as timm's batch_idx), so epoch 1 logs at its steps 4, 8, 10, not at global steps 12, 16, 20
    assert [(r["epoch"], r["batch"], r["step"]) for r in train] == \
        [(0, 4, 4), (0, 8, 8), (0, 10, 10), (1, 4, 14), (1, 8, 18), (1, 10, 20)]
    assert "epoch 1 [4/10] loss" in proc.stderr and "epoch 1 [10/10] loss" in proc.stderr
    # one record per epoch (its last) with the epoch's wall time, images/s and data-wait, and a line for it
    totals = [r for r in recs if "epoch_time_s" in r]
    assert [(r["epoch"], r["batch"]) for r in totals] == [(0, 10), (1, 10)]
    for r in totals:
        assert 0 < r["epoch_time_s"] < r["elapsed_s"] and 0 <= r["epoch_data_wait_frac"] <= 1
        assert r["epoch_images_per_s"] == pytest.approx(640 / r["epoch_time_s"], rel=1e-6)
    assert proc.stderr.count(": trained in ") == 2
    assert evals[-1]["val_images"] == 160  # every val image exactly once
    # every record says when (Unix time) and how far into the run's wall time it was written
    times, elapsed = [r["time"] for r in recs], [r["elapsed_s"] for r in recs]
    assert times == sorted(times) and elapsed == sorted(elapsed) and 0 < elapsed[-1] < 600
    assert abs((times[-1] - times[0]) - (elapsed[-1] - elapsed[0])) < 1.0
    assert "final val top-1" in proc.stdout
    assert "batch: global 64 = 64 per device x 1 processes x 1 accumulation steps" in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "best.safetensors" in names
    ckpts = [n for n in names if n.startswith("ckpt-") and n.endswith(".pt")]
    assert len(ckpts) == 2  # keep_last = 2 of the two epoch checkpoints
    assert all(f"{n}.json" in names for n in ckpts)  # each with its record (sha256, confirmed)
    state = torch.load(out / ckpts[-1], weights_only=True)
    assert state["progress"]["epoch"] == 2 and state["config"]["train"]["epochs"] == 2


def test_accumulation_keeps_the_global_batch(fmnist_tree, tmp_path):
    """16 per device x 4 accumulation steps = the same optimizer steps as 64 at once."""
    run_engine(fmnist_tree, tmp_path / "a", "train.epochs=1", "augment.rand_augment=", "augment.mixup_alpha=0",
               "augment.cutmix_alpha=0", "model.drop_path_rate=0")
    b = run_engine(fmnist_tree, tmp_path / "b", "train.epochs=1", "augment.rand_augment=", "augment.mixup_alpha=0",
                   "augment.cutmix_alpha=0", "model.drop_path_rate=0", "train.per_device_batch_size=16")
    assert "16 per device x 1 processes x 4 accumulation steps" in b.stderr
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    # BatchNorm sees 16 instead of 64 images, so losses are close, not equal
    for ra, rb in zip(ma, mb):
        if "train_loss" in ra:
            assert abs(ra["train_loss"] - rb["train_loss"]) < 0.1 * ra["train_loss"]


def test_kill_9_mid_epoch_then_resume_auto_is_exact(fmnist_tree, tmp_path):
    full = tmp_path / "full"
    run_engine(fmnist_tree, full, "train.epochs=3")
    out = tmp_path / "killed"
    # checkpoints every optimizer step (every_minutes tiny) so a kill lands mid-epoch
    proc = subprocess.Popen(engine_cmd(fmnist_tree, out, "train.epochs=3", "checkpoint.every_minutes=1e-9",
                                       "checkpoint.keep_last=3"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    # wait for a checkpoint in the middle of epoch 1 (epoch 0 done, epoch 1 started)
    while time.time() < deadline and not any(p.name.startswith("ckpt-e0001-") for p in out.glob("ckpt-*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_engine(fmnist_tree, out, "train.epochs=3", args=["--resume", "auto"])
    assert "resumed from" in resumed.stderr
    # records the killed run logged after its last checkpoint are dropped and logged again by the
    # resumed run: one record per log point, equal to the uninterrupted run's, timings aside
    records = metrics(out)
    assert len(records) == len(newest_per_point(records)), "duplicate step records after the resume"
    assert comparable(newest_per_point(records)) == comparable(newest_per_point(metrics(full)))
    # the run's wall time continues across the kill: the records after the resume continue the count
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed), elapsed


def test_ffcv_runs_repeat_for_any_thread_count_and_resume_exactly(fmnist_converted, tmp_path):
    """FFCV draws its crops and flips from our counter-based generator (pipelines/counter_rng.py), not
    from numba's unseeded per-thread ones, and leaves torch's threads alone: a 1-thread run, cut back
    to its step-4 checkpoint (what a kill leaves) and resumed with 2 decoding threads, ends with the
    uninterrupted 1-thread run's weights, bit for bit."""
    pytest.importorskip("ffcv")
    from safetensors.torch import load_file

    sets = ("data.pipeline=ffcv", "train.epochs=1", "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=20")
    one = tmp_path / "one"
    run_engine(fmnist_converted, one, *sets, "data.workers=1")
    cut = tmp_path / "cut"
    shutil.copytree(one, cut)
    for p in cut.iterdir():
        if p.name.startswith("ckpt-") and int(p.name.split("-s")[1][:9]) > 4 or p.suffix == ".safetensors":
            p.unlink()
    resumed = run_engine(fmnist_converted, cut, *sets, "data.workers=2", args=["--resume", "auto"])
    assert "resumed from" in resumed.stderr and ", step 4" in resumed.stderr
    a, b = load_file(str(one / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("extra,message", [
    (("data.root=/nonexistent/data",), "data.root /nonexistent/data does not exist"),
    (("data.num_classes=1000",), "data.num_classes = 1000 but the dataset"),
    (("model.arch=resnet5O",), "did you mean resnet50?"),
    (("train.epochs=1", "train.progressive.kind=linear", "train.progressive.end_epoch=3"),
     "train.progressive.end_epoch = 3 is past train.epochs = 1; set train.progressive.end_epoch=1"),
    (("--max-steps", "0"), "--max-steps 0: give a number of optimizer steps >= 1"),
    (("--max-steps", "-1"), "--max-steps -1: give a number of optimizer steps >= 1"),
    (("--resume", "autoo"), "--resume autoo: did you mean --resume auto?"),
    (("--resume", "runs/x/ckpt-e0001.pt"), "--resume runs/x/ckpt-e0001.pt: no such checkpoint file"),
])
def test_user_errors_are_one_line(fmnist_tree, tmp_path, extra, message):
    from engine.run import main
    from tests.helpers.cli import run_main

    sets = tuple(e for e in extra if "=" in e)
    args = [e for e in extra if "=" not in e]
    proc = run_main(main, engine_cmd(fmnist_tree, tmp_path / "e", *sets)[3:] + args)  # in process: python -m engine.run
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "e").exists(), "a failed start left a run folder behind"


def test_ctrl_c_checkpoints_then_resume_continues(fmnist_tree, tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen(engine_cmd(fmnist_tree, out, "train.epochs=20"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGINT" in err and "final val top-1" not in stdout
    interrupted = sorted(out.glob("ckpt-*.pt"))[-1]
    state = torch.load(interrupted, weights_only=True)
    assert state["tag"] == "interrupted"
    # The run that wrote it never checked it. Resumed at a learning rate that diverges after one
    # step, with a loss check at every step: the first check passes and confirms it (in its
    # sidecar), so when the run then diverges it stays the last good checkpoint, not *.rejected.
    diverge = tmp_path / "diverge"
    shutil.copytree(out, diverge)
    bad = run_engine(fmnist_tree, diverge, "train.epochs=20", "optim.lr=1000", "optim.warmup_epochs=0",
                     "train.log_every=1", "checkpoint.every_minutes=1e-9", args=["--resume", "auto"], check=False)
    assert bad.returncode == 3, bad.stderr[-2000:]
    assert (diverge / interrupted.name).is_file() and json.loads((diverge / f"{interrupted.name}.json").read_text())[
        "confirmed"]
    assert f"the last good checkpoint is {interrupted.name}" in bad.stderr, bad.stderr[-2000:]
    resumed = run_engine(fmnist_tree, out, "train.epochs=20", "train.epochs=2", args=["--resume", "auto"], check=False)
    assert "resumed from" in resumed.stderr


def test_a_folder_with_a_finished_run_needs_resume(fmnist_tree, tmp_path):
    """A --max-steps run writes no checkpoint, only metrics and exports; a second run into the same
    --out without --resume stops with one line and leaves them as they were."""
    from engine.run import main
    from tests.helpers.cli import run_main

    out = tmp_path / "run"
    first = run_main(main, engine_cmd(fmnist_tree, out, "train.epochs=1")[3:] + ["--max-steps", "2"])
    assert first.returncode == 0 and not list(out.glob("ckpt-*")), first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"metrics.jsonl", "model.safetensors"} <= set(before)
    again = run_main(main, engine_cmd(fmnist_tree, out, "train.epochs=1")[3:] + ["--max-steps", "2"])
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith(
        f"error: {out} already holds a run's output (metrics.jsonl"), again.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert "--resume auto" not in again.stderr  # no checkpoint: there is nothing to continue
    (out / "metrics.png").write_bytes(b"drawn from the first run's metrics")  # as tools/demo.py leaves one
    before["metrics.png"] = (out / "metrics.png").read_bytes()
    fresh = run_main(main, engine_cmd(fmnist_tree, out, "train.epochs=1")[3:] + ["--max-steps", "2", "--resume", "fresh"])
    assert fresh.returncode == 0 and (out / "metrics.jsonl").is_file()
    moved = next(out.glob("previous-*"))
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == before
    assert f"--resume fresh: moved the previous run's files into {moved}" in fresh.stdout + fresh.stderr


def test_resume_auto_of_a_finished_run_says_so_and_trains_nothing(tiny_runs, fmnist_tree, tmp_path):
    """The shared finished 1-epoch run (tests/helpers/fixtures.py), copied: --resume auto has nothing to
    do, says that the run is finished (not "resumed ... at epoch 1"), and leaves every file as it was."""
    from engine.run import main
    from tests.helpers.cli import run_main

    out = tmp_path / "done"
    shutil.copytree(tiny_runs["plain"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    sets = ("train.epochs=1", "augment.mixup_alpha=0.0", "augment.cutmix_alpha=0.0", "train.seed=1")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    proc = run_main(main, engine_cmd(fmnist_tree, out, *sets)[3:] + ["--resume", "auto"])
    # the engine ignores stop signals while it ends; a caller in the same process gets its own back
    # (an ignored SIGTERM would be inherited by every process it starts later)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert f"the run in {out} is finished (epoch 0 was its last, step 10): nothing to train" in said, said[-2000:]
    assert "resumed from" not in said and "epoch 0: train" not in said
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_evaluation_says_what_it_does_and_max_images_caps_it(fmnist_tree, tmp_path):
    """Before: a smoke run's evaluation was silent (17 minutes of nothing on a1's 224-px val) and could
    not be capped. Now it names what it evaluates, and eval.max_images takes that many images spread
    evenly over the val set (every class kept: the val set is stored class by class)."""
    from engine.run import main
    from tests.helpers.cli import run_main

    out = tmp_path / "capped"
    proc = run_main(main, engine_cmd(fmnist_tree, out, "train.epochs=1", "eval.max_images=50")[3:] + ["--max-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 0: evaluating 50 images at 32 px (eval.max_images of 160)" in proc.stderr
    evals = [r for r in metrics(out) if "val_top1" in r]
    assert evals and evals[-1]["val_images"] == 50
    from pipelines._stage1_common import val_indices

    picked = val_indices(160, 0, 1, 50)
    assert len(set(picked // 16)) == 10  # 16 val images per class, in class order: all 10 classes are there


def test_evaluation_progress_is_a_line_every_so_often_off_a_terminal():
    from engine.evaluate import EvalProgress

    lines = []
    shown = EvalProgress(total_batches=10, images_total=1000, world_size=2, tty=False, enabled=True,
                         write=lines.append)
    shown.LINE_EVERY_S = 0.0  # a line at each call after the first interval (30 s in a run)
    shown(3, 150)
    assert lines == ["evaluating: 300 of 1,000 images (30%), 0 s"]
    shown(10, 500)  # the last batch: the result line follows, no progress line
    assert len(lines) == 1


def test_wandb_offline_run_has_config_metrics_and_artifact(fmnist_tree, tmp_path):
    out = tmp_path / "wb"
    run_engine(fmnist_tree, out, "log.wandb=offline", "train.epochs=1", env={"WANDB_MODE": "offline"})
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    from tests.helpers.wandb_reader import read_offline_run

    found = read_offline_run(runs[0], until=lambda f: any(a["type"] == "model" for a in f["artifacts"]))
    assert found["config"]["optim"]["lr"] == 0.005 and found["config"]["model"]["arch"] == "resnet_tiny"
    assert any("train_loss" in h for h in found["history"]) and any("val_top1" in h for h in found["history"])
    assert any(a["type"] == "model" for a in found["artifacts"])


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process_and_its_export(fmnist_tree, tmp_path):
    # with an EMA (decay 0.9: after 20 steps the initial weights still count 12%), whose weights are
    # what the run evaluates and exports: every rank's must be the same
    common = ("train.epochs=2", "augment.rand_augment=", "augment.mixup_alpha=0", "augment.cutmix_alpha=0",
              "model.drop_path_rate=0", "train.deterministic=false", "train.ema_decay=0.9")
    single = tmp_path / "single"
    run_engine(fmnist_tree, single, *common)
    ddp = tmp_path / "ddp"
    cmd = engine_cmd(fmnist_tree, ddp, *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"] + cmd[1:]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "32 per device x 2 processes x 1 accumulation steps" in proc.stderr
    a, b = metrics(single), metrics(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    ea, eb = [r for r in a if "val_top1" in r][-1], [r for r in b if "val_top1" in r][-1]
    assert eb["val_images"] == 160  # the val set is split across ranks without duplicates
    # same global batch and lr; BatchNorm statistics per rank make it close, not identical
    assert abs(ea["val_loss"] - eb["val_loss"]) < 0.25 * ea["val_loss"]
    la = [r["train_loss"] for r in a if "train_loss" in r]
    lb = [r["train_loss"] for r in b if "train_loss" in r]
    assert all(abs(x - y) < 0.15 * x for x, y in zip(la, lb))
    # BatchNorm statistics are averaged over ranks before evaluation and export (timm's --dist-bn
    # reduce) and every rank holds the same EMA: the figures the run reported are those of the
    # exported model, evaluated in one process. Without the reduction each rank evaluates its own
    # statistics; with an EMA per rank, each its own weights; and the export is rank 0's.
    from tests.helpers.engine_runs import evaluate

    got = tmp_path / "export_eval.json"
    proc = evaluate(ddp / "model.safetensors", "--json", got)
    assert proc.returncode == 0, proc.stderr
    export = json.loads(got.read_text())
    assert export["val_images"] == eb["val_images"] and export["val_top1"] == eb["val_top1"]
    assert export["val_loss"] == pytest.approx(eb["val_loss"], rel=1e-5)
