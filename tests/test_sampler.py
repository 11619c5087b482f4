"""pipelines.sampler against its oracles: timm RepeatAugSampler and torch DistributedSampler."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from timm.data.distributed_sampler import RepeatAugSampler

from pipelines.sampler import ShardSampler, epoch_indices


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,world", [(1000, 1), (1000, 4), (2049, 8), (300, 3), (100, 4), (257, 2)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_repeat_aug_matches_timm_sequence(n, world, epoch):
    for rank in range(world):
        timm_s = RepeatAugSampler(_Sized(n), num_replicas=world, rank=rank, num_repeats=3)
        timm_s.set_epoch(epoch)
        ours = epoch_indices(n, epoch=epoch, seed=0, rank=rank, world_size=world, repeats=3)
        assert ours.dtype == np.int64
        assert len(ours) == len(timm_s)
        assert ours.tolist() == list(timm_s)  # same sequence, hence same multiset


def test_repeat_aug_seed_shifts_epoch_and_repeats_spread_over_ranks():
    n, world = 512, 4
    a = epoch_indices(n, epoch=2, seed=5, rank=1, world_size=world, repeats=3)
    timm_s = RepeatAugSampler(_Sized(n), num_replicas=world, rank=1, num_repeats=3)
    timm_s.set_epoch(7)
    assert a.tolist() == list(timm_s)
    # Epoch length kept at about N: floor(N/256)*256/world per rank.
    assert len(a) == 512 // world
    # Across ranks, each kept image appears up to 3 times, on different ranks where possible.
    allr = [epoch_indices(n, epoch=0, seed=0, rank=r, world_size=world, repeats=3) for r in range(world)]
    counts = Counter(np.concatenate(allr).tolist())
    assert max(counts.values()) <= 3 and sum(counts.values()) == 512
    for r in range(world):
        assert len(set(allr[r].tolist())) >= len(allr[r]) - 1  # consecutive repeats go to other ranks


@pytest.mark.parametrize("n,world", [(1000, 1), (1001, 4), (10, 3), (7, 8)])
def test_plain_sharding_matches_torch_distributed_sampler(n, world):
    for epoch in (0, 5):
        for rank in range(world):
            ref = torch.utils.data.DistributedSampler(_Sized(n), num_replicas=world, rank=rank, seed=11)
            ref.set_epoch(epoch)
            ours = epoch_indices(n, epoch=epoch, seed=11, rank=rank, world_size=world)
            assert ours.tolist() == list(ref)
    union = np.concatenate([epoch_indices(n, epoch=1, seed=0, rank=r, world_size=world) for r in range(world)])
    assert set(union.tolist()) == set(range(n))  # every sample visited; padding only duplicates


def test_deterministic_and_epoch_dependent_and_no_shuffle():
    a = epoch_indices(100, epoch=1, seed=3)
    assert np.array_equal(a, epoch_indices(100, epoch=1, seed=3))
    assert not np.array_equal(a, epoch_indices(100, epoch=2, seed=3))
    assert epoch_indices(10, epoch=4, seed=3, shuffle=False).tolist() == list(range(10))


def test_shard_sampler_len_iter_and_resume():
    s = ShardSampler(1000, seed=1, rank=1, world_size=2, repeats=3)
    s.set_epoch(4)
    full = list(s)
    assert len(full) == len(s) == 1000 // 256 * 256 // 2
    s.set_epoch(4, start=100)
    assert list(s) == full[100:] and len(s) == len(full) - 100
    p = ShardSampler(11, world_size=3, rank=2)
    assert len(p) == len(list(p)) == 4


def test_bad_arguments():
    with pytest.raises(ValueError):
        epoch_indices(10, epoch=0, seed=0, repeats=1)
    with pytest.raises(ValueError):
        epoch_indices(10, epoch=0, seed=0, rank=2, world_size=2)
