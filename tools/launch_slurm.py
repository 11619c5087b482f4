"""Submit a training run to Slurm, preemption-safe (also installed as rsb-launch).

    python tools/launch_slurm.py recipes/a1.toml --nodes 4 --gpus-per-node 8 --time 24:00:00 --out runs/a1
    python tools/launch_slurm.py recipes/a1.toml --nodes 4 --gpus-per-node 8 --out runs/a1 --dry-run
    python tools/launch_slurm.py recipes/demo.toml --nodes 2 --tasks-per-node 1 --time 30 --out runs/demo  # CPU nodes

Prints the job id, the log and how to watch and stop it. The run folder (``--out``, by default
runs/<recipe name>) keeps the job script, the frozen recipe and the log in ``OUT/slurm/``; the same
command submits the run again after it stopped, and it continues from its checkpoints. What the job
does at a time limit, at preemption and on failure: workflows/slurm_launch.py and the README's
"Run on a Slurm cluster". Exit status: 0 submitted (or dry run), 2 a user error (one line).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import examples, prog
from workflows.slurm_launch import (DEFAULT_LEAD_S, DEFAULT_MAX_REQUEUES, LAUNCHERS, Launch, LaunchError, Resources,
                                    launch_run)


SCRIPT = "python tools/launch_slurm.py"


def build_parser() -> argparse.ArgumentParser:
    name = prog(SCRIPT)
    p = argparse.ArgumentParser(prog=name, description=__doc__.splitlines()[0],
                                epilog=examples(__doc__.split("\n", 1)[1], SCRIPT, name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe TOML, e.g. recipes/a1.toml")
    p.add_argument("--out", default=None, help="run folder, the run's identity across every start "
                                               "(default runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable); frozen into OUT/slurm/recipe.toml")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node: one rank (task) per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, else 1); for CPU nodes")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per rank (default: the node's CPUs per GPU, or per rank, from sinfo; without sinfo "
                        "data.workers + 1); srun is given it too")
    p.add_argument("--mem", default=None, help="memory per node, sbatch's --mem (default: all of each node when the "
                                               "job takes whole nodes, else its share; without sinfo none)")
    p.add_argument("--time", default="24:00:00", help="time limit of each start (Slurm format; default 24:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="--OPTION=VALUE",
                   help="any other sbatch option (repeatable), e.g. --sbatch-arg=--qos=high")
    p.add_argument("--launcher", choices=LAUNCHERS, default="srun",
                   help="srun: one task per GPU, ranks from Slurm (default); torchrun: one torchrun per node")
    p.add_argument("--signal-lead", type=int, default=DEFAULT_LEAD_S, metavar="SECONDS",
                   help=f"the early signal (SIGUSR2) this long before the time limit (default {DEFAULT_LEAD_S}): "
                        f"a log interval plus a checkpoint write must fit")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help=f"time-limit requeues before the job stops requeueing itself (default {DEFAULT_MAX_REQUEUES})")
    p.add_argument("--name", default=None, help="job name (default: the run folder's name)")
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing, write nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    tasks = args.tasks_per_node if args.tasks_per_node is not None else (args.gpus_per_node or 1)
    resources = Resources(nodes=args.nodes, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node,
                          cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                          account=args.account, sbatch_args=tuple(args.sbatch_args), mem=args.mem)
    launch = Launch(recipe=args.recipe, out=out, overrides=args.overrides, resources=resources,
                    launcher=args.launcher, signal_lead_s=args.signal_lead, max_requeues=args.max_requeues,
                    name=args.name)
    try:
        done = launch_run(launch, dry_run=args.dry_run)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    why = done["job"].resources.why
    if args.dry_run:
        print(done["script"], end="")
        for line in why:
            print(f"# {line}", file=sys.stderr)
        print(f"# dry run: nothing written; without --dry-run this is {done['job'].script_path} and "
              f"`sbatch {done['job'].script_path}` submits it", file=sys.stderr)
        return 0
    job_id, log = done["job_id"], done["log"]
    ranks = resources.nodes * tasks
    print(f"submitted job {job_id}: {args.recipe} -> {out} ({resources.nodes} node(s) x {tasks} rank(s) = {ranks}, "
          f"{args.launcher}, --time {args.time} per start)")
    for line in why:
        print(line)
    print(f"log:   {log}")
    print(f"watch: squeue -j {job_id}    tail -f {log}")
    print(f"stop:  scancel $(cat {out / 'slurm' / 'job'})    (stops with a checkpoint; the same command submits "
          f"it again and it continues)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
