"""`make demo`: Fashion-MNIST as an ImageNet-style folder tree -> converter -> train recipes/demo.toml.

The recipe is RSB A3's shape scaled down (RandAugment, mixup/CutMix, BCE with a target threshold,
LAMB, warmup + cosine, progressive resolution; a small timm ResNet): the product's own path, through
DALI (recipes/demo.toml says why DALI rather than FFCV). Each step
is skipped when its output is already complete (the converter's manifest, the demo tree), so a
second `make demo` only retrains. Ends with a short summary (val top-1, img/s, data-wait, wall time,
run folder) and RUN/metrics.png (train loss, lr, val top-1 over time). Uses a CUDA GPU when torch
sees one, as the engine does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from common.config import load_config
from engine import run as engine_run
from tools import convert_imagenet, make_demo_data
from workflows.run_report import format_summary, minutes, plot_metrics, read_metrics, summarize

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "data" / "demo"
SRC = DEMO / "src"
CONVERTED = DEMO / "converted"
RECIPE = "recipes/demo.toml"


def run(command: str, main, argv: list[str]) -> None:
    """One step, as the command a user would type (printed) and run in this process: ``main(argv)``."""
    print(f"+ {command} {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc != 0:
        sys.exit(f"demo: step failed with exit status {rc}: {command} {' '.join(argv)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other options (e.g. --set "
                                     f"train.epochs=1) are passed to python -m engine.run {RECIPE}.")
    _, extra = parser.parse_known_args(argv)
    os.chdir(ROOT)  # the recipe's data.root (data/demo/converted) is relative to the repository
    t0 = time.time()
    fmnist = Path("/usr/share/datasets/fashion-mnist")
    if not fmnist.is_dir():
        sys.exit("demo: Fashion-MNIST is missing; as root run `apt-get install dataset-fashion-mnist` "
                 "(make demo does this when run as root)")
    if not (SRC / "val").is_dir():
        run("python tools/make_demo_data.py", make_demo_data.main, ["--out", str(SRC)])
    manifest = CONVERTED / "manifest.json"
    formats = _formats()
    if not manifest.is_file() or set(json.loads(manifest.read_text()).get("formats", [])) != set(formats):
        run("python tools/convert_imagenet.py", convert_imagenet.main,
            [str(SRC), str(CONVERTED), "--formats", ",".join(formats), "--workers", "2"])
    pipeline = load_config(ROOT / RECIPE).data.pipeline
    print(f"demo: training through {pipeline} (stage 1) and the batched stage 2 (RandAugment, mixup/CutMix); "
          f"{RECIPE} says why this backend", flush=True)
    out = ROOT / "runs" / "demo"
    if out.exists():  # a fresh run each time: old checkpoints would otherwise be resumed or mixed in
        shutil.rmtree(out)
    run("python -m engine.run", engine_run.main, [RECIPE, "--out", str(out)] + extra)
    records = read_metrics(out)
    summary = summarize(out.relative_to(ROOT), records)
    png = _plot(records, out / "metrics.png", f"{RECIPE} through {pipeline}")
    import torch  # after training: the summary names the device the engine picked (CUDA when it sees one)

    device = "CUDA GPU" if torch.cuda.is_available() else "CPU"
    print(format_summary(summary, pipeline=pipeline, device=device, png=png and png.relative_to(ROOT)))
    print(f"demo: done in {minutes(time.time() - t0)} in all (data, conversion and training)", flush=True)
    return 0


def _plot(records, path: Path, title: str) -> Path | None:
    try:
        return plot_metrics(records, path, title)
    except ImportError:
        print("demo: matplotlib is not installed (extra `dev`): no metrics.png", flush=True)
        return None


def _formats() -> list[str]:
    """The converter's formats: DALI (the demo's) always, FFCV too when installed (a few seconds more; the
    sweep and benchmarks/bench_vs_timm.py read it)."""
    import importlib.util

    return ["dali", "ffcv"] if importlib.util.find_spec("ffcv") else ["dali"]


if __name__ == "__main__":
    sys.exit(main())
