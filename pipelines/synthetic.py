"""Synthetic backend: the same uint8 batch every step, already on the device.

It measures the compute ceiling (model + optimizer + stage 2 with no decoding), which the
throughput profiler compares every real backend against: if a real pipeline reaches the
synthetic images/s, data is not the bottleneck.
"""
from __future__ import annotations

from typing import Iterator

import torch

from pipelines.base import Batch


class SyntheticPipeline:
    def __init__(self, *, batch_size: int, res: int, num_classes: int, num_samples: int, device="cpu",
                 seed: int = 0, channels_last: bool = True):
        self.batch_size, self.res, self.num_classes = batch_size, res, num_classes
        self.num_samples, self.device, self.seed, self.channels_last = num_samples, torch.device(device), seed, channels_last
        self._make()

    def _make(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        images = torch.randint(0, 256, (self.batch_size, 3, self.res, self.res), dtype=torch.uint8, generator=g)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        self.batch = Batch(images.to(self.device), labels.to(self.device))

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(len(self)):
            yield self.batch

    def set_epoch(self, epoch: int, res: int | None = None, start_batch: int = 0) -> None:
        if res is not None and res != self.res:
            self.res = res
            self._make()
