"""Slurm: training runs and a sweep on a real throwaway two-node cluster, one row per case.

    python -m benchmarks.slurm                   # every case; writes benchmarks/results/slurm.md
    python -m benchmarks.slurm --cases c,d       # as root, with slurm-wlm and munge installed

The cluster (tests/helpers/slurm_cluster.py) runs on this one machine; every job is launched the way a
user launches it (workflows/slurm_launch.py, the sweep's Slurm executor), the runs are the fault
benchmark's tiny deterministic ResNet on Fashion-MNIST through the reference pipeline, with a
log point at every step, 2 ranks (one per node) unless said otherwise:

* ``a``: a 2-node job, srun mode: final weights bit-identical to ``torchrun --nproc_per_node 2`` on
  one machine; one start, no requeue;
* ``b``: the same through ``--launcher torchrun`` (one agent per node, ``--nnodes 2``, c10d on
  127.0.0.1): bit-identical to the same one-machine run;
* ``c``: preemption by the site: ``scontrol requeue`` mid-run: the agreed stop and one checkpoint,
  Slurm's restart, ``--resume auto`` finishes bit-identical to ``a``; the log shows both starts and
  the step where the second began; seconds from the signal to the checkpoint on disk and from the
  requeue to the next start's first step;
* ``d``: the time limit: ``--time 2`` with the early signal 89 s before it, so Slurm's first
  time-limit check 1 s or more after the start sends it (the job is released from hold 6 s before
  such a check: Slurm checks every 30 s, which a 20-second run could otherwise miss): the stop, the
  self-requeue, and a finish bit-identical to ``a``; the same two figures. The requeued job is given
  a longer limit while it waits, so that its second start finishes instead of being signalled again
  at once (on a real cluster every start has the same long limit);
* ``e``: ``scancel`` mid-run: a checkpoint, exit 143, no requeue; a recipe error the engine finds at
  run time (``data.num_classes`` against the data; the launcher has already refused what it can
  check, such as a global batch that does not split over the ranks): one line, the job log's last,
  exit 2, no requeue;
* ``f``: a 4-trial sweep through the Slurm executor (an array job, 2 trials at a time), one trial
  preempted mid-run and resumed: all done, the report lists 4 trials.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.helpers.faults import ROOT, Row
from tests.helpers.slurm_cluster import SlurmCluster
from tests.helpers.slurm_cases import SlurmCases


CASES = ("a", "b", "c", "d", "e", "f")


def run_cases(cases: SlurmCases, names: list[str]) -> list[Row]:
    methods = {"a": [cases.srun_two_nodes], "b": [cases.torchrun_two_nodes], "c": [cases.preempt],
               "d": [cases.time_limit], "e": [cases.cancel, cases.config_error], "f": [cases.sweep]}
    rows = []
    for name in names:
        for method in methods[name]:
            t0 = time.perf_counter()
            row = method()
            print(f"[{row.verdict}] {row.case} ({time.perf_counter() - t0:.0f} s)\n    expected: {row.expected}\n"
                  f"    observed: {row.observed}", flush=True)
            rows.append(row)
    return rows


def table(rows: list[Row], command: str, cluster_note: str) -> str:
    lines = ["# Slurm: launcher and sweep on a real two-node cluster (benchmarks/slurm.py)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, no GPU (torch {torch.__version__})",
             f"- cluster: {cluster_note}", f"- command: `{command}`", "",
             "| case | expected | observed | result |", "|---|---|---|---|"]
    for r in rows:
        cells = [c.replace("|", "/").replace("\n", " ") for c in (r.case, r.expected, r.observed)]
        lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {r.verdict} |")
    return "\n".join(lines + ["", NOTES]) + "\n"


NOTES = """Reading the figures: "signal to checkpoint on disk" is the signal's time (c: the `scontrol requeue`
call; d: the job script's `early signal` line) to the mtime of the `interrupted` checkpoint. In d the
signal is sent on purpose while the ranks start up; they ignore it until the engine listens and the
job script repeats it every 2 s, so there the figure includes the rest of the start-up (when it
lands mid-training, as in c, it is the time to the next log point plus the write, here well under a
second). "Requeue to the next first step" (c: the `scontrol requeue` call; d: the job script's
`requeued` line, to the first train record of the next start) includes Slurm's wait before a
requeued job may start (`cred_expire`, 10 s on this cluster, 120 s by default), the scheduling pass
and the engine's start-up and resume."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "slurm.md")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    if [c for c in names if c not in CASES]:
        print(f"error: unknown case in {args.cases!r}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    from tests.helpers.slurm_cluster import unavailable
    from pipelines.convert.demo_data import make_demo_tree

    why = unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.slurm", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        make_demo_tree(data, size=32, train_per_class=64, val_per_class=16, workers=2)
        cluster = SlurmCluster(work / "cluster")
        try:
            cluster.start()
            os.environ["SLURM_CONF"] = str(cluster.conf)
            described = cluster.describe()
            rows = run_cases(SlurmCases(cluster, work / "runs", data, overlap=False), names)
        finally:
            cluster.stop()
        left = cluster.leftovers()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, command, described))
    print(f"wrote {args.out}; daemons left running: {left or 'none'}")
    return 0 if all(r.ok is not False for r in rows) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
