"""Process-group set-up for single process, ``torchrun`` (single or multi-node) and Slurm's ``srun``,
CPU or CUDA.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables; multi-node runs use its
``--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` rendezvous, nothing of ours. Under ``srun`` (one
task per GPU, no torchrun) the ranks come from Slurm's task variables (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID) and the rendezvous from the job itself: rank 0, on the first
node of the step, hosts the store on a port the OS hands it (free by construction: not a port two
jobs on one node could both derive, and never torchrun's 29500) and writes host and port into the
run folder under a name of this start's own (job, step, restart count); every other rank reads it
there (the run folder is on a file system every node sees). Both are new at every start, never
taken from a MASTER_ADDR/MASTER_PORT the job was submitted with: a requeued job may land on other
nodes, and the previous start's store (a process that has not quite died) can never answer this
one's ranks. The GPU of each rank: :func:`pick_cuda_device`, over what the site's binding lets it
see. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
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


RENDEZVOUS_DIR = ".rendezvous"  # in the run folder, which every node sees (README: Multi-node)
RENDEZVOUS_POLL_S = 0.2


def rendezvous_key(env=None) -> str:
    """This start's own name: job (an array task's own), step, restart count. Another start of the
    job, another step in the same allocation (``salloc`` + two ``srun``) or another job never shares it."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "job")
    task = env.get("SLURM_ARRAY_TASK_ID")
    return (f"{job}{'_' + task if task else ''}-step{env.get('SLURM_STEP_ID', 'batch')}-"
            f"start{env.get('SLURM_RESTART_COUNT', '0')}")


def rendezvous_file(out: Path, env=None) -> Path:
    return Path(out) / RENDEZVOUS_DIR / f"{rendezvous_key(env)}.json"


def first_node_address(env=None) -> str:
    """The first node of the step (else the job): where rank 0, or the first node's torchrun agent, runs."""
    env = os.environ if env is None else env
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    if not nodes:
        raise LaunchError("SLURM_JOB_NODELIST is empty; is this a Slurm job?")
    return node_address(nodes[0])


def free_port() -> int:
    """A port nothing listens on now, chosen by the OS (it never hands out one in use)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def publish_rendezvous(out: Path, host: str, port: int, env=None) -> Path:
    """The first rank (or agent) writes where the others meet it, atomically, into the run folder."""
    path = rendezvous_file(out, env)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"host": host, "port": port}))
    os.replace(tmp, path)
    return path


def read_rendezvous(out: Path, timeout_s: float, env=None) -> tuple[str, int]:
    """Wait for the first rank's :func:`publish_rendezvous` (every rank starts at nearly the same time,
    but the first may import more slowly); one line when it never comes."""
    path = rendezvous_file(out, env)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = json.loads(path.read_text())
            return found["host"], int(found["port"])
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise LaunchError(f"the first rank did not publish this start's rendezvous in {path} within "
                                  f"{timeout_s:.0f} s: is {out} on a file system every node sees (NFS, Lustre, ...)? "
                                  f"(train.dist_start_timeout_s sets the wait)") from None
            time.sleep(RENDEZVOUS_POLL_S)


def _tasks_on_this_node(env) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else Slurm's per-node task counts
    (SLURM_STEP_TASKS_PER_NODE, ``8(x4)`` or ``2,1,...``) at this node's index."""
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    counts: list[int] = []
    for part in (env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)


def pick_cuda_device(local_rank: int, visible: int, tasks_on_node: int, ordinal: int | None = None) -> int:
    """Which of the GPUs this process sees it trains on.

    One visible GPU (``--gpus-per-task=1``, ``--gpu-bind=single``): that one. At least as many visible
    as ranks on the node (torchrun, or srun with every GPU visible to every task): the local rank's.
    Fewer (``--gpu-bind=closest``: a task sees the 4 GPUs of its socket, and Slurm may place tasks on
    sockets in turn): ``ordinal``, this task's place among the node's tasks that see the same GPUs
    (:func:`ordinal_among`), else the local rank modulo what is visible."""
    if visible < 1:
        raise LaunchError("this process sees no CUDA device although torch reports CUDA; check the job's GPU request "
                          "and CUDA_VISIBLE_DEVICES")
    if visible == 1:
        return 0
    if tasks_on_node <= visible:
        return local_rank % visible
    return (ordinal if ordinal is not None else local_rank) % visible


def ordinal_among(me: tuple[str, str, int], everyone: list[tuple[str, str, int]]) -> int:
    """This task's place, by local rank, among the tasks on its host that see the same GPUs.
    ``me`` and each entry: (host, the visible GPUs' identities, local rank)."""
    host, gpus, local_rank = me
    return sorted(lr for h, g, lr in everyone if h == host and g == gpus).index(local_rank)


def _visible_gpus() -> str:
    """The identities of the visible GPUs (their UUIDs; else CUDA_VISIBLE_DEVICES), to tell which
    tasks of a node see the same ones."""
    try:
        return ",".join(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))
    except Exception:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def init_distributed(out: Path | None = None, start_timeout_s: float = 900.0) -> DistInfo:
    """The process group of this run: its rank, the device it trains on, the collectives' timeout.

    ``start_timeout_s`` bounds the rendezvous and every collective until :func:`set_collective_timeout`
    lowers it after the first step (a start waits for every rank's imports, data and checkpoint load).
    Under ``srun`` rank 0 hosts the store on a port the OS gives it and publishes host and port in the
    run folder (``out``), which every rank reads: two jobs on one node can never meet on one port."""
    ranks = process_ranks()
    world, rank, local_rank = ranks.world_size, ranks.rank, ranks.local_rank
    timeout = datetime.timedelta(seconds=start_timeout_s)
    store = None
    if world > 1:
        # NCCL: a failed or timed-out collective aborts its communicator and raises in the training
        # thread, where the engine turns it into one line (engine.failures), instead of waiting
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if ranks.launcher == "srun" and world > 1:
        try:
            store = _srun_store(rank, world, out, timeout)
        except LaunchError as e:  # every rank finds it: one line, exit 2
            from engine.logging import say_once

            say_once(f"error: {e}", rank, world)
            raise SystemExit(2) from None
    cuda = torch.cuda.is_available()
    visible = torch.cuda.device_count() if cuda else 0
    tasks_on_node = _tasks_on_this_node(os.environ) if ranks.launcher != "single" else 1
    needs_exchange = cuda and world > 1 and 1 < visible < tasks_on_node
    device = torch.device("cpu")
    if cuda and not needs_exchange:
        device = torch.device("cuda", pick_cuda_device(local_rank, visible, tasks_on_node))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        eager = device if device.type == "cuda" else None
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                    device_id=eager)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=eager)
        if ranks.launcher == "srun" and rank == 0 and out is not None:
            done = rendezvous_file(out)  # every rank has met the store: it has done its job
            done.unlink(missing_ok=True)
            try:
                done.parent.rmdir()
            except OSError:  # another start's file is there (or the folder is gone)
                pass
    if needs_exchange:  # which of the GPUs it shares with other tasks of its node this task takes
        device = torch.device("cuda", _exchange_for_device(rank, world, local_rank, visible, tasks_on_node))
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def _srun_store(rank: int, world: int, out: Path | None, timeout: datetime.timedelta) -> dist.TCPStore:
    """The store of an ``srun`` step (no torchrun): rank 0 hosts it on a free port and publishes it."""
    if out is None:
        raise LaunchError("a run under srun needs its run folder (--out) to meet its ranks")
    if rank == 0:
        host = first_node_address()
        store = dist.TCPStore("0.0.0.0", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        publish_rendezvous(out, host, store.port)
        port = store.port
    else:
        host, port = read_rendezvous(out, timeout.total_seconds())
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    # the failure board's own clients connect here too (engine.failures)
    os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if rank == 0:
        print(f"slurm: {world} tasks on {os.environ.get('SLURM_STEP_NODELIST', '?')}, rendezvous {host}:{port} "
              f"(job {os.environ.get('SLURM_JOB_ID')}, start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1})",
              file=sys.stderr, flush=True)
    return store


def _exchange_for_device(rank: int, world: int, local_rank: int, visible: int, tasks_on_node: int) -> int:
    """Every rank posts (host, visible GPUs, local rank) on the store; this one's place among the
    tasks of its host that see the same GPUs picks its device (:func:`pick_cuda_device`)."""
    store = dist.distributed_c10d._get_default_store()
    me = (socket.gethostname(), _visible_gpus(), local_rank)
    store.set(f"rsb-gpus/{rank}", json.dumps(me))
    everyone = [tuple(json.loads(v)) for v in store.multi_get([f"rsb-gpus/{r}" for r in range(world)])]
    return pick_cuda_device(local_rank, visible, tasks_on_node, ordinal_among(me, everyone))


def set_collective_timeout(seconds: float) -> None:
    """The timeout of every later collective (after the start, ``train.dist_timeout_s``): what no
    other check catches (a collective a rank never reaches) ends at it with a line."""
    if dist.is_available() and dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))


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


def gather_to_main(obj, d: DistInfo) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere): what only the writer needs.
    An all-gather would send every rank's state to every rank (at 512 ranks, 512 x the bytes each)."""
    if not d.enabled:
        return [obj]
    gathered: list | None = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj, d: DistInfo):
    """Rank 0's ``obj`` on every rank (small objects: a file list, a checkpoint's record)."""
    if not d.enabled:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
