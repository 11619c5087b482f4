"""Runs of the engine as the tests make them: a tiny but real recipe (timm's resnet_tiny on
Fashion-MNIST crops, the reference pipeline, stage 2 and LAMB), the command, and its metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli import run_main

ROOT = Path(__file__).resolve().parents[2]

# A tiny but real run: timm ResNet (resnet_tiny) on Fashion-MNIST crops through the reference pipeline
# and stage 2 (RandAugment + mixup/CutMix + BCE, as in the RSB recipes) with LAMB.
TINY = ["model.arch=resnet_tiny", "data.pipeline=reference", "data.num_classes=10", "data.workers=0",
        "train.epochs=2", "train.global_batch_size=64", "train.train_res=32", "train.precision=fp32",
        "train.log_every=2", "eval.res=32", "eval.crop_pct=1.0", "eval.batch_size=64",
        "optim.warmup_epochs=1", "optim.lr=0.005", "augment.rand_augment=rand-m7-mstd0.5-inc1",
        "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "checkpoint.every_minutes=0",
        "log.wandb=off", "train.deterministic=true"]


def engine_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.root={root}", *TINY, *extra]
    return [sys.executable, "-m", "engine.run", "recipes/a3.toml", "--out", str(out)] + \
        [a for s in sets for a in ("--set", s)]


def run_engine(root, out, *extra, check=True, env=None, args=()):
    proc = subprocess.run(engine_cmd(root, out, *extra) + list(args), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[tuple]:
    """What must be identical between runs (timings are not)."""
    keys = ("epoch", "step", "lr", "train_loss", "val_top1", "val_top5", "val_loss")
    return [tuple(r.get(k) for k in keys) for r in records]


def newest_per_point(records: list[dict]) -> list[dict]:
    latest = {(r["step"], "val_top1" in r): r for r in records}
    return [latest[k] for k in sorted(latest)]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    """tools/evaluate.py's ``main`` in this process (tests/helpers/cli.py); tests/test_evaluate.py also
    runs the script itself."""
    from tools.evaluate import main

    return run_main(main, list(args))
