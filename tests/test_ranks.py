"""Every rank trains, reports and resumes the same model, and no failure on one rank is silent.

* The EMA starts from the model DDP broadcast, not from each rank's own initialisation, so every
  rank holds the same EMA (before: each rank deep-copied its own ``seed + rank`` init, and
  evaluation averaged the top-1 of N different EMAs).
* The EMA averages BatchNorm statistics as timm's ``ModelEmaV3`` does (before: it copied the live
  model's, evaluating lagging weights with today's statistics).
* A failure on one rank alone ends every rank within seconds, also one blocked where no error would
  ever reach it (as in an NCCL collective). The end-to-end cases (a data error on rank 1 under
  torchrun; a 4-rank resume that is bit-identical) are fault cases: tests/test_faults.py.
* DDP samples its runtime statistics (a host sync per sample on CUDA) on its first 10 iterations only.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.process_exit import exit_without_teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- EMA
SMALL = ["model.arch=resnet_tiny", "data.pipeline=synthetic", "data.num_classes=10", "train.global_batch_size=16",
         "train.train_res=16", "train.precision=fp32", "train.ema_decay=0.9", "augment.rand_augment=",
         "augment.mixup_alpha=0", "augment.cutmix_alpha=0", "optim.warmup_epochs=0", "train.log_every=2"]


def _in_group(work):
    """Run ``work(rank, world, folder)`` in a gloo group of its own; the DDP objects it made are gone
    before the group is destroyed (a Reducer freed after ``destroy_process_group`` can deadlock)."""
    def worker(rank: int, world: int, port: int, folder: str) -> None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        try:
            work(rank, world, folder)
        finally:
            dist.destroy_process_group()
        # then end as the engine ends (common/process_exit.py): the interpreter's teardown of a process
        # that ran gloo can abort on a thread still joinable ("terminate called without an active
        # exception", SIGABRT; seen once in a loaded full-suite run) after the work has passed
        exit_without_teardown(0)
    return worker


def _ema_work(rank: int, world: int, folder: str) -> None:
    """What ``engine.loop._train`` does on one rank, up to k steps: the rank's own seed, the
    model and EMA it builds, DDP, then the engine's epoch loop."""
    from common.config import load_config
    from engine.distributed import DistInfo
    from engine.setup import set_up_device, wrap_for_training
    from engine.state import EpochProgress
    from engine.step import build_step, train_one_epoch
    from pipelines.build import build_stage2
    from pipelines.synthetic import SyntheticPipeline

    d = DistInfo(rank, world, rank, torch.device("cpu"))
    cfg = set_up_device(load_config("recipes/a3.toml", SMALL), d)  # seeds with seed + rank
    ctx = build_step(cfg, d.device, 4)
    wrap_for_training(ctx, d, 1, False, input_shape=(8, 3, 16, 16), channels_last=True, ema_from_model=True)
    pipe = SyntheticPipeline(batch_size=8, res=16, num_classes=10, num_samples=32, seed=rank, channels_last=True)
    stage2 = build_stage2(cfg.data, cfg.augment, train=True, seed=rank)
    for _ in train_one_epoch(ctx, pipe, stage2, EpochProgress(), steps_per_epoch=4, log_every=2):
        pass
    ema = {k: v.clone() for k, v in ctx.ema.module.named_parameters()}
    model = {k: v.detach().clone() for k, v in ctx.raw_model.named_parameters()}
    torch.save({"ema": ema, "model": model}, f"{folder}/{rank}.pt")


def _ema_worker(rank: int, world: int, port: int, folder: str) -> None:
    _in_group(_ema_work)(rank, world, port, folder)


def test_every_rank_holds_the_same_ema(tmp_path):
    mp.spawn(_ema_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])  # DDP's job
    moved = [k for k in r0["ema"] if not torch.equal(r0["ema"][k], r0["model"][k])]
    assert moved, "the EMA did not move"
    differ = [k for k in r0["ema"] if not torch.equal(r0["ema"][k], r1["ema"][k])]
    assert not differ, f"ranks hold different EMAs: {differ[:3]}"


def test_ema_averages_batchnorm_statistics_as_timm_model_ema_v3():
    """The same updates into ours and timm's ModelEmaV3 (timm/utils/model_ema.py, fixed decay):
    parameters, running mean/var and num_batches_tracked identical, bit for bit."""
    from timm.utils import ModelEmaV3

    from common.config import ModelConfig
    from engine.ema import EMA
    from models.factory import create_model

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="resnet_tiny"), 10)
    ours, theirs = EMA(model, 0.9), ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(4):
        model.train()
        loss = model(torch.randn(8, 3, 16, 16) * (i + 1) + i).logsumexp(1).mean()  # shifts BN's statistics
        loss.backward()
        opt.step()
        opt.zero_grad()
        ours.update(model)
        theirs.update(model)
    got, want = ours.module.state_dict(), theirs.module.state_dict()
    stats = [k for k in want if k.endswith("running_mean")]
    assert stats and not torch.equal(got[stats[0]], model.state_dict()[stats[0]])  # lagging, not copied
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------- failures
def _stuck_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank 1 fails; rank 0 is 'in a collective' that never returns (as NCCL's would, for its
    timeout): only the failure board can end it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from engine.failures import FailureBoard

    board = FailureBoard(rank, world)
    if rank == 1:
        board.fail("error: the disk of node 2 is gone", 2)
        board.close()
        Path(folder, "1.done").write_text(str(time.monotonic()))
        os._exit(2)
    t0 = time.monotonic()
    Path(folder, "0.blocked").write_text(str(t0))
    while time.monotonic() - t0 < 120:
        time.sleep(0.1)
    Path(folder, "0.timeout").write_text("rank 0 was never ended")


def test_the_failure_board_ends_a_rank_blocked_where_no_error_reaches_it(tmp_path):
    port = _free_port()
    ctx = mp.start_processes(_stuck_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    t0 = time.monotonic()
    for p in ctx.processes:
        p.join(timeout=150)
    took = time.monotonic() - t0
    codes = [p.exitcode for p in ctx.processes]
    assert codes == [2, 2], codes
    assert not (tmp_path / "0.timeout").exists() and took < 60, took


# --------------------------------------------------------------------------- DDP's runtime statistics
def _stats_work(rank: int, world: int, folder: str) -> None:
    from common.config import load_config
    from engine.distributed import DistInfo
    from engine.setup import set_up_device, wrap_for_training
    from engine.step import build_step

    d = DistInfo(rank, world, rank, torch.device("cpu"))
    cfg = set_up_device(load_config("recipes/a3.toml", SMALL), d)
    ctx = build_step(cfg, d.device, 4)
    ctx.raw_model = ctx.model = torch.nn.Linear(4, 2)
    ctx.optimizer = torch.optim.SGD(ctx.raw_model.parameters(), lr=0.1)
    ctx.ema = None
    wrap_for_training(ctx, d, 1, False, input_shape=(2, 4), channels_last=False, ema_from_model=False)
    recorded = []
    for _ in range(200):
        ctx.model(torch.randn(2, 4)).sum().backward()
        recorded.append(ctx.model._get_ddp_logging_data().get("avg_forward_compute_time", 0))
    # a new average is written whenever DDP samples its statistics
    Path(folder, f"{rank}.json").write_text(json.dumps(len(set(recorded))))


def _stats_worker(rank: int, world: int, port: int, folder: str) -> None:
    _in_group(_stats_work)(rank, world, port, folder)


def test_ddp_runtime_statistics_are_not_sampled_after_the_first_ten_steps(tmp_path):
    """torch samples DDP's runtime statistics on iterations 1-10 and every 100th (a CUDA event
    synchronize each time); after wrapping the engine sets the rate so that only the first 10 remain:
    over 200 iterations the recorded average changes at most 10 times (12 when every 100th is sampled)."""
    mp.spawn(_stats_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    changes = json.loads((tmp_path / "0.json").read_text())
    assert 1 <= changes <= 10, changes
