#!/usr/bin/env python
"""Write an ImageNet-style class-folder tree of JPEGs from Debian's Fashion-MNIST for the demo.

    python tools/make_demo_data.py [--out data/demo/src] [--size 64] [--train-per-class N] [--val-per-class N]

The library is ``pipelines.convert.demo_data``; exit 2 with one line on a usage error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.convert.demo_data import FMNIST_DIR, make_demo_tree

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "demo" / "src")
    p.add_argument("--fmnist", type=Path, default=FMNIST_DIR, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--size", type=int, default=64, help="side of the square RGB images in px")
    p.add_argument("--train-per-class", type=int, default=0, help="images per class in train (0 = all 6000)")
    p.add_argument("--val-per-class", type=int, default=0, help="images per class in val (0 = all 1000)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU)")
    args = p.parse_args(argv)
    if not 8 <= args.size <= 4096:
        print(f"make_demo_data: error: --size must be in 8..4096, got {args.size}", file=sys.stderr)
        return 2
    if min(args.train_per_class, args.val_per_class, args.workers) < 0 or not 1 <= args.quality <= 100:
        print("make_demo_data: error: per-class limits and --workers must be >= 0, --quality in 1..100", file=sys.stderr)
        return 2
    if not args.fmnist.is_dir():
        print(f"make_demo_data: error: {args.fmnist} not found (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        counts = make_demo_tree(args.out, args.fmnist, args.size, args.train_per_class, args.val_per_class,
                                args.quality, args.workers)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 2
    print(f"make_demo_data: {counts['train']} train + {counts['val']} val images, {args.size}x{args.size}, "
          f"in {args.out} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
