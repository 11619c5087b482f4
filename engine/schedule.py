"""Learning-rate schedules as plain functions of the global optimizer step.

``build_schedule(cfg, epochs, steps_per_epoch)`` returns ``lr_at(step)``: the lr for the update
with 0-based global index ``step``; the trainer sets it before each optimizer step. Schedules are
stateless, so resuming at any step needs nothing but the step. Total steps are
``(epochs + cooldown_epochs) * steps_per_epoch``.

- ``cosine``: timm ``CosineLRScheduler`` stepped per update (``t_in_epochs=False``, timm's
  ``sched_on_updates``; timm/scheduler/cosine_lr.py and scheduler_factory.py) with timm's
  ``warmup_prefix=False``, as in "ResNet strikes back" (A1-A3) and ResNet-RS (Bello et al. 2021,
  warmup from 0, min_lr 0). With ``W = warmup_epochs * steps_per_epoch`` and
  ``T = epochs * steps_per_epoch``:
  ``t < W``: ``warmup_lr + t * (lr - warmup_lr) / W``; ``W <= t < T``:
  ``min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2``; ``t >= T`` (cooldown): ``min_lr``.
  Note timm's warmup: it stops one step short of ``lr`` and the cosine is measured from step 0,
  not from the end of warmup, so ``lr`` itself is never used; at 5 of 600 epochs the first
  post-warmup lr is 0.99983 * lr. With ``warmup_lr = 0`` the very first update has lr 0.
- ``step_free_linear``: ffcv-imagenet's per-iteration triangular schedule (train_imagenet.py,
  ``get_cyclic_lr`` at each epoch's ends, interpolated per iteration): linear from ``warmup_lr``
  (ffcv: 1e-4 * lr) to ``lr`` at ``peak_epoch``, then linear to 0 at ``epochs``; ``min_lr`` and
  ``warmup_epochs`` are not used, as in ffcv.
- ``constant``: timm's warmup, then ``lr``.
Every schedule holds ``min_lr`` during ``cooldown_epochs``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from common.config import OptimConfig


def build_schedule(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"schedule needs epochs > 0 and steps_per_epoch > 0, got {epochs}, {steps_per_epoch}")
    lr, warmup_lr, min_lr = cfg.lr, cfg.warmup_lr, cfg.min_lr
    total_main = epochs * steps_per_epoch  # end of the decay; cooldown steps follow at min_lr
    warmup = cfg.warmup_epochs * steps_per_epoch  # may be fractional, as in timm

    def warmed(t: int) -> float | None:
        return warmup_lr + t * (lr - warmup_lr) / warmup if t < warmup else None

    if cfg.schedule == "cosine":
        def lr_at(t: int) -> float:
            w = warmed(t)
            if w is not None:
                return w
            if t >= total_main:
                return min_lr
            return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / total_main))
    elif cfg.schedule == "constant":
        def lr_at(t: int) -> float:
            w = warmed(t)
            if w is not None:
                return w
            return lr if t < total_main else min_lr
    elif cfg.schedule == "step_free_linear":
        peak = cfg.peak_epoch
        if not 0 < peak <= epochs:
            raise ValueError(f"optim.peak_epoch = {peak} must be in (0, epochs = {epochs}]")

        def triangle(e: float) -> float:  # ffcv's get_cyclic_lr at epoch e
            if e < peak:
                return warmup_lr + (lr - warmup_lr) * e / peak
            return lr * max(epochs - e, 0.0) / (epochs - peak) if epochs > peak else 0.0

        def lr_at(t: int) -> float:
            if t >= total_main:
                return min_lr
            # ffcv interpolates linearly between the values at the epoch's two ends (a fractional
            # peak_epoch is therefore cut off); for an integer peak this is the exact triangle.
            e, i = divmod(t, steps_per_epoch)
            start, end = triangle(e), triangle(e + 1)
            return start + (end - start) * i / steps_per_epoch
    else:
        raise ValueError(f"optim.schedule = {cfg.schedule!r} is not one of cosine, step_free_linear, constant")
    return lr_at


def total_steps(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> int:
    """Optimizer steps the schedule covers, cooldown included."""
    return (epochs + cfg.cooldown_epochs) * steps_per_epoch


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every param group (all groups share one schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
