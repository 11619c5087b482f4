"""Fault injection: what a multi-day run meets, one row per case (expected, observed, pass/fail).

    python -m benchmarks.faults                       # every case; writes benchmarks/results/faults.md
    python -m benchmarks.faults --cases kill9,sigterm --kill-points 8

Each case runs the real CLI (``python -m engine.run``, under ``torchrun`` where it says so, and
``tools/convert_imagenet.py``) on a small real data set (Fashion-MNIST JPEGs, converted to FFCV and
DALI once), with a tiny ResNet in deterministic mode, and compares what happens with what must:

* ``kill9``: kill -9 at random steps (seeded), then ``--resume auto``: final weights bit-identical
  to an uninterrupted run, one metrics record per step;
* ``sigterm-<backend>``: ``torchrun --nproc_per_node 2`` (gloo), SIGTERM to the whole process group
  mid-epoch: every rank stops at the same step, one checkpoint, ranks exit 143; resuming under
  torchrun ends with weights bit-identical to an uninterrupted torchrun run;
* ``corrupt`` / ``truncated``: 4 KiB of random bytes in the middle of the newest checkpoint (same
  size) / the newest cut short: refused (checksum / size), the previous one is used, final weights
  identical to an uninterrupted run; ``all-bad``: every checkpoint unusable: exit 2 with one line
  naming them, ``--resume fresh`` then starts over;
* ``enospc``: a tmpfs too small for the next checkpoint (root only, else skipped with the reason):
  one line with the folder and the bytes, no temporary file left, the earlier checkpoint loads;
  the converter on a full disk: one line;
* ``diverge``: a learning rate that diverges: exit 3, no usable checkpoint with non-finite weights,
  the message names the last good checkpoint and gives no fp32 advice to an fp32 run;
* ``stale-temp``, ``bad-resume``, ``torchrun-config``: a temp file of a killed save is removed at
  start; ``--resume`` of a text file / truncated file is one line; a config error under torchrun
  is printed once;
* ``rank-error``: under torchrun, every image of one batch of rank 1 alone unreadable: one line
  naming rank 1, every rank ends within seconds with its status;
* ``resume-4-ranks``: 4 gloo ranks resumed from a mid-epoch checkpoint end bit-identical to an
  uninterrupted 4-rank run (DDP's bucket layout is the same at every start);
* ``eval-stop``: SIGTERM during an evaluation (one process, and torchrun with 2 ranks), SIGINT during
  the final one: exit 128 + signal within seconds, an ``interrupted`` checkpoint with the evaluation
  pending, and the resumed run ends as an uninterrupted one;
* ``no-checkpoint``: ``--resume auto`` on a folder with a ``--max-steps`` run's output and no checkpoint:
  its files are moved aside with a line, never overwritten;
* ``unreadable-on-one-rank``, ``export-fails``, ``silent-death``, ``stuck-rank``, ``world-size`` (what 64
  ranks on 8 nodes meet): rank 1 alone cannot read the newest checkpoint (every rank takes the same
  older one); rank 0's final export finds a full disk under srun-style ranks (every rank ends with one
  line); kill -9 of rank 1 (the survivor ends in seconds naming it, the resume is bit-identical); rank
  1's image read never returns (the group ends at ``train.dist_timeout_s`` with a line naming it); a
  mid-epoch checkpoint resumed on another process count (refused, naming the epoch boundary to use).

The cases live in tests/helpers/faults.py; the test suite runs them with fewer kill points
(tests/test_faults.py), this script runs them all and writes the table.
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
from tests.helpers.faults import ROOT, Faults, Row


def cases(faults: Faults, kill_points: int) -> dict:
    """Each case's name and what runs it (a list of rows)."""
    return {
        "kill9": lambda: [faults.kill9(kill_points)],
        "sigterm": lambda: [faults.sigterm("reference"), faults.sigterm("dali"), faults.sigterm("ffcv")],
        "corrupt": lambda: [faults.corrupt()],
        "truncated": lambda: [faults.corrupt(truncate=True)],
        "all-bad": lambda: [faults.all_bad()],
        "enospc": lambda: faults.enospc(),
        "diverge": lambda: [faults.diverge(), faults.diverge(nan=True)],
        "stale-temp": lambda: [faults.stale_temp()],
        "bad-resume": lambda: [faults.bad_resume()],
        "torchrun-config": lambda: [faults.torchrun_config()],
        "rank-error": lambda: [faults.rank_error()],
        "resume-4-ranks": lambda: [faults.resume_4_ranks()],
        "eval-stop": lambda: [faults.stop_during_eval(0), faults.stop_during_eval(2)],
        "no-checkpoint": lambda: [faults.resume_auto_without_checkpoint()],
        "unreadable-on-one-rank": lambda: [faults.unreadable_on_one_rank()],
        "export-fails": lambda: [faults.export_fails_on_rank_0()],
        "silent-death": lambda: [faults.silent_death()],
        "stuck-rank": lambda: [faults.stuck_rank()],
        "world-size": lambda: [faults.world_size_change()],
    }


CASES = tuple(cases(None, 0))  # type: ignore[arg-type]  (the names only)


def run_cases(faults: Faults, names: list[str], kill_points: int) -> list[Row]:
    rows: list[Row] = []
    runs = cases(faults, kill_points)
    for name in names:
        t0 = time.perf_counter()
        got = runs[name]()
        for row in got:
            print(f"[{row.verdict}] {row.case} ({time.perf_counter() - t0:.0f} s)\n    expected: {row.expected}\n"
                  f"    observed: {row.observed}", flush=True)
        rows += got
    return rows


def table(rows: list[Row], command: str) -> str:
    lines = ["# Fault injection (benchmarks/faults.py)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, no GPU (torch {torch.__version__}); "
             f"running as {'root' if os.geteuid() == 0 else 'non-root'}",
             f"- command: `{command}`", "", "| case | expected | observed | result |", "|---|---|---|---|"]
    for r in rows:
        cells = [c.replace("|", "/").replace("\n", " ") for c in (r.case, r.expected, r.observed)]
        lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    ap.add_argument("--kill-points", type=int, default=6, help="kill -9 points (>= 5 for the record)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.md")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"error: unknown case {unknown[0]!r}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.faults " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_cases(Faults(args.work or Path(tmp)), names, args.kill_points)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(rows, command))
    print(f"wrote {args.out}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
