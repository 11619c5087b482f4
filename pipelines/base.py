"""The one contract every data pipeline implements (see docs/design.md).

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
    # (path, reason) of each image that could not be read; its slot holds another image of this
    # batch (with that image's label), so N stays fixed. The engine counts these in its metrics.
    skipped: tuple = ()


@runtime_checkable
class Pipeline(Protocol):
    """What the engine and tools rely on. ``len`` is batches per epoch on this rank."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        """Called before each epoch: reseeds shuffling/sampling and sets the output resolution
        (``None`` keeps the current one). Must be cheap; rebuild nothing when the backend allows."""
        ...


def random_state(pipeline) -> object | None:
    """A backend's own random state after the batches handed out so far, for a checkpoint; None
    when its randomness is a pure function of (seed, epoch, sample), as in the reference pipeline,
    so that ``set_epoch(epoch, res, start_batch)`` alone resumes it exactly. A backend whose
    random streams live inside a library (DALI's operators) implements ``random_state()`` and
    ``load_random_state(state)``."""
    get = getattr(pipeline, "random_state", None)
    return get() if get is not None else None


def load_random_state(pipeline, state: object | None) -> None:
    if state is not None and hasattr(pipeline, "load_random_state"):
        pipeline.load_random_state(state)


class MissingBackendError(RuntimeError):
    """The recipe asks for a backend whose package is not installed; message says what to install."""


class DataError(RuntimeError):
    """Missing or inconsistent data (no converted dataset, class count mismatch); one-line message."""
