"""Which sample indices a rank visits in an epoch: DDP sharding and repeated augmentation.

One module for every backend (FFCV traversal order, DALI index feed, the reference torch
``Sampler``). Pure torch/numpy: rank and world size are passed in, no process group needed.

Two modes, both deterministic per ``(seed, epoch)``:

* ``repeats == 0``: plain sharding with the semantics of ``torch.utils.data.DistributedSampler``
  (``drop_last=False``): a permutation from a generator seeded with ``seed + epoch``, padded by
  repeating its head until every rank gets ``ceil(N / world)`` indices, then strided by rank.
  So with ``N % world != 0`` a few samples are seen twice per epoch (at most ``world - 1``).
* ``repeats >= 2``: repeated augmentation (Hoffer et al. 2020, "Augment your batch"; DeiT's
  ``RASampler`` as kept in timm ``timm/data/distributed_sampler.py::RepeatAugSampler``). Each
  index of a permutation is repeated ``repeats`` times, the repeats land on consecutive ranks,
  and each rank keeps only ``floor(N // 256 * 256 / world)`` of them so an epoch costs about
  the same as without repeats (N < 256: ``ceil(N / world)``).

Seeding: timm's RepeatAugSampler seeds its generator with the epoch alone; we seed with
``seed + epoch`` like torch's DistributedSampler, which equals timm's sequence for ``seed == 0``
(and timm's epoch ``seed + epoch`` otherwise). Tests check both samplers index for index.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SELECTED_ROUND = 256  # RepeatAugSampler rounds the kept count down to a multiple of this


def _permutation(num_samples: int, seed: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator()
    g.manual_seed(seed)
    # torch.randperm with a CPU generator: the exact sequence timm and torch samplers produce.
    return torch.randperm(num_samples, generator=g)


def repeat_aug_length(num_samples: int, world_size: int, repeats: int) -> int:
    """Indices per rank per epoch under repeated augmentation (timm's ``num_selected_samples``)."""
    per_rank = math.ceil(num_samples * repeats / world_size)
    if num_samples >= SELECTED_ROUND:
        selected = num_samples // SELECTED_ROUND * SELECTED_ROUND // world_size
    else:
        selected = math.ceil(num_samples / world_size)
    return min(selected, per_rank)


def epoch_indices(num_samples: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  repeats: int = 0, shuffle: bool = True) -> np.ndarray:
    """The int64 indices this rank visits this epoch, in order (see the module docstring)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if repeats == 1 or repeats < 0:
        raise ValueError(f"repeats is a count >= 2, or 0 for plain sharding; got {repeats}")
    perm = _permutation(num_samples, seed + epoch, shuffle).numpy().astype(np.int64)
    if repeats >= 2:
        # [a, a, a, b, b, b, ...]: consecutive copies go to consecutive ranks, so each rank
        # sees a different augmentation of the same image.
        rep = np.repeat(perm, repeats)
        total = math.ceil(num_samples * repeats / world_size) * world_size
        positions = np.arange(rank, total, world_size)[:repeat_aug_length(num_samples, world_size, repeats)]
        return rep[positions % len(rep)]
    per_rank = math.ceil(num_samples / world_size)
    total = per_rank * world_size
    padded = np.resize(perm, total)  # np.resize repeats the array: DistributedSampler's padding
    return padded[rank:total:world_size]


class ShardSampler(torch.utils.data.Sampler[int]):
    """A torch ``Sampler`` over :func:`epoch_indices`; call ``set_epoch`` before each epoch.

    ``set_epoch(epoch, start=k)`` skips the first ``k`` indices of the epoch, for resuming
    mid-epoch exactly where a checkpoint left off.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeats: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeats = repeats
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def indices(self) -> np.ndarray:
        """All of this epoch's indices for this rank (ignores ``start``)."""
        return epoch_indices(self.num_samples, epoch=self.epoch, seed=self.seed, rank=self.rank,
                             world_size=self.world_size, repeats=self.repeats, shuffle=self.shuffle)

    def __iter__(self):
        return iter(self.indices()[self.start:].tolist())

    def __len__(self) -> int:
        if self.repeats >= 2:
            n = repeat_aug_length(self.num_samples, self.world_size, self.repeats)
        else:
            n = math.ceil(self.num_samples / self.world_size)
        return max(0, n - self.start)
