"""Ours against the peer a user would otherwise run: timm's loader and training step, on the demo data.

    python -m benchmarks.bench_vs_timm                      # 2 epochs each, one round
    python -m benchmarks.bench_vs_timm --epochs 6 --rounds 2 --backends ffcv,dali
    python -m benchmarks.bench_vs_timm --precision bf16      # both sides under bf16 autocast

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

Each round also times both sides' *bare step* (one batch already decoded, augmented and mixed, put
through forward, backward and the optimizer again and again; no loader): timm's loop above on one
fixed batch, and ours as ``tools/profile_throughput.py all`` measures it (the engine's own
``train_one_epoch``), with each backend's stage 1 and stage 2 alone from the same profiler run. Three
things follow. Whether the two steps are alike (the end-to-end gap is then the data path's). The
ceiling: no loader makes ours faster than our bare step, so our bare step / timm's end to end is the
most any backend of ours can reach on this machine, a goal above it cannot be met here by the data
path, only by a faster step (a GPU, bf16, compile). And, as the CPU runs stage 1, stage 2 and the step
on the same cores, the rate they reach taking turns (:func:`shared_cores_bound`): an estimate of the
most ours can reach here with its data path as it is (overlap hides waiting, not CPU work).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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
# The bare step: untimed steps, then BARE_REPEATS windows of BARE_STEPS timed ones, median kept (this
# machine's speed moves by tens of percent within a minute, so one short window is not enough).
BARE_WARMUP, BARE_STEPS, BARE_REPEATS = 10, 40, 3


def _set_args(backend: str, epochs: int, precision: str) -> list[str]:
    """The ``--set`` arguments that make our run the timm side's twin (see the module docstring)."""
    sets = [f"data.pipeline={backend}", f"train.epochs={epochs}", "train.progressive.kind=none",
            f"train.train_res={RES}", f"train.global_batch_size={BATCH}", f"data.workers={WORKERS}",
            f"train.precision={precision}", "checkpoint.every_minutes=0", "log.progress=false"]
    return [a for s in sets for a in ("--set", s)]


def _run(cmd: list[str], what: str) -> None:
    """One side in its own process; its stderr tail if it fails."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed: {proc.stderr[-2000:]}")


def ours(backend: str, epochs: int, out: Path, precision: str) -> dict:
    """One engine run; img/s over the epochs' training time, final val top-1."""
    if out.exists():
        shutil.rmtree(out)
    _run([PY, "-m", "engine.run", "recipes/demo.toml", "--out", str(out)] + _set_args(backend, epochs, precision),
         f"{backend}: the engine")
    from workflows.run_report import summarize  # what make demo prints: img/s over the epochs' training time

    s = summarize(out)
    return {"side": f"ours ({backend})", "images_per_s": s["images_per_s"], "train_s": s["train_s"],
            "val_top1": s["val_top1"]}


def ours_profile(backend: str, out: Path, precision: str) -> dict:
    """``tools/profile_throughput.py all`` for one backend at the run's settings: its stage 1 alone, stage 2
    alone and the bare step (the engine's train_one_epoch on one fixed batch), each on the whole machine."""
    _run([PY, "tools/profile_throughput.py", "all", "recipes/demo.toml", "--batch-sizes", str(BATCH),
          "--resolutions", str(RES), "--steps", str(BARE_STEPS), "--warmup", str(BARE_WARMUP),
          "--repeats", str(BARE_REPEATS), "--out", str(out)] + _set_args(backend, 1, precision),
         f"{backend}: the profiler")
    rows = {(m["mode"], m["what"]): m for m in json.loads((out / "profile.json").read_text())["measurements"]}
    bare = rows[("model", "bare step")]
    return {"side": f"ours ({backend}), bare step (no loader)", "images_per_s": bare["images_per_s"],
            "train_s": bare["seconds"], "val_top1": None, "stage1_per_s": rows[("data", "stage1")]["images_per_s"],
            "stage2_per_s": rows[("data", "stage2")]["images_per_s"]}


def shared_cores_bound(step: float, stage1: float, stage2: float) -> float:
    """Images/s end to end when stage 1, stage 2 and the step take turns on the same cores.

    Each rate is measured alone on the whole machine, so one image costs 1/stage1 + 1/stage2 + 1/step
    seconds of the machine; with no idle time the run reaches about the inverse of that sum. Overlap does not
    raise it on a CPU, where all three compete for the same cores (on a GPU, stage 2 and the step leave them).
    An estimate, not a strict bound: a stage that could not keep both cores busy alone costs less than this."""
    return 1.0 / (1.0 / step + 1.0 / stage1 + 1.0 / stage2)


def timm_side(epochs: int, out: Path, precision: str, bare: bool = False) -> dict:
    """timm's loader and step in a fresh process (its own threads and workers, like a separate run)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [PY, __file__, "--timm-run", str(out / "timm.json"), "--epochs", str(epochs), "--precision", precision]
    _run(cmd + (["--bare"] if bare else []), "timm")
    return json.loads((out / "timm.json").read_text())


def timm_run(epochs: int, result: Path, precision: str, bare: bool) -> None:
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
    # As timm's train.py with --amp --amp-dtype bfloat16: autocast around forward and loss, no scaler.
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(x, y):
        with autocast():
            loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    seconds, images, updates = 0.0, 0, 0
    if bare:  # one batch through the loader and mixup, then the step alone (module docstring)
        model.train()
        x, y = mixup(*next(iter(train_loader)))
        x = x.contiguous(memory_format=torch.channels_last)

        def steps(n: int) -> float:
            nonlocal updates
            t0 = time.perf_counter()
            for _ in range(n):
                step(x, y)
                updates += 1
                scheduler.step_update(num_updates=updates)
            return time.perf_counter() - t0

        steps(BARE_WARMUP)
        windows = [steps(BARE_STEPS) for _ in range(BARE_REPEATS)]
        result.write_text(json.dumps({"side": "timm, bare step (no loader)",
                                      "images_per_s": BARE_STEPS * BATCH / statistics.median(windows),
                                      "train_s": sum(windows), "val_top1": None}))
        return
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = mixup(x, y)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = step(x, y)
            updates += 1
            scheduler.step_update(num_updates=updates)
            images += x.shape[0]
        seconds += time.perf_counter() - t0
        print(f"timm epoch {epoch}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.eval()
    correct = total = 0
    with torch.no_grad(), autocast():
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
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="both sides (fp32: what train.precision=auto picks on CPU; bf16: autocast, as RSB on GPUs)")
    p.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare-step rows and the ceiling")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_vs_timm")
    p.add_argument("--timm-run", type=Path, help=argparse.SUPPRESS)  # internal: the timm side's process
    p.add_argument("--bare", dest="timm_bare", action="store_true", help=argparse.SUPPRESS)  # internal, with --timm-run
    args = p.parse_args(argv)
    if args.timm_run:
        timm_run(args.epochs, args.timm_run, args.precision, args.timm_bare)
        return 0
    if not (SRC / "train").is_dir() or not (CONVERTED / "manifest.json").is_file():
        raise SystemExit("the demo data is missing: run `make demo` first (it writes data/demo/src and converted)")
    backends = [b for b in args.backends.split(",") if b]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.epochs} epochs, batch {BATCH}, res {RES}, "
          f"{WORKERS} workers, {args.precision}", flush=True)
    sides = ["timm", *backends] + (["timm-bare", *(f"{b}-bare" for b in backends)] if args.bare else [])
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for side in sides:
            out = args.out / f"{side}-{rnd}"
            if side in ("timm", "timm-bare"):
                r = timm_side(args.epochs, out, args.precision, bare=side == "timm-bare")
            elif side.endswith("-bare"):
                r = ours_profile(side[:-len("-bare")], out, args.precision)
            else:
                r = ours(side, args.epochs, out, args.precision)
            results.setdefault(side, []).append(r)
            top1 = "" if r["val_top1"] is None else f", val top-1 {r['val_top1']:.2f}"
            print(f"round {rnd + 1} {r['side']}: {r['images_per_s']:.0f} img/s ({r['train_s']:.0f} s training){top1}",
                  flush=True)

    def median_ips(side: str) -> float:
        return statistics.median(r["images_per_s"] for r in results[side])

    timm_ips = median_ips("timm")
    timm_top1 = sum(r["val_top1"] for r in results["timm"]) / len(results["timm"])
    print("\n| side | img/s (median) | x timm | val top-1 (mean) | top-1 - timm |\n|---|---|---|---|---|")
    for side, rs in results.items():
        ips = median_ips(side)
        if rs[0]["val_top1"] is None:
            print(f"| {rs[0]['side']} | {ips:,.0f} | {ips / timm_ips:.2f}x | - | - |")
            continue
        top1 = sum(r["val_top1"] for r in rs) / len(rs)
        print(f"| {rs[0]['side']} | {ips:,.0f} | {ips / timm_ips:.2f}x | {top1:.2f} | {top1 - timm_top1:+.2f} |")
    if args.bare:
        # The two limits on ours here (module docstring): the bare step with data free, and the bare step
        # sharing the cores with its own stage 1 and 2 (each backend's rates from the same profiler run).
        print()
        for b in backends:
            step, stage1, stage2 = (statistics.median(r[k] for r in results[f"{b}-bare"])
                                    for k in ("images_per_s", "stage1_per_s", "stage2_per_s"))
            bound = shared_cores_bound(step, stage1, stage2)
            print(f"ours ({b}): data free, at most its bare step {step:,.0f} img/s = "
                  f"{step / timm_ips:.2f}x timm; sharing the cores with stage 1 "
                  f"({stage1:,.0f} img/s alone) and stage 2 ({stage2:,.0f} img/s alone), "
                  f"about {bound:,.0f} img/s = {bound / timm_ips:.2f}x timm; measured {median_ips(b):,.0f} img/s "
                  f"({median_ips(b) / bound:.0%} of that)")
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
