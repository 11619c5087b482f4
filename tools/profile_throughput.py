"""Measure training throughput and say where the bottleneck is.

    python tools/profile_throughput.py all recipes/demo.toml --batch-sizes 64,128,256 --resolutions 32,64
    python tools/profile_throughput.py data recipes/a1.toml --set data.pipeline=ffcv --set data.workers=16
    python tools/profile_throughput.py model recipes/a1.toml --batch-sizes 128,256 --resolutions 160,224 --compile
    python tools/profile_throughput.py e2e recipes/a3.toml --steps 50 --out runs/profile-a3

MODE: ``data`` (stage 1 alone and stage 1 + stage 2: images/s and images/s per worker), ``model``
(the bare step, the ceiling: one batch already normalised on the device through the engine's
training loop: forward, backward, optimizer; no stage 1, no stage 2), ``e2e`` (the recipe's real
pipeline and stage 2 through the same loop: images/s and the fraction of time waiting for data; the
bare step is measured too, to compare) or ``all``. Every mode also times stage 2 alone (RandAugment,
mixup/CutMix, normalisation on one decoded batch on the device). Each (batch size, resolution) pair
is one point, one process, per-device batch, no accumulation. Prints a table, then one short line per
finding, each with its batch size and resolution: "bottleneck:" (the slowest of stage 1, stage 2 and
the step), "figures:" (what that rests on), "advice:" (what to change); advice whose figures come
from repeats that disagree (more than 1.5x, or more than the effect claimed) is "held back:" with the
reason. Writes OUT/profile.json (every figure, the findings and the environment) and OUT/profile.png
(images/s vs batch size, the bottleneck marked). Logic: workflows/profiling/ (measure, verdict, report).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import examples, prog

SCRIPT = "python tools/profile_throughput.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    name = prog(SCRIPT)
    p = _Parser(prog=name, description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=examples(__doc__.split("\n", 1)[1], SCRIPT, name))
    p.add_argument("mode", help="data | model | e2e | all")
    p.add_argument("recipe", help="recipe TOML, e.g. recipes/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), as for python -m engine.run")
    p.add_argument("--batch-sizes", help="per-device batch sizes, e.g. 64,128 (default: the recipe's)")
    p.add_argument("--resolutions", help="train resolutions, e.g. 160,224 (default: train.train_res)")
    p.add_argument("--steps", type=int, default=20, help="timed batches / optimizer steps per point")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches / steps before each window")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every point this many times, interleaved, and keep the median (shared machines)")
    p.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--out", type=Path, help="folder for profile.json and profile.png (default runs/profile-<recipe>)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (--amp: the recipe's bf16/fp16, or bf16; --no-amp: fp32; default: the recipe)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: train.channels_last")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: train.compile on CUDA, off on CPU)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from workflows import profiling

    report = profiling.profile(args.recipe, args.mode, overrides=args.overrides, batch_sizes=args.batch_sizes,
                               resolutions=args.resolutions, steps=args.steps, warmup=args.warmup,
                               repeats=args.repeats, threads=args.threads, device=args.device, amp=args.amp,
                               channels_last=args.channels_last, compile=args.compile, out=args.out)
    sys.stderr.flush()
    print(profiling.report.format_table(report["measurements"]))
    for line in profiling.verdict.verdict_lines(report["findings"]):
        print(line)
    if report["note"]:
        print(f"note: {report['note']}")
    json_path, png_path = profiling.report.write_profile(report)
    print(f"wrote {json_path} and {png_path}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and usage errors answer at once
    import torch

    from common.config import ConfigError
    from models.factory import UnknownModelError
    from pipelines.base import DataError, MissingBackendError
    from workflows import profiling

    try:
        return run(args)
    except (ConfigError, DataError, MissingBackendError, UnknownModelError, profiling.ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; drop the largest value from --batch-sizes or --resolutions", file=sys.stderr)
        return 2


def cli() -> None:
    """The ``rsb-profile`` console script: :func:`main`, then the same end as ``python -m``: at once, without
    the interpreter's teardown (common/process_exit.py)."""
    from common.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
