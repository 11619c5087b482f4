"""Run a hyper-parameter sweep over a recipe (fast A3 exploration) and tabulate it.

    python tools/sweep.py sweeps/a3_lr_demo.toml                  # -> runs/sweeps/a3_lr_demo/
    python tools/sweep.py sweeps/a3_lr_asha_demo.toml             # the same grid, losing trials stopped early (ASHA)
    python tools/sweep.py SWEEP.toml --executor slurm             # one Slurm array task per trial
    python tools/sweep.py SWEEP.toml --report-only                # tables and plot from what is done

The sweep file format is documented in workflows/sweep/plan.py, with a worked example of [search]
(grid, random, tpe) and [prune] (asha, hyperband, median); workflows/sweep/ holds the logic (this file
parses options and prints). An adaptive sweep ([prune], or sampler tpe) keeps an Optuna study in
OUT/study.journal (optuna-dashboard OUT/study.journal shows it in a browser). Each trial is a plain
``python -m engine.run BASE --out OUT/trials/<name> --set ... [--max-steps N]``; finished trials are
skipped on a rerun, unfinished ones continue from their checkpoints. Writes OUT/results.csv,
OUT/results.md (sorted by val top-1, plus mean and std over seeds) and OUT/sweep.png.
Exit status: 0 all trials done, 1 some failed (tables still written), 2 a user error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import examples, prog
from common.config import ConfigError
from workflows.sweep.plan import EXECUTORS, SweepError, budget_text, default_out, plan_sweep, read_sweep, start_sweep
from workflows.sweep.report import write_report
from workflows.sweep.run import check_executor, pending, run_adaptive, run_trials, study_trials, trial_summary

SCRIPT = "python tools/sweep.py"


def build_parser() -> argparse.ArgumentParser:
    name = prog(SCRIPT)
    p = argparse.ArgumentParser(prog=name, description=__doc__.splitlines()[0],
                                epilog=examples(__doc__.split("\n", 1)[1], SCRIPT, name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (TOML), e.g. sweeps/a3_lr_demo.toml")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<sweep file name>)")
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="local: subprocesses here; slurm: one array job on Slurm, a task per trial, each "
                        "preemptible and resumed (workflows/slurm_launch.py). Default: [run] executor")
    p.add_argument("--parallel", type=int, default=None, help="trials at a time (default: [run] parallel)")
    p.add_argument("--report-only", action="store_true", help="launch nothing; write the tables and plot")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="adaptive sweeps ([prune], sampler tpe): the study's database, e.g. postgresql://USER@HOST/DB "
                        "(default: Optuna's journal file OUT/study.journal, fit for a shared file system)")
    p.add_argument("--dry-run", action="store_true", help="print the trial commands and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    sweep = read_sweep(args.sweep)
    out = Path(args.out) if args.out else default_out(args.sweep)
    executor = args.executor or sweep.executor
    parallel = args.parallel if args.parallel is not None else sweep.parallel
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    if args.report_only and (out / "sweep.toml").is_file() and \
            (out / "sweep.toml").read_bytes() != Path(args.sweep).read_bytes():
        raise SweepError(f"{out}/sweep.toml is not {args.sweep}: {out} holds the trials of that other sweep file; "
                         f"report it with `{prog(SCRIPT)} {out}/sweep.toml --out {out} --report-only`, or give "
                         f"another --out")
    if not args.dry_run and not args.report_only:
        check_executor(executor)  # before the subset is made and any folder written
    trials = plan_sweep(sweep, out, prepare=not args.dry_run and not args.report_only)
    tpe = sweep.sampler == "tpe"
    total = sweep.random_trials * len(sweep.seeds) if tpe else len(trials)
    title = f"{sweep.path.stem}: {total} trials ({budget_text(sweep)})"
    if args.dry_run:
        if tpe:
            print(f"# sampler tpe: {total} trials proposed as the sweep runs; the space's first draws:")
        for t in trials:
            print(" ".join(t.command()))
        return 0
    if sweep.adaptive and not args.report_only:
        from workflows.sweep.study import open_study

        open_study(sweep, out, args.storage)  # a missing Optuna, a bad --storage: one line, before anything runs
    todo = pending(trials) if not tpe else trials  # TPE: the study knows what is left
    listed = lambda: study_trials(out) if tpe else trials  # noqa: E731  (what the tables list)
    if not args.report_only and (todo or tpe):
        start_sweep(sweep, todo or trials, out)
        print(f"sweep: {total} trials, {len(trials) - len(todo) if not tpe else len(study_trials(out))} "
              f"{'done' if not tpe else 'started'} before, {executor}, {parallel} at a time"
              f"{'; ' + sweep.prune.kind + ' pruning' if sweep.prune.kind != 'none' else ''}"
              f"{'; TPE proposes the trials' if tpe else ''} -> {out}", flush=True)
        count = {"n": 0}

        def on_done(record: dict) -> None:
            count["n"] += 1
            print(f"[{count['n']}] {trial_summary(record)}", flush=True)

        try:
            if sweep.adaptive:
                run_adaptive(sweep, todo if not tpe else [], executor, parallel, out, args.storage, on_done)
            else:
                run_trials(todo, executor, parallel, out, sweep.slurm, on_done)
        except KeyboardInterrupt:
            write_report(listed(), sweep.swept_keys, out, title, adaptive=_adaptive(sweep, total))
            if executor == "local":
                print("sweep: interrupted; run the same command again to continue", file=sys.stderr)
            else:
                print("sweep: stopped waiting; the submitted jobs keep running: collect them with --report-only, "
                      "or wait again with the same command (it submits only trials Slurm no longer lists)",
                      file=sys.stderr)
            return 130
    elif not todo:
        print(f"sweep: all {len(trials)} trials are done; writing the tables", flush=True)
    if not out.is_dir():
        raise SweepError(f"{out} does not exist: nothing has run yet (drop --report-only)")
    rows = write_report(listed(), sweep.swept_keys, out, title, adaptive=_adaptive(sweep, total))
    failed = [r for r in rows if r["status"] not in ("done", "pruned")]
    best = rows[0] if rows and rows[0]["val_top1"] is not None else None
    if best:
        print(f"sweep: best val top-1 {best['val_top1']:.2f} ({best['overrides'] or 'base'}, seed {best['seed']}); "
              f"tables in {out / 'results.md'}", flush=True)
    if failed and not args.report_only:
        print(f"error: {len(failed)} of {len(rows)} trials not done (e.g. {failed[0]['folder']}/log.txt); "
              f"rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _adaptive(sweep, total: int) -> dict | None:
    """What the tables of an adaptive sweep add: each trial's state in the study, the compute used
    against ``total`` trials run to the whole budget, the best trial as a command."""
    if not sweep.adaptive:
        return None
    return {"epochs": sweep.epochs, "base": str(sweep.base), "fixed": sweep.fixed, "pruner": sweep.prune.kind,
            "sampler": sweep.sampler, "full_trials": total}


def cli() -> None:
    """The ``rsb-sweep`` console script: :func:`main`, then the same end as ``python -m``: at once, without
    the interpreter's teardown (common/process_exit.py)."""
    from common.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
