"""Ours against the peer a user would otherwise run: timm's loader and training step, on the demo data.

    python -m benchmarks.bench_vs_timm                      # 2 epochs each, one round
    python -m benchmarks.bench_vs_timm --epochs 6 --rounds 2 --backends ffcv,dali

timm side (what ``timm/train.py`` builds for the same A3-shaped recipe, here in a loop a reader can
check against it): ``timm.data.create_dataset`` on the demo's class-folder tree, ``timm.data.
create_loader`` (RandomResizedCrop scale 0.35-1 with random bilinear/bicubic, flip, RandAugment
``rand-m6-mstd0.5-inc1``, ``num_workers`` as ours, no prefetcher: there is no GPU here), ``timm.data.
Mixup`` (mixup 0.1, CutMix 1.0, on half the batches, switch 0.5), the same timm ``ResNet`` as ``resnet_tiny``
(models/factory.py's arguments), ``timm.optim.create_optimizer_v2("lamb")`` (no weight decay on
norms and biases, as train.py), ``timm.loss.BinaryCrossEntropy(target_threshold=0.2)``, timm's
``CosineLRScheduler`` with warmup, updated every step; channels-last, fp32 on CPU; eval through
``create_loader(is_training=False)`` at crop_pct 0.875, bicubic.

Our side: ``python -m engine.run recipes/demo.toml`` with the same model, batch, resolution,
schedule and augmentation (progressive resolution off, so both train at 32 px) for each backend.

Both train ``--epochs`` epochs; images/s is training only (evaluation excluded): ours from the
epochs' own totals in metrics.jsonl, timm's from the same span of its loop (loader start included,
as ours). The runs alternate (timm, then each backend of ours, per round). Prints one table: img/s,
ratio to timm, val top-1. The figures and the command go to benchmarks/results/vs_timm.md by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SRC = ROOT / "data" / "demo" / "src"
CONVERTED = ROOT / "data" / "demo" / "converted"

# The schedule and augmentation both sides use (recipes/demo.toml's values, progressive off).
BATCH, RES, CLASSES, WORKERS = 256, 32, 10, 2
LR, WD, WARMUP_EPOCHS, WARMUP_LR, MIN_LR = 0.015, 0.02, 0.5, 1e-4, 1e-5
RAND_AUGMENT, MIXUP, CUTMIX, MIX_PROB, BCE_THRESH = "rand-m6-mstd0.5-inc1", 0.1, 1.0, 0.5, 0.2
SCALE, EVAL_CROP_PCT = (0.35, 1.0), 0.875


def ours(backend: str, epochs: int, out: Path) -> dict:
    """One engine run; img/s over the epochs' training time, final val top-1."""
    if out.exists():
        shutil.rmtree(out)
    sets = [f"data.pipeline={backend}", f"train.epochs={epochs}", "train.progressive.kind=none",
            f"train.train_res={RES}", f"train.global_batch_size={BATCH}", f"data.workers={WORKERS}",
            "checkpoint.every_minutes=0", "log.progress=false"]
    cmd = [PY, "-m", "engine.run", "recipes/demo.toml", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{backend}: engine failed: {proc.stderr[-2000:]}")
    from toolkit.run_report import summarize  # what make demo prints: img/s over the epochs' training time

    s = summarize(out)
    return {"side": f"ours ({backend})", "images_per_s": s["images_per_s"], "train_s": s["train_s"],
            "val_top1": s["val_top1"]}


def timm_side(epochs: int, out: Path) -> dict:
    """timm's loader and step in a fresh process (its own threads and workers, like a separate run)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([PY, __file__, "--timm-run", str(out / "timm.json"), "--epochs", str(epochs)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"timm: failed: {proc.stderr[-2000:]}")
    return json.loads((out / "timm.json").read_text())


def timm_run(epochs: int, result: Path) -> None:
    import timm
    import torch
    from timm.data import Mixup, create_dataset, create_loader
    from timm.loss import BinaryCrossEntropy
    from timm.models.resnet import BasicBlock, ResNet
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    torch.manual_seed(0)
    device = torch.device("cpu")
    train_set = create_dataset("", root=str(SRC / "train"), split="train", is_training=True)
    val_set = create_dataset("", root=str(SRC / "val"), split="validation")
    train_loader = create_loader(
        train_set, input_size=(3, RES, RES), batch_size=BATCH, is_training=True, scale=SCALE, hflip=0.5,
        auto_augment=RAND_AUGMENT, interpolation="random", num_workers=WORKERS, use_prefetcher=False,
        device=device, persistent_workers=True)
    val_loader = create_loader(
        val_set, input_size=(3, RES, RES), batch_size=500, is_training=False, interpolation="bicubic",
        crop_pct=EVAL_CROP_PCT, num_workers=WORKERS, use_prefetcher=False, device=device)
    mixup = Mixup(mixup_alpha=MIXUP, cutmix_alpha=CUTMIX, prob=MIX_PROB, switch_prob=0.5, mode="batch",
                  label_smoothing=0.0,
                  num_classes=CLASSES)
    model = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32,
                   num_classes=CLASSES).to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "lamb", lr=LR, weight_decay=WD)
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=MIN_LR,
                                  warmup_t=int(WARMUP_EPOCHS * steps_per_epoch), warmup_lr_init=WARMUP_LR,
                                  t_in_epochs=False)
    loss_fn = BinaryCrossEntropy(target_threshold=BCE_THRESH, smoothing=0.0)
    seconds, images, updates = 0.0, 0, 0
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = mixup(x, y)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            images += x.shape[0]
        seconds += time.perf_counter() - t0
        print(f"timm epoch {epoch}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            top1 = timm.utils.accuracy(model(x.contiguous(memory_format=torch.channels_last)), y, topk=(1,))[0]
            correct += float(top1) * x.shape[0] / 100.0
            total += x.shape[0]
    result.write_text(json.dumps({"side": "timm (create_loader + step)", "images_per_s": images / seconds,
                                  "train_s": seconds, "val_top1": 100.0 * correct / total}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="timm, then each backend, this many times (alternating)")
    p.add_argument("--backends", default="reference,ffcv,dali")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_vs_timm")
    p.add_argument("--timm-run", type=Path, help=argparse.SUPPRESS)  # internal: the timm side's process
    args = p.parse_args(argv)
    if args.timm_run:
        timm_run(args.epochs, args.timm_run)
        return 0
    if not (SRC / "train").is_dir() or not (CONVERTED / "manifest.json").is_file():
        raise SystemExit("the demo data is missing: run `make demo` first (it writes data/demo/src and converted)")
    backends = [b for b in args.backends.split(",") if b]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.epochs} epochs, batch {BATCH}, res {RES}, "
          f"{WORKERS} workers", flush=True)
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for side in ["timm", *backends]:
            out = args.out / f"{side}-{rnd}"
            r = timm_side(args.epochs, out) if side == "timm" else ours(side, args.epochs, out)
            results.setdefault(side, []).append(r)
            print(f"round {rnd + 1} {r['side']}: {r['images_per_s']:.0f} img/s ({r['train_s']:.0f} s training), "
                  f"val top-1 {r['val_top1']:.2f}", flush=True)
    timm_ips = sorted(r["images_per_s"] for r in results["timm"])[len(results["timm"]) // 2]
    timm_top1 = sum(r["val_top1"] for r in results["timm"]) / len(results["timm"])
    print("\n| side | img/s (median) | x timm | val top-1 (mean) | top-1 - timm |\n|---|---|---|---|---|")
    for side, rs in results.items():
        ips = sorted(r["images_per_s"] for r in rs)[len(rs) // 2]
        top1 = sum(r["val_top1"] for r in rs) / len(rs)
        print(f"| {rs[0]['side']} | {ips:,.0f} | {ips / timm_ips:.2f}x | {top1:.2f} | {top1 - timm_top1:+.2f} |")
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
