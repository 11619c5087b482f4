"""Setting a run up before its first step: the batch's composition over devices and accumulation,
the device's precision and seeds, the pipelines, and the model's wrapping (DDP, torch.compile) with
what makes every rank and every start train the same model."""
from __future__ import annotations

import os
import socket
import sys
import warnings
from dataclasses import replace

import torch
import torch.nn as nn

from common.config import Config, ConfigError
from engine.distributed import DistInfo, gather_objects
from engine.optim import clear_grads
from engine.precision import resolve_precision
from engine.progressive import resolution_for_epoch
from engine.step import StepContext, autocast
from pipelines.base import DataError
from pipelines.build import build_train_pipeline, build_val_pipeline, check_num_classes

def batch_composition(global_batch: int, world: int, per_device: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) such that their product x world = global batch.
    A batch that cannot be composed is one line naming the values that would work."""
    if global_batch % world:
        below = global_batch - global_batch % world
        near = _divisors(global_batch)
        fewer, more = max(d for d in near if d < world), min((d for d in near if d > world), default=None)
        counts = f"{fewer}" + (f" or {more}" if more else "")
        sizes = " or ".join(str(b) for b in (below, below + world) if b > 0)
        raise ConfigError(f"train.global_batch_size {global_batch} does not split over {world} processes: set a global "
                          f"batch that does (e.g. train.global_batch_size={sizes}), or use a process count that divides "
                          f"{global_batch} (e.g. {counts})")
    per_process = global_batch // world
    if per_device == 0:
        per_device = per_process
    if per_process % per_device:
        fits = [d for d in _divisors(per_process) if d <= per_device]
        raise ConfigError(f"train.per_device_batch_size {per_device} does not divide the {per_process} images per process "
                          f"(global batch {global_batch} / {world} processes): set one that does, e.g. "
                          f"train.per_device_batch_size={fits[-1]} ({per_process // fits[-1]} accumulation steps)")
    return per_device, per_process // per_device


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]

def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

def set_up_device(cfg: Config, d: DistInfo) -> Config:
    """The recipe with ``train.precision`` resolved for this device; cuDNN flags and seeds set."""
    t = cfg.train
    precision = resolve_precision(t.precision, d.device, warn=say if d.is_main else quiet)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(t.seed + d.rank)
    return replace(cfg, train=replace(t, precision=precision))

def cpu_lines(data_workers: int, d: DistInfo) -> list[str]:
    """What every rank may run on, said once by rank 0 (a collective: every rank calls it): the CPUs
    in each process's affinity mask (``os.sched_getaffinity``: what Slurm's ``task/affinity`` or
    ``task/cgroup`` binding, ``taskset`` or a container left it; ``os.cpu_count`` would count the
    node's) and torch's intra-op threads, which the step, stage 2 and evaluation run on. A rank
    given fewer CPUs than ``data.workers`` decodes on CPUs shared with its own step: the line
    becomes a warning. Up to 8 ranks are named one by one, more are grouped by what they got."""
    mine = (socket.gethostname(), sorted(os.sched_getaffinity(0)), torch.get_num_threads())
    everyone = gather_objects(mine, d)
    if not d.is_main:
        return []
    if not d.enabled:
        host, cpus, threads = mine
        lines = [f"cpus: {len(cpus)} usable by this process ({_ranges(cpus)}), torch threads {threads}, "
                 f"data.workers {data_workers}"]
    elif d.world_size <= 8:
        lines = ["cpus: " + "; ".join(f"rank {r} on {h}: {len(c)} usable ({_ranges(c)}), torch threads {t}"
                                      for r, (h, c, t) in enumerate(everyone)) + f"; data.workers {data_workers}"]
    else:
        groups: dict[tuple[int, int], list[int]] = {}
        for r, (_, c, t) in enumerate(everyone):
            groups.setdefault((len(c), t), []).append(r)
        lines = ["cpus: " + "; ".join(f"{n} usable, torch threads {t} on ranks {_ranges(rs)}"
                                      for (n, t), rs in groups.items()) + f"; data.workers {data_workers}"]
    short = [r for r, (_, c, _) in enumerate(everyone) if len(c) < data_workers]
    if short:
        fewest = min(len(everyone[r][1]) for r in short)
        where = "" if not d.enabled else f" ({'ranks' if len(short) > 1 else 'rank'} {_ranges(short)})"
        lines.append(f"warning: data.workers = {data_workers} is more than the {fewest} CPUs this process may use"
                     f"{where}: decoding shares them with the step; give each rank more CPUs (Slurm: "
                     f"--cpus-per-task, which srun must be given too) or lower data.workers")
    return lines


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (taskset's and Slurm's notation)."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def say(msg: str) -> None:
    """A line of the run for the user: stderr, where the run's progress and errors go."""
    print(msg, file=sys.stderr, flush=True)

def quiet(msg: str) -> None:
    """Where rank 0 alone reports: the other ranks' sink."""

def build_pipelines(cfg: Config, d: DistInfo, per_device: int, accum: int, epochs_total: int):
    """(train pipeline at the first epoch's resolution, val pipeline, optimizer steps per epoch)."""
    t = cfg.train
    res0 = resolution_for_epoch(t.progressive, 0, epochs_total, t.train_res)
    train_pipe = build_train_pipeline(cfg.data, cfg.augment, res=res0, batch_size=per_device, rank=d.rank,
                                      world_size=d.world_size, device=d.device, seed=t.seed,
                                      channels_last=t.channels_last)
    val_pipe = build_val_pipeline(cfg.data, cfg.eval, rank=d.rank, world_size=d.world_size, device=d.device)
    check_num_classes(cfg.data, train_pipe)
    steps_per_epoch = len(train_pipe) // accum
    if steps_per_epoch == 0:
        raise DataError(f"the train set gives {len(train_pipe)} batches per process, fewer than one optimizer step "
                        f"({accum} batches); lower train.global_batch_size")
    return train_pipe, val_pipe, steps_per_epoch

def compile_for_training(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` as the engine uses it: static shapes, so a progressive-resolution run
    compiles once per training resolution and reuses each graph (``dynamic=None`` would switch to
    a dynamic-shape graph at the second resolution). Evaluation runs the uncompiled module.
    ``backend`` is for tests (the default is what training uses)."""
    return torch.compile(module, dynamic=False, backend=backend)

def wrap_for_training(ctx: StepContext, d: DistInfo, accum: int, compile: bool, *, input_shape: tuple[int, ...],
                       channels_last: bool, ema_from_model: bool) -> None:
    """DDP (when distributed) and torch.compile around ``ctx.raw_model``; the step calls ``ctx.model``.

    Under DDP, three things make every rank, and every start of the run, train the same model:

    * DDP broadcasts rank 0's weights into every rank's model at construction (each rank built its
      own from ``seed + rank``); the EMA then starts from that model (``ema_from_model``: a fresh
      start), not from the rank's own initialisation (``engine.ema``).
    * The gradient bucket layout is the same at every start (:func:`_settle_ddp_buckets`).
    * DDP's runtime statistics are sampled only on the first 10 iterations, not every 100th: on
      CUDA each sample synchronises the host (``Reducer::should_collect_runtime_stats``,
      ``CudaTimer::measureDifference``); the first 10 cannot be turned off.
    """
    ctx.accum_steps, ctx.is_ddp = accum, d.enabled
    if d.enabled:
        with warnings.catch_warnings():
            # broadcast_buffers=False is what we need: each rank keeps its own BatchNorm statistics
            # (restored per rank on resume), so buffers must not be synced at construction either,
            # which the suggested forward_sync_buffers=False would still do.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning)
            ctx.model = nn.parallel.DistributedDataParallel(
                ctx.raw_model, device_ids=[d.device.index] if d.device.type == "cuda" else None, bucket_cap_mb=64,
                gradient_as_bucket_view=True, broadcast_buffers=False)
        ctx.model._set_ddp_runtime_logging_sample_rate(DDP_STATS_NEVER)
    if ctx.ema is not None and ema_from_model:
        ctx.ema.set(ctx.raw_model)
    if compile:
        ctx.model = compile_for_training(ctx.model)
    if d.enabled:
        _settle_ddp_buckets(ctx, input_shape, channels_last)

DDP_STATS_NEVER = 2**31 - 1  # DDP's runtime-statistics sample rate: "every 2^31-1 iterations" = never after the first 10

def _settle_ddp_buckets(ctx: StepContext, input_shape: tuple[int, ...], channels_last: bool) -> None:
    """One throw-away forward and backward on zeros, so that DDP rebuilds its gradient buckets
    (in the order gradients became ready) before the first real step of this process.

    Why: DDP reduces the first iteration of a process in one bucket in parameter order, and every
    later one in the rebuilt buckets. A resumed process would reduce its first step in the other
    layout than the uninterrupted run did at that step; the ring all-reduce then sums each element
    in another rank order, and with more than two ranks (a + b + c != c + a + b in floating point)
    the weights would differ in the last bits. Here every process, fresh or resumed, takes all its
    real steps in the rebuilt layout. The zeros' gradients are dropped, and the BatchNorm
    statistics and random states the forward touched are restored, so the run is as if it had
    not happened."""
    model = ctx.raw_model
    buffers = [b.detach().clone() for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else None
    # the layout stage 2 gives the real batches, so a compiled model reuses this graph
    x = torch.zeros(input_shape, device=ctx.device).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ctx.model.train()
    with autocast(ctx):
        out = ctx.model(x)
    (out.float().sum() * 0.0).backward()
    clear_grads(ctx.optimizer)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
