"""What ASHA pruning finds and costs on the demo's A3 learning-rate grid, against the same grid run whole.

    python -m benchmarks.bench_asha [--epochs 4] [--min-epochs 1] [--out runs/bench_asha]

Both sweeps are sweeps/a3_lr_asha_demo.toml (7 learning rates x 2 seeds on a 500-per-class subset of the
demo's Fashion-MNIST, ``--epochs`` epochs each), one with its [prune] section (ASHA: a trial goes on
past a rung only while its val top-1 is in the best third of those measured there so far) and one
with ``kind = "none"``. Read from each sweep's own results.csv: the best learning rate (the best
trial's, and the configuration with the best mean over seeds), the learning rates the report cannot
tell from the best (within 2 sigma of the binomial sampling noise of the val set), and the
trial-epochs used. Pruning compares trials mid-schedule: a cosine schedule at epoch 1 of 4 favours
small learning rates (the short-horizon bias, Wu et al. 2018), which is what a later first rung
(``--min-epochs``) trades compute against. Needs the demo's data (make demo).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "a3_lr_asha_demo.toml"


def sweep_file(path: Path, epochs: int, prune: str, min_epochs: int) -> Path:
    """The demo sweep with its paths made absolute, its budget and its [prune] kind."""
    text = SWEEP.read_text().replace('base = "../recipes/a3.toml"', f'base = "{ROOT / "recipes" / "a3.toml"}"')
    text = text.replace('src = "data/demo/src"', f'src = "{ROOT / "data" / "demo" / "src"}"')
    text = text.replace("epochs = 4 ", f"epochs = {epochs} ")
    text = text.replace('kind = "asha"', f'kind = "{prune}"').replace("min_epochs = 1", f"min_epochs = {min_epochs}")
    path.write_text(text)
    return path


def run(spec: Path, out: Path) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "tools/sweep.py", str(spec), "--out", str(out)], cwd=ROOT, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec.name}: the sweep failed: {proc.stderr[-1500:]}")
    return time.time() - t0


def summary(out: Path) -> dict:
    rows = list(csv.DictReader((out / "results.csv").open()))
    done = [r for r in rows if r["status"] == "done"]
    best = max(done, key=lambda r: float(r["val_top1"]))
    by_lr: dict[str, list[float]] = {}
    for r in done:
        by_lr.setdefault(r["optim.lr"], []).append(float(r["val_top1"]))
    mean_best = max(by_lr, key=lambda lr: statistics.fmean(by_lr[lr]))
    near = sorted({r["optim.lr"] for r in done if r["within_noise"] == "True"} | {best["optim.lr"]}, key=float)
    used = 0.0
    for r in rows:
        if r["status"] == "done":
            used += float(r["epochs"])
        elif r["status"] == "pruned":
            used += int(float(r.get("pruned_at_epoch") or 0)) + 1
    return {"best_lr": best["optim.lr"], "best_top1": float(best["val_top1"]), "mean_best_lr": mean_best,
            "mean_best_top1": statistics.fmean(by_lr[mean_best]), "near": near, "used": used,
            "pruned": sum(r["status"] == "pruned" for r in rows), "done": len(done), "trials": len(rows),
            "noise": float(best["top1_2sigma"]) if best.get("top1_2sigma") else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--min-epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_asha")
    p.add_argument("--write", type=Path, default=ROOT / "benchmarks" / "results" / "asha.md")
    a = p.parse_args(argv)
    if not (ROOT / "data" / "demo" / "src" / "train").is_dir():
        raise SystemExit("the demo data is missing: run `make demo` first")
    a.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    seconds, results = {}, {}
    for kind in ("none", "asha"):
        spec = sweep_file(a.out / f"{kind}.toml", a.epochs, kind, a.min_epochs)
        seconds[kind] = run(spec, a.out / kind)
        results[kind] = summary(a.out / kind)
        print(f"{kind}: {results[kind]} in {seconds[kind]:.0f} s", flush=True)
    g, h = results["none"], results["asha"]
    same = h["best_lr"] in g["near"]
    full = g["trials"] * a.epochs
    lines = [f"# ASHA on the demo's A3 learning-rate grid ({time.strftime('%Y-%m-%d')})", "",
             f"`python -m benchmarks.bench_asha {' '.join(sys.argv[1:] if argv is None else argv)}` on this "
             f"{os.cpu_count()}-CPU machine; load average {load[0]:.1f} at the start. sweeps/a3_lr_asha_demo.toml: "
             f"7 learning rates x 2 seeds, {a.epochs} epochs each on 5,000 train / 5,000 val images; ASHA with its "
             f"first rung after {a.min_epochs} epoch(s), reduction factor 3, one trial at a time in grid order.", "",
             "| | grid, every trial whole | grid with ASHA |", "|---|---|---|",
             f"| best trial's lr (val top-1) | {g['best_lr']} ({g['best_top1']:.2f}) | {h['best_lr']} "
             f"({h['best_top1']:.2f}) |",
             f"| best mean over seeds | {g['mean_best_lr']} ({g['mean_best_top1']:.2f}) | {h['mean_best_lr']} "
             f"({h['mean_best_top1']:.2f}) |",
             f"| lrs within the noise band of the best (± 2σ, about {g['noise'] or 0:.1f} points) | "
             f"{', '.join(g['near'])} | {', '.join(h['near'])} |",
             f"| trials complete / pruned | {g['done']} / {g['pruned']} | {h['done']} / {h['pruned']} |",
             f"| trial-epochs used | {g['used']:g} of {full} | {h['used']:g} of {full} "
             f"({h['used'] / full:.0%}) |",
             f"| wall time | {seconds['none'] / 60:.1f} min | {seconds['asha'] / 60:.1f} min |", "",
             f"ASHA's best learning rate is {'within' if same else 'OUTSIDE'} the grid's noise band of its best, for "
             f"{h['used'] / g['used']:.0%} of the grid's trial-epochs."]
    text = "\n".join(lines) + "\n"
    print(text)
    a.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
