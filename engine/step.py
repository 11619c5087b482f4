"""The training step and the steps of one epoch: plain functions, no callbacks.

Following one step from batch to optimizer: :func:`train_one_epoch` takes a batch from stage 1,
stage 2 augments it, the forward and backward run under autocast (``ctx.scaler`` scales the loss
for fp16), every ``ctx.accum_steps`` micro-batches :func:`_optimizer_step` clips, steps, clears the
gradients and updates the EMA, and the :class:`LossWindow` sums the loss on the device.

Host syncs (docs/design.md, "The hot path"): on CUDA the host must run ahead of the GPU, so a step
reads nothing back. The loss of each micro-batch is summed on the device together with "the first
step whose loss was not finite", and both are read once per log point (``log_every`` optimizer
steps), at the end of the epoch and when a stop is requested. Checkpoints are written only right
after such a read, so a NaN found there is raised before anything is saved (the last good checkpoint
stays). ``tests/test_host_syncs.py`` counts the syncs of real steps: none between log points with
bf16 and fp32. With fp16, torch's ``GradScaler.step`` reads its inf/NaN flag every step (it decides
on the host whether to skip ``optimizer.step()``): one deliberate sync per step, as in timm.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from common.config import Config
from engine.distributed import all_reduce_min, all_reduce_sum
from engine.ema import EMA
from engine.losses import build_loss
from engine.optim import build_optimizer, clear_grads
from engine.schedule import apply_lr, build_schedule
from engine.state import EpochProgress, NonFiniteLossError, StopReason, advice
from models.factory import create_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

@dataclass
class StepContext:
    """What a training step needs besides the batch, built by :func:`build_step` as every user
    builds it (the engine, the throughput profiler and the GPU check time the very same step).
    The run then wraps ``model`` (DDP, ``torch.compile``) and sets ``accum_steps``/``is_ddp``."""

    model: nn.Module  # the module that is called: plain, or DDP-wrapped and/or compiled
    raw_model: nn.Module  # the underlying module (EMA, checkpoints, BN averaging)
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    lr_at: Callable[[int], float]
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device
    accum_steps: int = 1
    grad_clip: float = 0.0
    ema: EMA | None = None
    is_ddp: bool = False

def build_step(cfg: Config, device: torch.device, steps_per_epoch: int) -> StepContext:
    """Model (channels-last when the recipe says so), optimizer, schedule, loss, GradScaler (on for
    fp16 only) and EMA from a recipe whose ``train.precision`` is already resolved."""
    t = cfg.train
    model = create_model(cfg.model, cfg.data.num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return StepContext(model=model, raw_model=model, optimizer=build_optimizer(model, cfg.optim),
                       lr_at=build_schedule(cfg.optim, t.epochs, steps_per_epoch),
                       loss_fn=build_loss(cfg.loss, cfg.data.num_classes).to(device),
                       scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
                       precision=t.precision, device=device, grad_clip=t.grad_clip,
                       ema=EMA(model, t.ema_decay) if t.ema_decay > 0 else None)

def autocast(ctx: StepContext):
    if ctx.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=DTYPES[ctx.precision])

# fp16's dynamic loss scale halves at every step whose gradients overflow; below this floor every
# step is being skipped and the run has diverged (fairseq's ``--min-loss-scale`` default, 1e-4:
# ``fairseq/optim/dynamic_loss_scaler.py`` raises "Minimum loss scale reached" there).
MIN_LOSS_SCALE = 1e-4

@dataclass
class WindowReading:
    """What a log point reads of the loss window, over all ranks."""

    mean: float  # mean of the finite micro-batch losses; NaN when none was finite
    count: int  # micro-batches
    images: int
    first_bad: int | None  # first step with a non-finite loss (bf16/fp32 only), or None
    nonfinite: int  # micro-batches whose loss was NaN/Inf
    scale: float | None = None  # fp16: GradScaler's loss scale now

class LossWindow:
    """Loss sum, non-finite count and the first non-finite step since the last log point, kept on
    the device.

    ``add`` queues a few tiny kernels and reads nothing; ``read`` is the one deliberate sync (all
    ranks' sums, the earliest bad step on any rank). With fp16, GradScaler skips the steps whose
    gradients overflowed, so a non-finite loss is counted and left out of the mean instead of
    stopping the run at once (``check_finite=False``); :func:`_check` then stops a window in which
    no loss was finite, or whose loss scale collapsed below :data:`MIN_LOSS_SCALE`."""

    def __init__(self, device: torch.device, start_loss: float, start_count: int, start_nonfinite: int,
                 check_finite: bool, scaler: torch.amp.GradScaler | None = None):
        self.device, self.check_finite = device, check_finite
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.acc = torch.zeros(3, dtype=torch.float64, device=device)  # [finite loss sum, non-finite, first bad]
        self.acc[0] += start_loss  # Python scalars: no host-to-device copy
        self.acc[1] += start_nonfinite
        self.acc[2] = math.inf
        self.count = start_count  # micro-batches, a host number
        self.images = 0

    def add(self, loss: torch.Tensor, step: int, images: int) -> None:
        value = loss.detach().double()
        finite = torch.isfinite(value)
        self.acc[0] += torch.where(finite, value, 0.0)
        self.acc[1] += ~finite
        if self.check_finite:
            torch.minimum(self.acc[2], torch.where(finite, math.inf, float(step)), out=self.acc[2])
        self.count += 1
        self.images += images

    def read(self) -> WindowReading:
        """The window over all ranks (a collective: every rank calls it at the same step); resets."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums[0:2] = self.acc[0:2]
        sums[2], sums[3] = self.count, self.images  # scalar fills: no host-to-device copy
        all_reduce_sum(sums)
        bad = all_reduce_min(self.acc[2:3].clone())
        # Deliberate sync: once per log point, the end of an epoch or a stop.
        loss_sum, nonfinite, count, images, first_bad = torch.cat([sums, bad]).tolist()
        # fp16 only, at a log point: GradScaler's scale (the same on every rank: DDP's averaged
        # gradients overflow on all ranks alike); one more read, where the step already syncs.
        scale = self.scaler.get_scale() if self.scaler is not None else None
        self.reset()
        mean = loss_sum / (count - nonfinite) if count > nonfinite else math.nan
        return WindowReading(mean, int(count), int(images), None if math.isinf(first_bad) else int(first_bad),
                             int(nonfinite), scale)

    def read_local(self) -> tuple[float, int, int, int, int | None]:
        """This rank's (finite loss sum, micro-batches, non-finite micro-batches, images, first
        non-finite step) as they stand, for a checkpoint written between log points (the sums stay
        per rank). A sync, at a stop or the end of an epoch only."""
        loss_sum, nonfinite, first_bad = self.acc.tolist()
        return loss_sum, self.count, int(nonfinite), self.images, (None if math.isinf(first_bad) else int(first_bad))

    def reset(self) -> None:
        self.acc.zero_()
        self.acc[2] = math.inf
        self.count, self.images = 0, 0

def _check(r: WindowReading, ctx: StepContext, prog: "EpochProgress", loss_limit: float) -> None:
    """Stops a diverging run (the same verdict on every rank: ``r`` is reduced over ranks)."""
    if r.first_bad is not None:
        raise NonFiniteLossError(f"loss is NaN/Inf at step {r.first_bad} (epoch {prog.epoch}); "
                                 f"{advice(ctx.precision)}", step=r.first_bad)
    if r.count and r.nonfinite == r.count:
        raise NonFiniteLossError(f"every loss of the {r.count} micro-batches up to step {prog.step} (epoch {prog.epoch}) "
                                 f"is NaN/Inf, also under fp16 loss scaling: the run is diverging; "
                                 f"{advice(ctx.precision)}", step=prog.step)
    if r.scale is not None and r.scale < MIN_LOSS_SCALE:
        raise NonFiniteLossError(f"the fp16 loss scale collapsed to {r.scale:.3g} (below {MIN_LOSS_SCALE:g}) by step "
                                 f"{prog.step} (epoch {prog.epoch}): gradients overflow at every step, so every "
                                 f"step is skipped; {advice(ctx.precision)}", step=prog.step)
    if loss_limit > 0 and r.mean > loss_limit:
        raise NonFiniteLossError(f"mean loss {r.mean:.3g} up to step {prog.step} (epoch {prog.epoch}) is above "
                                 f"train.loss_limit={loss_limit:g}: the run is diverging; {advice(ctx.precision)}",
                                 step=prog.step)

def _no_tick(phase: str) -> None:
    pass


def train_one_epoch(ctx: StepContext, pipeline, stage2, prog: EpochProgress, *, steps_per_epoch: int,
                    log_every: int, stop: Any = None, max_steps: int | None = None,
                    loss_limit: float = 0.0, tick: Callable[[str], None] = _no_tick) -> Iterator[dict[str, Any]]:
    """Trains the rest of ``prog.epoch`` from ``prog.batch``, yielding one record at every log point
    (every ``log_every``-th optimizer step *within the epoch*, as timm counts ``batch_idx``, and the
    epoch's last step); the caller logs it and makes its decisions (checkpoint, stop) there, where the
    loss window has just been read and checked. A record's ``batch`` is its optimizer step within the
    epoch (1-based); the epoch's last record also carries the epoch's wall time, images/s and
    data-wait fraction (``epoch_time_s``, ``epoch_images_per_s``, ``epoch_data_wait_frac``).

    Stops early when ``stop.requested`` is set (``stop``: any object with that attribute; pass
    None under DDP, where ranks agree on stopping at log points) or at ``max_steps``: the window is
    then read into ``prog`` (so a checkpoint written now resumes the running sums exactly) and the
    last record carries ``"stopped"``. ``prog.window_*`` are up to date at every yield. Micro-batches beyond the last full accumulation group are not used. Raises
    :class:`NonFiniteLossError` at the log point that finds a NaN/Inf loss or a mean above
    ``loss_limit`` (0 = no limit). ``tick(phase)`` is told where the loop is ("data": waiting for a
    batch, "step": the step and its all-reduce) at every micro-batch: the failure board's
    watcher (``engine.failures``) reports a rank that stops making progress.
    """
    ctx.model.train()
    usable = steps_per_epoch * ctx.accum_steps
    window = LossWindow(ctx.device, prog.window_loss, prog.window_count, prog.window_nonfinite,
                        check_finite=ctx.precision != "fp16", scaler=ctx.scaler)
    window_start = time.perf_counter()
    window_wait = 0.0
    it = iter(pipeline)
    while prog.batch < usable:
        tick("data")
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        window_wait += time.perf_counter() - t0
        tick("step")
        micro = prog.batch % ctx.accum_steps
        if micro == 0:
            apply_lr(ctx.optimizer, ctx.lr_at(prog.step))
        prog.skipped_images += len(getattr(batch, "skipped", ()))
        images, targets = stage2(batch)
        last_micro = micro == ctx.accum_steps - 1
        sync = contextlib.nullcontext() if (last_micro or not ctx.is_ddp) else ctx.model.no_sync()
        with sync:
            with autocast(ctx):
                logits = ctx.model(images)
                loss = ctx.loss_fn(logits.float(), targets)
            ctx.scaler.scale(loss / ctx.accum_steps).backward()
        window.add(loss, prog.step, images.shape[0])
        prog.batch += 1
        if not last_micro:
            continue
        _optimizer_step(ctx)
        prog.step += 1
        stopping = StopReason.SIGNAL if stop is not None and stop.requested else None
        if max_steps is not None and prog.step >= max_steps:
            stopping = StopReason.MAX_STEPS
        step_in_epoch = prog.batch // ctx.accum_steps
        epoch_done = prog.batch >= usable
        if step_in_epoch % log_every == 0 or epoch_done:
            reading = window.read()
            _check(reading, ctx, prog, loss_limit)
            world_images = reading.images
            elapsed = time.perf_counter() - window_start
            prog.epoch_time_s += elapsed
            prog.epoch_wait_s += window_wait
            prog.epoch_images += world_images
            record = {"epoch": prog.epoch, "step": prog.step, "batch": step_in_epoch,
                      "lr": ctx.optimizer.param_groups[0]["lr"],
                      "train_loss": reading.mean, "images_per_s": world_images / max(elapsed, 1e-9),
                      "data_wait_frac": min(1.0, window_wait / max(elapsed, 1e-9)),
                      "skipped_images": prog.skipped_images}
            if epoch_done:
                record.update(epoch_time_s=prog.epoch_time_s,
                              epoch_images_per_s=prog.epoch_images / max(prog.epoch_time_s, 1e-9),
                              epoch_data_wait_frac=min(1.0, prog.epoch_wait_s / max(prog.epoch_time_s, 1e-9)))
            window_wait = 0.0
            window_start = time.perf_counter()
            prog.window_loss, prog.window_count, prog.window_nonfinite = 0.0, 0, 0
            yield record if stopping is None else {**record, "stopped": stopping}
        elif stopping is not None:
            # A stop between log points: a lone process's stop request, or max_steps, which every
            # rank reaches at the same step. The time and images since the last log point still
            # belong to this epoch.
            prog.epoch_images += _keep_window(window, ctx, prog)
            prog.epoch_time_s += time.perf_counter() - window_start
            prog.epoch_wait_s += window_wait
            yield {"epoch": prog.epoch, "step": prog.step, "stopped": stopping}
        if stopping is not None:
            return
    # The pipeline ran dry before the last full step (or the epoch ended at a log point): keep what
    # the window holds. A sync, once per epoch.
    _keep_window(window, ctx, prog)

def _keep_window(window: LossWindow, ctx: StepContext, prog: EpochProgress) -> int:
    """This rank's loss sums since the last log point into ``prog`` (a checkpoint written now
    resumes them exactly, per rank), after checking them for a non-finite loss; returns the images
    of the window on all ranks. Under DDP every rank calls it at the same step (a stop at
    ``max_steps``, the end of an epoch), so the first bad step and the images are agreed with two
    small collectives and every rank reaches the same verdict. The fp16 rules wait for the next log
    point, which reads these sums again: a partial window is too short to judge."""
    loss_sum, count, nonfinite, images, first_bad = window.read_local()
    if ctx.is_ddp:
        bad = all_reduce_min(torch.tensor([math.inf if first_bad is None else float(first_bad)], dtype=torch.float64,
                                          device=ctx.device))
        total = all_reduce_sum(torch.tensor([float(images)], dtype=torch.float64, device=ctx.device))
        # deliberate sync: at a stop or the end of an epoch only
        first_bad = None if math.isinf(bad.item()) else int(bad.item())
        images = int(total.item())
    _check(WindowReading(0.0, count, images, first_bad, 0), ctx, prog, 0.0)
    prog.window_loss, prog.window_count, prog.window_nonfinite = loss_sum, count, nonfinite
    return images

def _optimizer_step(ctx: StepContext) -> None:
    if ctx.grad_clip > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.raw_model.parameters(), ctx.grad_clip)
    ctx.scaler.step(ctx.optimizer)  # fp16 only: GradScaler reads its inf flag here (a sync)
    ctx.scaler.update()
    clear_grads(ctx.optimizer)
    if ctx.ema is not None:
        ctx.ema.update(ctx.raw_model)
