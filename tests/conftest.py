"""Shared fixtures: small real-image class-folder trees from Debian's Fashion-MNIST."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def read_idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_fmnist_tree(out: Path, per_class_train: int, per_class_val: int, size: int = 32, classes: int = 10) -> Path:
    """An ImageFolder tree of RGB JPEGs: out/{train,val}/c<k>/<i>.jpg (real Fashion-MNIST pixels)."""
    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (make test installs it as root)")
    for split, prefix, per_class in (("train", "train", per_class_train), ("val", "t10k", per_class_val)):
        images = read_idx(f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz")
        for c in range(classes):
            folder = out / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                img = Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC)
                img.save(folder / f"{j:05d}.jpg", quality=90)
    return out


@pytest.fixture(scope="session")
def fmnist_tree(tmp_path_factory) -> Path:
    """10 classes x 64 train / 16 val, 32x32: enough for a few real optimizer steps in seconds."""
    return write_fmnist_tree(tmp_path_factory.mktemp("fmnist"), 64, 16)


@pytest.fixture(scope="session")
def fmnist_converted(fmnist_tree, tmp_path_factory) -> Path:
    """``fmnist_tree`` converted to FFCV and DALI once per session (shared by the engine's tests)."""
    from tests.test_pipeline_parity import convert

    return convert(fmnist_tree, tmp_path_factory.mktemp("fmnist_converted") / "converted")


@pytest.fixture(scope="session")
def tiny_runs(fmnist_tree, tmp_path_factory) -> dict[str, Path]:
    """Two finished 1-epoch engine runs on ``fmnist_tree`` that differ in seed: "ema" keeps an EMA
    of its weights (so the tools must pick the EMA weights, as the engine's final eval does),
    "plain" does not. Shared by the tool tests (evaluate, Grad-CAM)."""
    import subprocess
    import sys

    from tests.test_engine import engine_cmd

    base = tmp_path_factory.mktemp("tiny_runs")
    runs = {"ema": ("train.seed=0", "train.ema_decay=0.9"), "plain": ("train.seed=1",)}
    out = {}
    for name, extra in runs.items():
        folder = base / name
        proc = subprocess.run(engine_cmd(fmnist_tree, folder, "train.epochs=1", "augment.mixup_alpha=0.0",
                                         "augment.cutmix_alpha=0.0", *extra),
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = folder
    return out


def skip_or_fail(why: str):
    """Skip a Slurm test with the reason; under CI (``RSB_REQUIRE_SLURM=1``, set by .ci/run) fail
    instead, so that a CI run where Slurm is missing cannot pass with those tests skipped."""
    if os.environ.get("RSB_REQUIRE_SLURM"):
        pytest.fail(f"the Slurm tests must run here (RSB_REQUIRE_SLURM is set): {why}", pytrace=False)
    pytest.skip(f"Slurm tests skipped: {why}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A throwaway two-node Slurm cluster (benchmarks/slurm_cluster.py) shared by every Slurm test,
    started on first use; clients find it through SLURM_CONF while it runs. At the end it cancels
    every job, stops each daemon by its PID (also after a failed test), and fails the session if
    any of its processes is left."""
    from benchmarks.slurm_cluster import SlurmCluster, unavailable

    why = unavailable()
    if why:
        skip_or_fail(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        cluster.start()
    except RuntimeError as e:
        skip_or_fail(f"the test cluster did not start: {e}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        left = cluster.leftovers()
        assert not left, f"the Slurm test cluster left processes running: {left}"
