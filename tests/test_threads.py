"""torch's intra-op thread count is the user's: no import, pipeline or set-up of ours changes it.

Why a test and not a timing: the training step, stage 2's CPU kernels and evaluation all run on
torch's threads, so a library that sets them at import (FFCV's ``ffcv/pipeline/compiler.py`` ends
with ``Compiler.set_num_threads(1)``, which calls ``torch.set_num_threads(1)``) slows every step of
every run without a failing test; on the 2-core box it cost a third of the FFCV demo's images/s. A
thread count is the same on a quiet machine and a loaded one, so this check cannot be fooled by
noise. It runs in a fresh interpreter: FFCV's module-level call happens once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The user's choice: 3 threads, neither torch's default on this box nor FFCV's 1 nor data.workers (2).
USER_THREADS = 3

PROBE = r"""
import json, sys, threading
import torch
torch.set_num_threads(int(sys.argv[2]))
seen = {}
calls = []  # (the thread is the main one, n) of every torch.set_num_threads after this point
_set = torch.set_num_threads
def set_num_threads(n):
    calls.append((threading.current_thread() is threading.main_thread(), n))
    _set(n)
torch.set_num_threads = set_num_threads
def look(what):
    seen[what] = torch.get_num_threads()

look("start")
import pipelines.reference, pipelines.synthetic, pipelines.augment
look("import reference, synthetic, augment")
import pipelines.ffcv
look("import pipelines.ffcv")
import pipelines.dali
look("import pipelines.dali")

from common.config import load_config
from engine.distributed import init_distributed
from engine.setup import build_pipelines, set_up_device, wrap_for_training
from engine.state import EpochProgress
from engine.step import build_step, train_one_epoch
from pipelines.build import build_stage2
look("import engine")

root = sys.argv[1]
for backend in ("synthetic", "reference", "ffcv", "dali"):
    sets = [f"data.root={root}", f"data.pipeline={backend}", "model.arch=resnet_tiny", "data.num_classes=10",
            "data.workers=2", "train.global_batch_size=32", "train.train_res=32", "eval.res=32",
            "eval.batch_size=32", "train.progressive.kind=none", "train.precision=fp32", "log.wandb=off"]
    cfg = load_config("recipes/a3.toml", sets)
    d = init_distributed()
    cfg = set_up_device(cfg, d)
    train_pipe, val_pipe, steps = build_pipelines(cfg, d, 32, 1, cfg.train.epochs)
    look(f"{backend}: build the pipelines")
    train_pipe.set_epoch(0, 32)
    next(iter(train_pipe))
    val_pipe.set_epoch(0)
    next(iter(val_pipe))
    look(f"{backend}: a train and a val batch")
    ctx = build_step(cfg, d.device, steps)
    wrap_for_training(ctx, d, 1, False, input_shape=(32, 3, 32, 32), channels_last=True, ema_from_model=True)
    stage2 = build_stage2(cfg.data, cfg.augment, train=True, channels_last=True)
    for _ in train_one_epoch(ctx, train_pipe, stage2, EpochProgress(), steps_per_epoch=steps, log_every=1,
                             max_steps=1):
        pass
    look(f"{backend}: the engine's set-up and one step")
    del train_pipe, val_pipe
print(json.dumps({"seen": seen, "calls": calls}))
"""


@pytest.mark.ffcv
@pytest.mark.dali
def test_no_pipeline_or_engine_set_up_changes_torchs_threads(fmnist_converted):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(fmnist_converted), str(USER_THREADS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = got["seen"]
    changed = {what: n for what, n in seen.items() if n != USER_THREADS}
    assert not changed, f"torch's threads are no longer the user's {USER_THREADS} after: {changed}"
    assert len(seen) == 5 + 3 * 4  # every point looked at
    # FFCV's decoding thread sets torch's count at each epoch, as FFCV's own Compiler.set_num_threads
    # does, and with the user's count: without that call the FFCV demo trained 10-17% slower in three
    # of four interleaved comparisons on the 2-core box (pipelines/ffcv.py's _set_decode_threads)
    in_decoding_threads = [n for main, n in got["calls"] if not main]
    assert in_decoding_threads, "FFCV's decoding thread no longer sets torch's threads"
    assert set(in_decoding_threads) == {USER_THREADS}, got["calls"]


def test_the_engine_says_what_this_rank_may_use(fmnist_tree, tmp_path):
    """The run's first lines name the CPUs this process may run on (its affinity, what Slurm's or a
    container's binding left it) and torch's threads, and warn when data.workers asks for more."""
    from tests.helpers.engine_runs import run_engine

    usable = len(os.sched_getaffinity(0))
    env = {"OMP_NUM_THREADS": "2"}  # torch caps it at the machine's cores: ask a fresh interpreter what it gives
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], text=True,
                             capture_output=True, env={**os.environ, **env}, check=True).stdout.strip()
    proc = run_engine(fmnist_tree, tmp_path / "run", f"data.workers={usable + 1}", "train.epochs=1", env=env,
                      args=["--max-steps", "1"])
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"cpus: {usable} usable by this process ("), proc.stderr[-2000:]
    assert f"torch threads {threads}, data.workers {usable + 1}" in lines[0]
    assert lines[1].startswith(f"warning: data.workers = {usable + 1} is more than the {usable} CPUs this process "
                               f"may use")
