"""The engine's own step fed without stage 1: A1's settings on a small model, batches already on
the device, and the step context the engine builds."""
from __future__ import annotations

import torch

from common.config import load_config
from engine.step import StepContext, build_step
from pipelines.augment import Stage2
from pipelines.base import Batch
from tests.helpers.host_sync import HostSyncCounter


A1_SMALL = ["model.arch=resnet_tiny", "data.num_classes=10", "train.ema_decay=0.99", "train.precision=bf16"]


def a1_small(*extra):
    return load_config("recipes/a1.toml", [*A1_SMALL, *extra])


def device_batches(n: int, batch: int, res: int, classes: int = 10, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g)
                  .contiguous(memory_format=torch.channels_last), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


class Feed:
    """Stage 1 stand-in: hands out batches already 'on the device' and labels the counter's events
    with the index of the micro-batch being processed."""

    def __init__(self, batches, counter: HostSyncCounter | None = None):
        self.batches, self.counter = batches, counter

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if self.counter is not None:
                self.counter.label = i
                self.counter.mark(b.images, b.labels)
            yield b

    def __len__(self):
        return len(self.batches)


def step_context(cfg, steps: int, accum: int = 1, model_wrapper=None) -> tuple[StepContext, Stage2]:
    dev = torch.device("cpu")
    ctx = build_step(cfg, dev, steps)
    ctx.optimizer.clip_on_host = False  # the CUDA branch of Lamb
    ctx.accum_steps = accum
    if model_wrapper:
        ctx.model = model_wrapper(ctx.raw_model)
    stage2 = Stage2(cfg.augment, cfg.data.num_classes, cfg.loss.label_smoothing, train=True, channels_last=True,
                    seed=0, backend="torch")
    return ctx, stage2
