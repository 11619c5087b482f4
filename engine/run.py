"""Train a recipe: the engine's command line (``rsb-train``, or ``python -m engine.run``).

Works as a single process, under ``torchrun``, or as the tasks of a Slurm ``srun`` step. User-caused
errors (bad recipe, missing data, missing backend) print one line to stderr and exit with status 2; no
traceback.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from common.cli import examples, prog
from common.config import ConfigError, explain, key_sources, load_config, to_toml

MODULE = "python -m engine.run"
DESCRIPTION = "Train a recipe (TOML) into a run folder: checkpoints, metrics.jsonl, exports."
EXAMPLES = f"""examples:
  {MODULE} recipes/demo.toml --out runs/demo                # the demo recipe, one process
  {MODULE} recipes/a1.toml --out runs/a1 --resume auto      # continue a stopped run
  {MODULE} recipes/a3.toml --set optim.lr=0.006 --set data.pipeline=dali
  {MODULE} recipes/a1.toml --help-config                    # every key: value, where it is set, what it does
  torchrun --nproc_per_node 8 -m engine.run recipes/a1.toml --out runs/a1   # one node, 8 GPUs

Exit status: 0 done; 2 a user error (one line); 3 a diverged run; 128 + signal when stopped by
SIGTERM/SIGINT after writing a checkpoint (continue with --resume auto)."""


def build_parser() -> argparse.ArgumentParser:
    name = prog(MODULE)
    p = argparse.ArgumentParser(prog=name, description=DESCRIPTION, epilog=examples(EXAMPLES, MODULE, name),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe TOML, e.g. recipes/a1.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set optim.lr=0.008")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as TOML and exit")
    p.add_argument("--help-config", action="store_true",
                   help="list every recipe key with its value, whether the recipe (and which file), --set or the "
                        "default gives it, and what it does")
    p.add_argument("--out", default=None, help="output folder (checkpoints, metrics.jsonl); default runs/<recipe>")
    p.add_argument("--resume", default=None,
                   help="'auto': continue from the newest usable checkpoint in --out; a ckpt-*.pt path; 'fresh': "
                        "start over in an --out that holds checkpoints (they are moved into --out/previous-<time>/)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (N >= 1; smoke runs), then evaluate and export, no checkpoint; "
                        "the evaluation still covers the whole val set unless --set eval.max_images=M caps it")
    return p


def check_resume(value: str | None) -> str | None:
    """``--resume``: auto, fresh or a checkpoint file; None when it is one of them, else one line."""
    if value is None or value in ("auto", "fresh") or Path(value).is_file():
        return None
    close = difflib.get_close_matches(value, ["auto", "fresh"], n=1, cutoff=0.6)
    if close:
        return f"--resume {value}: did you mean --resume {close[0]}? (auto: continue from the newest checkpoint in " \
               f"--out; fresh: start over; or a ckpt-*.pt file)"
    return f"--resume {value}: no such checkpoint file; give auto (continue from the newest checkpoint in --out), " \
           f"fresh (start over) or a ckpt-*.pt file"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe is None:
        if args.help_config:
            print(explain())
            return 0
        parser.error(f"the recipe is required, e.g. {parser.prog} recipes/a3.toml")
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        from engine.distributed import process_ranks
        from engine.logging import say_once

        # under torchrun or srun every rank finds it: rank 0 says it (before init_distributed, from the launcher's env)
        ranks = process_ranks()
        say_once(f"error: {e}", ranks.rank, ranks.world_size)
        return 2
    if args.help_config:
        print(explain(cfg, key_sources(args.recipe, args.overrides)))
        return 0
    problem = check_resume(args.resume)
    if problem is None and args.max_steps is not None and args.max_steps < 1:
        problem = f"--max-steps {args.max_steps}: give a number of optimizer steps >= 1 (or leave it out to train " \
                  f"the whole recipe)"
    if problem is not None:
        from engine.distributed import process_ranks
        from engine.logging import say_once

        ranks = process_ranks()
        say_once(f"error: {problem}", ranks.rank, ranks.world_size)
        return 2
    if args.print_config:
        print(to_toml(cfg))
        return 0
    from pipelines.worker_server import start_early

    start_early(cfg.data)  # before this process imports torch (engine.loop)
    from engine.loop import train

    out = Path(args.out) if args.out else Path("runs") / Path(args.recipe).stem
    try:
        return train(cfg, out, resume=args.resume, max_steps=args.max_steps)
    except KeyboardInterrupt:  # Ctrl-C where no stop with a checkpoint could be made: starting up, or a second one
        print("error: interrupted (Ctrl-C) where the run could not stop with a checkpoint (while starting up, or a "
              "second Ctrl-C during the first one's checkpoint); continue from the last checkpoint with --resume auto",
              file=sys.stderr, flush=True)
        return 130


def cli() -> None:
    """The ``rsb-train`` console script: :func:`main`, then the same end as ``python -m``: at once, without
    the interpreter's teardown (common/process_exit.py)."""
    from common.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
