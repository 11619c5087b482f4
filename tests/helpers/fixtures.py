"""The session's shared fixtures (registered in tests/conftest.py): data sets made and converted once,
two finished tiny runs the tool tests read, and the throwaway Slurm cluster."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import stage1
from tests.helpers.fmnist import write_fmnist_tree

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fmnist_tree(tmp_path_factory) -> Path:
    """10 classes x 64 train / 16 val, 32x32: enough for a few real optimizer steps in seconds."""
    return write_fmnist_tree(tmp_path_factory.mktemp("fmnist"), 64, 16)


@pytest.fixture(scope="session")
def fmnist_converted(fmnist_tree, tmp_path_factory) -> Path:
    """``fmnist_tree`` converted to FFCV and DALI once per session (shared by the engine's tests)."""
    return stage1.convert(fmnist_tree, tmp_path_factory.mktemp("fmnist_converted") / "converted")


@pytest.fixture(scope="session")
def tiny_runs(fmnist_tree, tmp_path_factory) -> dict[str, Path]:
    """Two finished 1-epoch engine runs on ``fmnist_tree`` that differ in seed: "ema" keeps an EMA
    of its weights (so the tools must pick the EMA weights, as the engine's final eval does),
    "plain" does not. Shared by the tool tests (evaluate, Grad-CAM)."""
    import subprocess

    from tests.helpers.engine_runs import engine_cmd

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


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A throwaway two-node Slurm cluster (tests/helpers/slurm_cluster.py) shared by the Slurm tests of
    a module (tests/test_slurm.py), started on first use; clients find it through SLURM_CONF while it
    runs. When the module ends it cancels every job, stops each daemon by its PID (also after a failed
    test), and fails if any of its processes is left. Not for the whole session: a pytest-xdist worker
    runs other files after this one, and a process they start (W&B's service, which outlives its run)
    would inherit SLURM_CONF and count as the cluster's."""
    from tests.helpers.slurm_cluster import SlurmCluster, skip_or_fail, unavailable

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


@pytest.fixture(scope="session")
def ids_root(tmp_path_factory) -> Path:
    return stage1.dataset(tmp_path_factory, "ids", 48, 21)  # 21 val: uneven over 2 ranks


@pytest.fixture(scope="session")
def coords_root(tmp_path_factory) -> Path:
    return stage1.dataset(tmp_path_factory, "coords", 16, 4)


@pytest.fixture(scope="session")
def photos_root(tmp_path_factory) -> Path:
    return stage1.dataset(tmp_path_factory, "photos", 6, 10)
