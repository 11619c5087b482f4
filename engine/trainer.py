"""The training step, one epoch of it, and evaluation: plain functions, no callbacks.

Hot-path rules (DESIGN.md): no ``.item()`` or ``synchronize`` per step on CUDA; losses are summed
on the device and read every ``log_every`` steps. The non-finite-loss check reads the previous
step's flag through a pinned buffer, so a NaN is caught within one step without stalling the GPU.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.distributed import all_reduce_sum

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/Inf outside fp16 loss scaling; the run stops, the last good checkpoint stays."""


@dataclass
class StepContext:
    """What the step needs besides the batch; built once by the run set-up."""

    model: nn.Module  # the DDP-wrapped (or plain / compiled) module that is called
    raw_model: nn.Module  # the underlying module (EMA, checkpoints)
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    lr_at: Callable[[int], float]
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device
    accum_steps: int
    grad_clip: float = 0.0
    ema: Any = None
    is_ddp: bool = False


@dataclass
class EpochProgress:
    """Position and running sums inside an epoch; saved in checkpoints so a resume is exact."""

    epoch: int = 0
    batch: int = 0  # micro-batches consumed in this epoch
    step: int = 0  # global optimizer steps done
    window_loss: float = 0.0  # loss summed since the last log point (micro-batch means)
    window_count: int = 0
    skipped_steps: int = 0  # fp16 steps skipped by the grad scaler

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def autocast(ctx: StepContext):
    if ctx.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=DTYPES[ctx.precision])


class NonFiniteGuard:
    """Checks that losses are finite without a per-step host sync on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: tuple[torch.Tensor, torch.cuda.Event, int] | None = None
        self.buf = torch.zeros(1, dtype=torch.bool, pin_memory=self.cuda)

    def check(self, loss: torch.Tensor, step: int) -> int | None:
        """Returns the step whose loss was non-finite, if one is now known."""
        bad = ~torch.isfinite(loss.detach()).reshape(1)
        if not self.cuda:
            return step if bool(bad) else None
        found = None
        if self.pending is not None:
            buf, event, pstep = self.pending
            event.synchronize()
            if bool(buf):
                found = pstep
        buf = torch.empty(1, dtype=torch.bool, pin_memory=True)
        buf.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (buf, event, step)
        return found

    def flush(self) -> int | None:
        if self.pending is None:
            return None
        buf, event, pstep = self.pending
        event.synchronize()
        self.pending = None
        return pstep if bool(buf) else None


def train_one_epoch(ctx: StepContext, pipeline, stage2, prog: EpochProgress, *, steps_per_epoch: int,
                    log_every: int, on_log: Callable[[dict[str, Any]], None],
                    after_step: Callable[[EpochProgress], bool], max_steps: int | None = None) -> bool:
    """Runs the rest of ``prog.epoch`` from ``prog.batch``; returns False when asked to stop early.

    ``after_step`` is called after each optimizer step (checkpoint timers, stop requests) and
    returns False to stop. Micro-batches beyond the last full accumulation group are not used.
    """
    ctx.model.train()
    guard = NonFiniteGuard(ctx.device)
    usable = steps_per_epoch * ctx.accum_steps
    window_start = time.perf_counter()
    window_wait = 0.0
    window_images = 0
    window_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    window_loss += prog.window_loss
    window_count = prog.window_count
    it = iter(pipeline)
    while prog.batch < usable:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        window_wait += time.perf_counter() - t0
        micro = prog.batch % ctx.accum_steps
        if micro == 0:
            lr = ctx.lr_at(prog.step)
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
        images, targets = stage2(batch)
        last_micro = micro == ctx.accum_steps - 1
        sync = contextlib.nullcontext() if (last_micro or not ctx.is_ddp) else ctx.model.no_sync()
        with sync:
            with autocast(ctx):
                logits = ctx.model(images)
                loss = ctx.loss_fn(logits.float(), targets)
            ctx.scaler.scale(loss / ctx.accum_steps).backward()
        bad_step = guard.check(loss, prog.step)
        if bad_step is not None and ctx.precision != "fp16":
            raise NonFiniteLossError(f"loss is NaN/Inf at step {bad_step} (epoch {prog.epoch}); stopped, the last "
                                     f"good checkpoint is kept. Lower optim.lr or use train.precision=fp32/bf16")
        window_loss += loss.detach().double()
        window_count += 1
        window_images += images.shape[0]
        prog.batch += 1
        if not last_micro:
            continue
        _optimizer_step(ctx)
        prog.step += 1
        done = prog.batch >= usable
        if prog.step % log_every == 0 or done:
            loss_sum = all_reduce_sum(torch.stack([window_loss, torch.tensor(float(window_count), device=ctx.device,
                                                                             dtype=torch.float64)]))
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_start
            world_images = float(all_reduce_sum(torch.tensor([float(window_images)], device=ctx.device))[0])
            on_log({"epoch": prog.epoch, "step": prog.step, "lr": ctx.optimizer.param_groups[0]["lr"],
                    "train_loss": float(loss_sum[0] / max(loss_sum[1], 1.0)),
                    "images_per_s": world_images / max(elapsed, 1e-9),
                    "data_wait_frac": min(1.0, window_wait / max(elapsed, 1e-9))})
            window_loss.zero_()
            window_count, window_images, window_wait = 0, 0, 0.0
            window_start = time.perf_counter()
        prog.window_loss, prog.window_count = float(window_loss), window_count
        if not after_step(prog) or (max_steps is not None and prog.step >= max_steps):
            return False
    bad_step = guard.flush()
    if bad_step is not None and ctx.precision != "fp16":
        raise NonFiniteLossError(f"loss is NaN/Inf at step {bad_step} (epoch {prog.epoch}); stopped, the last "
                                 f"good checkpoint is kept. Lower optim.lr or check the data")
    return True


def _optimizer_step(ctx: StepContext) -> None:
    if ctx.grad_clip > 0:
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.raw_model.parameters(), ctx.grad_clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.ema is not None:
        ctx.ema.update(ctx.raw_model)


@torch.no_grad()
def evaluate(model: nn.Module, pipeline, stage2, *, device: torch.device, precision: str,
             flip_tta: bool = False) -> dict[str, float]:
    """Top-1/top-5 and CE loss over the whole val set, summed across ranks.

    ``flip_tta``: average the softmax of each image and its horizontal mirror (flip test-time
    augmentation; probabilities, not logits, are averaged); the loss is then the NLL of that
    average. Off in training, so the engine's figures are single-view.
    """
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss, count
    ctx_autocast = (contextlib.nullcontext() if precision == "fp32"
                    else torch.autocast(device_type=device.type, dtype=DTYPES[precision]))
    for batch in pipeline:
        images, labels = stage2(batch)
        with ctx_autocast:
            logits = model(images)
            flipped = model(images.flip(3)) if flip_tta else None
        logits = logits.float()
        if flipped is not None:
            log_probs = torch.logsumexp(torch.stack([logits.log_softmax(1), flipped.float().log_softmax(1)]), 0)
            logits = log_probs - math.log(2.0)  # log of the mean probability: ranks and NLL as the average
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
    all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return {"val_top1": 100.0 * float(sums[0]) / n, "val_top5": 100.0 * float(sums[1]) / n,
            "val_loss": float(sums[2]) / n, "val_images": int(sums[3])}
