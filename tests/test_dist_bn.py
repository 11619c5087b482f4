"""BatchNorm statistics agree across ranks (timm's ``--dist-bn reduce``): a 2-rank gloo group whose
ranks see different data ends with the average on both ranks, in the model and in its EMA copy."""
from __future__ import annotations

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.distributed import bn_running_stats, reduce_bn_stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    import timm.layers

    torch.manual_seed(0)  # the same initial weights on every rank, as DDP makes them
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, bias=False), timm.layers.BatchNormAct2d(6), nn.Flatten(1), nn.Linear(96, 3),
                         nn.BatchNorm1d(3))


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model().train()
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8, generator=g) * (rank + 1) + rank)
        ema = copy.deepcopy(model)  # holds this rank's statistics, as EMA.update copies them
        own = [b.clone() for b in bn_running_stats(model)]
        everyone: list = [None] * world
        dist.all_gather_object(everyone, own)
        reduce_bn_stats(model, ema)
        torch.save({"model": [b.clone() for b in bn_running_stats(model)],
                    "ema": [b.clone() for b in bn_running_stats(ema)], "all": everyone}, f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_average_of_their_statistics(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    per_rank = r0["all"]
    assert len(per_rank[0]) == 6  # mean and var of three BatchNorm layers (torch 2d, timm's BatchNormAct2d, 1d)
    assert any(not torch.allclose(a, b) for a, b in zip(*per_rank)), "ranks saw the same data"
    expected = [(a + b) / 2 for a, b in zip(*per_rank)]
    for got in (r0["model"], r1["model"], r0["ema"], r1["ema"]):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_single_process_is_left_alone():
    model = _model().train()
    model(torch.randn(4, 3, 8, 8))
    before = [b.clone() for b in bn_running_stats(model)]
    reduce_bn_stats(model, None)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_running_stats(model)))
