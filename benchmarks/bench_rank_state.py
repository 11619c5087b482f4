"""What each checkpoint sends between ranks: every rank's own state, gathered to the writer.

    python -m benchmarks.bench_rank_state [--arch resnet50] [--ranks 2,4,8] [--repeats 5]

Every checkpoint carries each rank's own state (its BatchNorm statistics of the model and the EMA,
its random states, its stage 2 generator; engine/run_folder.py). It used to reach the writer by an
all-gather, which sends every rank's state to every rank; now by a gather to rank 0 alone. This
prints the pickled size of one rank's state for the recipe's model (what ``*_object`` collectives
send), times both collectives with that payload over gloo ranks on this machine (processes on one
host: the figures say what the collectives cost in CPU and copies, not a network), and computes the
bytes each rank receives at 8, 64 and 512 ranks.
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def rank_state(arch: str) -> dict:
    """One rank's part of a checkpoint, built as engine/run_folder.py's Checkpointer builds it."""
    from common.config import AugmentConfig, ModelConfig
    from engine import checkpoint as ckpt
    from engine.distributed import bn_running_stats
    from engine.ema import EMA
    from models.factory import create_model
    from pipelines.augment import Stage2

    model = create_model(ModelConfig(arch=arch), 1000)
    ema = EMA(model, 0.9998)
    stage2 = Stage2(AugmentConfig(), 1000, 0.0, train=True)
    return {"stage1": None, "stage2": stage2.state_dict(), "rng": ckpt.rng_state(), "window": [0.0, 0, 0],
            "bn": [b.detach().clone() for b in bn_running_stats(model, ema.module)]}


def _worker(rank: int, world: int, port: int, arch: str, repeats: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = rank_state(arch)
    times = {"all_gather_object": [], "gather_object": []}
    for _ in range(repeats):
        for name in times:
            dist.barrier()
            t0 = time.perf_counter()
            if name == "all_gather_object":
                out = [None] * world
                dist.all_gather_object(out, state)
            else:
                out = [None] * world if rank == 0 else None
                dist.gather_object(state, out, dst=0)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    if rank == 0:
        Path(result).write_text(repr({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--ranks", default="2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", type=Path, default=ROOT / "benchmarks" / "results" / "rank_state.md")
    a = p.parse_args(argv)
    size = len(pickle.dumps(rank_state(a.arch)))
    rows = []
    for world in [int(w) for w in a.ranks.split(",")]:
        result = Path(f"/tmp/rank_state_{os.getpid()}_{world}.txt")
        mp.start_processes(_worker, args=(world, _free_port(), a.arch, a.repeats, str(result)), nprocs=world,
                           start_method="spawn")
        measured = eval(result.read_text())  # noqa: S307 (our own repr of a dict of floats)
        result.unlink()
        rows.append((world, measured))
        print(f"{world} ranks: all_gather_object {measured['all_gather_object'] * 1e3:.1f} ms, gather_object "
              f"{measured['gather_object'] * 1e3:.1f} ms", flush=True)
    mb = size / 2**20
    lines = [f"# One rank's checkpoint state, gathered to the writer ({time.strftime('%Y-%m-%d')})", "",
             f"`python -m benchmarks.bench_rank_state {' '.join(sys.argv[1:] if argv is None else argv)}` on this "
             f"{os.cpu_count()}-CPU machine, no GPU; load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())} "
             f"at the end.", "",
             f"One rank's own state for `{a.arch}` with an EMA (BatchNorm statistics of the model and the EMA, "
             f"random states, stage 2's generator), pickled: **{size / 1e3:,.0f} kB**.", "",
             "Measured over gloo ranks on this one machine (median of "
             f"{a.repeats}; processes on one host, so these are the collectives' CPU and copies, not a network):", "",
             "| ranks | all_gather_object (before) | gather_object to rank 0 (now) |", "|---|---|---|"]
    lines += [f"| {w} | {m['all_gather_object'] * 1e3:.1f} ms | {m['gather_object'] * 1e3:.1f} ms |" for w, m in rows]
    (w0, m0), (w1, m1) = rows[0], rows[-1]
    per_state = (m1["gather_object"] - m0["gather_object"]) / max(w1 - w0, 1)  # s per rank's state on rank 0
    lines += ["", "Computed from the size above and the measured cost of one more rank's state on rank 0 "
              f"({per_state * 1e3:.1f} ms: pickling, copies and unpickling, from the {w0}- and {w1}-rank gathers; "
              "a network adds the bytes over its bandwidth):", "",
              "| ranks | all-gather: every rank receives | gather: rank 0 receives, the others | gather: time on rank 0 |",
              "|---|---|---|---|"]
    for w in (8, 64, 512):
        lines.append(f"| {w} | {w * mb:,.1f} MB ({w * w * mb / 1024:,.1f} GB over the job) | {(w - 1) * mb:,.1f} MB, "
                     f"0 | {w * per_state:,.1f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
