"""Process-group set-up for single process, ``torchrun`` (single or multi-node), CPU or CUDA.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; multi-node runs use its
``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` rendezvous, nothing of ours. NCCL on CUDA,
gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (used for stop requests, so all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.full((1,), 1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # deliberate sync: called at log points only


def bn_running_stats(*modules: nn.Module | None) -> list[torch.Tensor]:
    """The running mean and variance buffers of every BatchNorm-like layer (any ``_NormBase`` that
    tracks running statistics: torch's BatchNorm*, SyncBatchNorm, timm's BatchNormAct2d)."""
    found = []
    for module in modules:
        if module is None:
            continue
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                found += [b for b in (m.running_mean, m.running_var) if b is not None]
    return found


@torch.no_grad()
def reduce_bn_stats(*modules: nn.Module | None) -> None:
    """Average BatchNorm running statistics over all ranks, in place (timm's ``--dist-bn reduce``,
    ``timm.utils.distribute_bn``). DDP runs with ``broadcast_buffers=False``, so each rank's
    statistics follow only its own batches; without this, evaluation would average the accuracy
    of N slightly different models and the export would be rank 0's alone. One collective for all
    buffers. Running statistics are exponential averages, so averaging them now and again later
    gives the same result as averaging once at the end (up to rounding)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    bufs = bn_running_stats(*modules)
    if not bufs:
        return
    flat = torch._utils._flatten_dense_tensors(bufs)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for b, avg in zip(bufs, torch._utils._unflatten_dense_tensors(flat, bufs)):
        b.copy_(avg)


def gather_objects(obj, d: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not d.enabled:
        return [obj]
    gathered: list = [None] * d.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
