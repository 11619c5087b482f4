#!/usr/bin/env python
"""Convert ImageNet (class folders, flat val + label file, or the original tars) into FFCV betons
and DALI webdataset shards, one decode per image, resumable after Ctrl-C or kill -9.

    python tools/convert_imagenet.py SRC OUT [--formats ffcv,dali] [--workers N] [--verify]
    python tools/convert_imagenet.py /data/ILSVRC2012 data/imagenet --formats ffcv,dali --workers 32
    python tools/convert_imagenet.py data/demo/src data/demo/converted --formats dali --workers 2   # the demo data

Exit status: 0 done; 1 more than --max-skip-frac of a split skipped, or --verify found a problem;
2 a usage error (message on one line); 130 interrupted (rerun the same command to resume).
The library is ``pipelines.convert``; this file only parses options and reports.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.cli import examples, prog
from pipelines.convert.convert import FORMATS, WRITE_MODES, Settings, convert, skip_problems
from pipelines.convert.sources import SourceError
from pipelines.convert.state import StateError

D = Settings()
SCRIPT = "python tools/convert_imagenet.py"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, where there is one to show (not None, not a flag's False, not
    where the help says it already); the examples in the epilog as written."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"convert_imagenet: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    name = prog(SCRIPT)
    p = _Parser(prog=name, description=__doc__.split("\n\n")[0], epilog=examples(__doc__.split("\n\n", 1)[1], SCRIPT, name),
                formatter_class=_HelpFormatter)
    p.add_argument("src", type=Path, help="ImageNet folder: train/ + val/, Kaggle root, or the ILSVRC2012 tars")
    p.add_argument("out", type=Path, help="output folder (ffcv/, dali/, manifest.json)")
    p.add_argument("--formats", default=",".join(D.formats), help="comma list of: ffcv, dali")
    p.add_argument("--splits", default=",".join(D.splits), help="comma list of: train, val")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode/encode processes")
    p.add_argument("--max-resolution", type=int, default=D.max_resolution,
                   help="train: cap on the longest side in px (0 = keep originals)")
    p.add_argument("--val-max-resolution", type=int, default=D.val_max_resolution or 0,
                   help="val: cap on the longest side in px (0 = keep originals, as timm evaluates them)")
    p.add_argument("--jpeg-quality", type=int, default=D.jpeg_quality,
                   help="quality of the JPEGs that are re-encoded (CMYK, grey, PNG, rotated, over the cap)")
    p.add_argument("--reencode-all", action="store_true",
                   help="re-encode every image at --jpeg-quality (default: RGB JPEG sources within the cap are "
                        "stored as their original bytes)")
    p.add_argument("--write-mode", default=D.write_mode, choices=WRITE_MODES,
                   help="FFCV payload: jpg, raw pixels, or a random proportion as jpg")
    p.add_argument("--compress-probability", type=float, default=D.compress_probability,
                   help="--write-mode proportion: fraction stored as JPEG")
    p.add_argument("--shard-size", type=int, default=D.shard_size, help="images per DALI shard / resumable chunk")
    p.add_argument("--max-skip-frac", type=float, default=0.001,
                   help="fail (exit 1) when a split skips more than this fraction of its files")
    p.add_argument("--limit-per-class", type=int, default=0, help="first N files per class (0 = all)")
    p.add_argument("--classes", default="", help="comma list of class names, or @FILE with one per line")
    p.add_argument("--val-labels", type=Path, help="LOC_val_solution.csv, the devkit ground truth, or the devkit tar.gz")
    p.add_argument("--meta", type=Path, help="the devkit's meta.mat (default: beside the ground-truth file)")
    p.add_argument("--seed", type=int, default=D.seed, help="train order shuffle seed")
    p.add_argument("--no-shuffle", action="store_true", help="keep train in sorted order (sequential tar reads)")
    p.add_argument("--verify", action="store_true", help="re-read every output and check it against the manifest")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier conversion in OUT")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, else a line every 5%% of the images)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Validate options into Settings; raises ValueError with a one-line message."""
    formats = _csv(args.formats)
    bad = [f for f in formats if f not in FORMATS] or ([] if formats else ["(none)"])
    if bad:
        raise ValueError(f"--formats: {bad[0]} is not one of {', '.join(FORMATS)}")
    splits = _csv(args.splits)
    bad = [s for s in splits if s not in ("train", "val")] or ([] if splits else ["(none)"])
    if bad:
        raise ValueError(f"--splits: {bad[0]} is not one of train, val")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    for flag, value in (("--max-resolution", args.max_resolution), ("--val-max-resolution", args.val_max_resolution)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.compress_probability <= 1.0:
        raise ValueError(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    if not 0.0 <= args.max_skip_frac <= 1.0:
        raise ValueError(f"--max-skip-frac must be in [0, 1], got {args.max_skip_frac}")
    if args.limit_per_class < 0:
        raise ValueError(f"--limit-per-class must be >= 0, got {args.limit_per_class}")
    classes = args.classes
    if classes.startswith("@"):
        try:
            classes = ",".join(Path(classes[1:]).read_text().split())
        except OSError as e:
            raise ValueError(f"--classes {args.classes}: {e.strerror}") from None
    if args.val_labels is not None and not args.val_labels.is_file():
        raise ValueError(f"--val-labels: file not found: {args.val_labels}")
    if args.meta is not None and not args.meta.is_file():
        raise ValueError(f"--meta: file not found: {args.meta}")
    return Settings(formats=tuple(f for f in FORMATS if f in formats), splits=tuple(splits),
                    max_resolution=args.max_resolution or None, val_max_resolution=args.val_max_resolution or None,
                    pass_through=not args.reencode_all, jpeg_quality=args.jpeg_quality,
                    write_mode=args.write_mode, compress_probability=args.compress_probability,
                    shard_size=args.shard_size, shuffle_train=not args.no_shuffle, seed=args.seed,
                    limit_per_class=args.limit_per_class or None,
                    classes=tuple(_csv(classes)) or None)


def _disk_full(e: BaseException) -> bool:
    import errno

    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e)


def _needed_bytes(args) -> int:
    """A rough size of the outputs: the source's bytes once per format (JPEGs re-encoded at about
    their size; FFCV raw pixels are larger, which --write-mode raw users know)."""
    total = sum(p.stat().st_size for p in args.src.rglob("*") if p.is_file())
    return total * max(1, len(_csv(args.formats)))


def _free_bytes(path: Path) -> int:
    import shutil

    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        if not args.src.is_dir():
            raise ValueError(f"source folder not found: {args.src}")
        manifest = convert(args.src, args.out, settings, args.workers, progress=not args.quiet,
                           overwrite=args.overwrite, val_labels=args.val_labels, meta=args.meta)
    except (ValueError, SourceError, StateError) as e:
        print(f"convert_imagenet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convert_imagenet: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if not _disk_full(e):
            raise
        print(f"convert_imagenet: error: no space left on the device of {args.out}: the outputs need about "
              f"{_needed_bytes(args) / 2**20:,.0f} MiB ({_free_bytes(args.out) / 2**20:,.0f} MiB free); free space "
              f"or choose another OUT, then rerun the same command to resume", file=sys.stderr)
        return 2
    status = 0
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['images']} images, {s['num_classes']} classes, {len(s['skipped'])} skipped")
    for problem in skip_problems(manifest, args.max_skip_frac):
        print(f"convert_imagenet: {problem}", file=sys.stderr)
        status = 1
    if args.verify:
        from pipelines.convert.verify import verify

        problems = verify(args.out, args.workers)
        for problem in problems:
            print(f"verify: {problem}", file=sys.stderr)
        print(f"verify: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
        status = status or (1 if problems else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
