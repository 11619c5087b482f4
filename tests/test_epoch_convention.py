"""One epoch count everywhere, from 0 as timm logs it: metrics.jsonl, checkpoint names and records, the
exports' ``epoch`` metadata and the final line all name the epoch a step was trained in."""
from __future__ import annotations

import json
import re

from safetensors import safe_open

from tests.helpers.engine_runs import metrics, run_engine

NAME = re.compile(r"^ckpt-e(\d{4})-s(\d{9})\.pt$")


def test_checkpoints_and_exports_count_epochs_as_metrics_do(fmnist_tree, tmp_path):
    out = tmp_path / "run"
    # 10 steps per epoch, 2 epochs; a checkpoint at every log point (every 2 steps) and at each epoch's end
    proc = run_engine(fmnist_tree, out, "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=100")
    records = metrics(out)
    epoch_of_step = {r["step"]: r["epoch"] for r in records if "train_loss" in r}
    evals = [r for r in records if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1] and max(epoch_of_step.values()) == 1

    names = sorted(p.name for p in out.glob("ckpt-*.pt"))
    assert len(names) == 10, names  # steps 2, 4, ..., 20: the end-of-epoch one replaces its step's mid-epoch one
    for name in names:
        epoch, step = (int(g) for g in NAME.match(name).groups())
        assert epoch == epoch_of_step[step], f"{name}: step {step} was trained in epoch {epoch_of_step[step]}"
        record = json.loads((out / f"{name}.json").read_text())
        assert record["epoch"] == epoch and record["step"] == step
    ends = {r["epoch"]: r["step"] for r in records if "epoch_time_s" in r}
    for epoch, step in ends.items():  # each epoch's end-of-epoch checkpoint carries that epoch's number
        record = json.loads((out / f"ckpt-e{epoch:04d}-s{step:09d}.pt.json").read_text())
        assert record["tag"] == "epoch", record
    assert names[-1] == "ckpt-e0001-s000000020.pt"

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == "1"  # the last epoch trained, as the last eval record says
    best = max(evals, key=lambda r: r["val_top1"])
    with safe_open(str(out / "best.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == str(best["epoch"])
    assert "(epoch 1, step 20)" in proc.stdout
