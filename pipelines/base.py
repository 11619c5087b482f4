"""The one contract every data pipeline implements (see shared/DESIGN.md).

Stage 1 (a backend: ffcv, dali, reference, synthetic) yields :class:`Batch` objects whose
images are uint8, NCHW-shaped and channels_last in memory (an NHWC buffer viewed as NCHW),
already on the training device. Stage 2 (``pipelines.augment``) turns them into normalized
float tensors and mixed targets; it is the same code for every backend.

Progressive resolution is a per-epoch call, ``set_epoch(epoch, res)``: the backend
changes its output size; stage 2 and the engine do not care about resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [N, 3, H, W], channels_last memory format, on the device
    labels: torch.Tensor  # int64 [N], on the device


@runtime_checkable
class Pipeline(Protocol):
    """What the engine and tools rely on. ``len`` is batches per epoch on this rank."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        """Called before each epoch: reseeds shuffling/sampling and sets the output resolution
        (``None`` keeps the current one). Must be cheap; rebuild nothing when the backend allows."""
        ...


class MissingBackendError(RuntimeError):
    """The recipe asks for a backend whose package is not installed; message says what to install."""


class DataError(RuntimeError):
    """Missing or inconsistent data (no converted dataset, class count mismatch); one-line message."""
