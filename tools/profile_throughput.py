"""Measure training throughput and say where the bottleneck is.

    python tools/profile_throughput.py all recipes/demo.toml --batch-sizes 64,128,256 --resolutions 32,64
    python tools/profile_throughput.py data recipes/a1.toml --set data.pipeline=ffcv --set data.workers=16
    python tools/profile_throughput.py model recipes/a1.toml --batch-sizes 128,256 --resolutions 160,224 --compile
    python tools/profile_throughput.py e2e recipes/a3.toml --steps 50 --out runs/profile-a3

MODE: ``data`` (stage 1 alone, stage 1 + stage 2, synthetic + stage 2 as the ceiling; images/s and
images/s per worker), ``model`` (synthetic batches on the device through the engine's training
step: stage 2, forward, backward, optimizer), ``e2e`` (the recipe's real pipeline through the same
step: images/s and the fraction of time waiting for data; the model step is measured too, to compare)
or ``all``. Each (batch size, resolution) pair is one point, one process, per-device batch, no
accumulation. Prints a table and a one-line verdict, writes OUT/profile.json (every figure and the
environment) and OUT/profile.png (images/s vs batch size). Logic: engine/profiling.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import profiling  # noqa: E402
from common.config import ConfigError, load_config, to_dict  # noqa: E402
from engine.data import check_data_root  # noqa: E402
from models.factory import UnknownModelError  # noqa: E402
from pipelines.base import DataError, MissingBackendError  # noqa: E402

MODES = ("data", "model", "e2e", "all")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__.split("\n", 1)[1])
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


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise profiling.ProfileError(f"--device {name}: use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise profiling.ProfileError(f"--device {name} but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    if args.mode not in MODES:
        raise profiling.ProfileError(f"unknown mode {args.mode!r}; choose one of {', '.join(MODES)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise profiling.ProfileError("--steps and --repeats must be >= 1, --warmup >= 0")
    device = _device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise profiling.ProfileError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, args.overrides)
    cfg = profiling.apply_toggles(cfg, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                                  device=device)
    t = cfg.train
    batches = (profiling.parse_int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes
               else [t.per_device_batch_size or t.global_batch_size])
    resolutions = (profiling.parse_int_list(args.resolutions, "--resolutions") if args.resolutions
                   else [t.train_res])
    modes = ("data", "model", "e2e") if args.mode == "all" else (args.mode,)
    if cfg.data.pipeline != "synthetic" and modes != ("model",):
        check_data_root(cfg.data)  # before any progress line, so the error is the only output
    if "e2e" in modes and "model" not in modes:
        modes = ("model", *modes)  # e2e is read against the synthetic step at the same point
    out = args.out or ROOT / "runs" / f"profile-{Path(args.recipe).stem}"
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for res in resolutions:
            for batch in batches:
                for mode in modes:
                    print(f"measuring {mode}: batch {batch}, res {res}, round {repeat + 1}/{args.repeats}",
                          file=sys.stderr, flush=True)
                    kw = dict(steps=args.steps, warmup=args.warmup, device=device)
                    if mode == "data":
                        rows += profiling.measure_data(cfg, batch, res, **kw)
                    else:
                        rows.append(profiling.measure_step(cfg, batch, res, synthetic=mode == "model", **kw))
    rows = profiling.merge_repeats(rows)
    profiling.add_ceiling_ratios(rows)
    env = profiling.environment(device, cfg)
    verdict = profiling.diagnose(rows, env)

    sys.stderr.flush()
    print(profiling.format_table(rows))
    print(f"bottleneck: {verdict}")
    note = profiling.spread_note(rows)
    if note:
        print(note)
    report = {"recipe": str(args.recipe), "overrides": args.overrides, "mode": args.mode,
              "settings": {"batch_sizes": batches, "resolutions": resolutions, "steps": args.steps,
                           "warmup": args.warmup, "repeats": args.repeats, "precision": t.precision,
                           "channels_last": t.channels_last,
                           "compile": t.compile},
              "environment": env, "measurements": rows, "bottleneck": verdict, "note": note,
              "seconds_total": time.perf_counter() - started, "config": to_dict(cfg)}
    (out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"{Path(args.recipe).name} on {env['device_name']} ({env['device']}), {cfg.data.pipeline}, " \
            f"{cfg.data.workers} workers, {t.precision}, {env['torch_threads']} torch threads"
    profiling.plot(rows, out / "profile.png", title)
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, MissingBackendError, UnknownModelError, profiling.ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; drop the largest value from --batch-sizes or --resolutions", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
