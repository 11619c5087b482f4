"""Process-group set-up for single process, ``torchrun`` (single or multi-node) and Slurm's ``srun``,
CPU or CUDA.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; multi-node runs use its
``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` rendezvous, nothing of ours. Under ``srun`` (one
task per GPU, no torchrun) the ranks come from Slurm's task variables (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID) and the rendezvous from the job itself: the first node of the
step's node list, and a port derived from the job id and its restart count. Both are recomputed at
every start, never taken from a MASTER_ADDR/MASTER_PORT the job was submitted with: a requeued job
may land on other nodes, and a port of its own per start means the previous start's store (a
process that has not quite died, a socket in TIME_WAIT) can never answer this one's ranks. NCCL on
CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NamedTuple

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


class LaunchError(RuntimeError):
    """The launcher's environment cannot start a process group (one line for the user)."""


class ProcessRanks(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun" or "single"


def process_ranks(env=None) -> ProcessRanks:
    """This process's rank, world size and local rank from its launcher's variables: torchrun's
    (RANK, WORLD_SIZE, LOCAL_RANK) first, else Slurm's when this is a task of an ``srun`` step
    (SLURM_STEP_ID is set in a step, not in the batch script, whose SLURM_NTASKS counts the job's
    tasks though it is one process), else a single process. Importing this module costs torch's
    import; callers before the heavy set-up use it only on the path that needs it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return ProcessRanks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "torchrun")
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        return ProcessRanks(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), "srun")
    return ProcessRanks(0, 1, 0, "single")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list (``n[1-3,7],gpu-a[01-02]``) as names, in order (what
    ``scontrol show hostnames`` prints)."""
    names: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"\[([^\]]*)\]", group)  # prefix, range, text, range, ..., suffix
        expanded = [parts[0]]
        for i in range(1, len(parts), 2):
            choices = []
            for item in parts[i].split(","):
                lo, _, hi = item.partition("-")
                choices += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
            expanded = [f"{e}{c}{parts[i + 1]}" for e in expanded for c in choices]
        names += expanded
    return names


def node_address(name: str) -> str:
    """An address for Slurm node ``name``: the name itself when it resolves, else the node's
    NodeAddr from ``scontrol show node`` (sites whose node names are not host names)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        shown = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        shown = None
    match = re.search(r"\bNodeAddr=(\S+)", shown.stdout if shown else "")
    if match is None:
        raise LaunchError(f"the job's first node {name} does not resolve and scontrol shows no NodeAddr for it; "
                          f"set MASTER_ADDR and launch with torchrun")
    return match.group(1)


RDZV_PORT_BASE = 12000  # below Linux's ephemeral range (32768+), so no client socket can hold it
RDZV_PORT_SPAN = 20000


def rendezvous_port(job_id: int, restart: int) -> int:
    """A port of this job's own for this start: another start (restart count) or another job on
    the same node gets another one (1000 job ids x 20 restarts before two starts share one)."""
    return RDZV_PORT_BASE + (job_id % (RDZV_PORT_SPAN // 20)) * 20 + restart % 20


def slurm_rendezvous(env=None) -> tuple[str, int]:
    """(host, port) of this start's rendezvous: the first node of the step (else the job), and
    :func:`rendezvous_port` of the job id (an array task's own) and SLURM_RESTART_COUNT."""
    env = os.environ if env is None else env
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if not nodes:
        raise LaunchError("SLURM_JOB_NODELIST is empty; is this a Slurm job?")
    return node_address(nodes[0]), rendezvous_port(int(env["SLURM_JOB_ID"]), int(env.get("SLURM_RESTART_COUNT", "0")))


def init_distributed() -> DistInfo:
    ranks = process_ranks()
    world, rank, local_rank = ranks.world_size, ranks.rank, ranks.local_rank
    if ranks.launcher == "srun" and world > 1:
        try:
            host, port = slurm_rendezvous()
        except LaunchError as e:  # every rank finds it: one line, exit 2
            from engine.logging import say_once

            say_once(f"error: {e}", rank, world)
            raise SystemExit(2) from None
        # recomputed here at every start: whatever the job was submitted with is not this start's
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(local_rank))
        if rank == 0:
            print(f"slurm: {world} tasks on {os.environ.get('SLURM_STEP_NODELIST', '?')}, rendezvous {host}:{port} "
                  f"(job {os.environ.get('SLURM_JOB_ID')}, start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1})",
                  file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        if ranks.launcher == "srun" and torch.cuda.device_count() == 1:
            local_rank = 0  # the site binds one GPU per task (--gpus-per-task=1): it is this task's device 0
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
