"""`make demo`: Fashion-MNIST as an ImageNet-style folder tree -> converter -> train recipes/demo.toml.

Each step is skipped when its output is already complete (the converter's manifest, the demo tree),
so a second `make demo` only retrains. Prints the final validation top-1.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SRC = DEMO / "src"
CONVERTED = DEMO / "converted"


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        sys.exit(f"demo: step failed with exit status {rc}: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other options (e.g. --set "
                                     "train.epochs=1) are passed to python -m engine.run recipes/demo.toml.")
    _, extra = parser.parse_known_args(argv)
    t0 = time.time()
    fmnist = Path("/usr/share/datasets/fashion-mnist")
    if not fmnist.is_dir():
        sys.exit("demo: Fashion-MNIST is missing; as root run `apt-get install dataset-fashion-mnist` "
                 "(make demo does this when run as root)")
    if not (SRC / "val").is_dir():
        run([sys.executable, "tools/make_demo_data.py", "--out", str(SRC)])
    manifest = CONVERTED / "manifest.json"
    formats = _formats()
    if not manifest.is_file() or set(json.loads(manifest.read_text()).get("formats", [])) != set(formats):
        run([sys.executable, "tools/convert_imagenet.py", str(SRC), str(CONVERTED), "--formats", ",".join(formats),
             "--workers", "2"])
    out = ROOT / "runs" / "demo"
    if out.exists():  # a fresh run each time: old checkpoints would otherwise be resumed or mixed in
        shutil.rmtree(out)
    run([sys.executable, "-m", "engine.run", "recipes/demo.toml", "--out", str(out)] + extra)
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_top1" in line]
    print(f"demo: done in {time.time() - t0:.0f} s; final val top-1 {final[-1]['val_top1']:.2f}% "
          f"(run folder {out.relative_to(ROOT)})", flush=True)
    return 0


def _formats() -> list[str]:
    formats = []
    try:
        import ffcv  # noqa: F401
        formats.append("ffcv")
    except ImportError:
        print("demo: FFCV not installed; converting to DALI shards only", flush=True)
    formats.append("dali")
    return formats


if __name__ == "__main__":
    sys.exit(main())
