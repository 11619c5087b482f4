"""The GPU check: one command that measures the CUDA path on one GPU and writes benchmarks/results/gpu.md
(run as ``python -m benchmarks.gpu_check``; the test suite runs ``--smoke`` through this module).

    python -m benchmarks.gpu_check                 # on a CUDA machine (needs torch, torchvision, timm)
    python -m benchmarks.gpu_check --smoke --out /tmp/gpu.md   # tiny sizes on CPU

Run from the repository root with ``-m`` (the project need not be installed). It measures, with
ResNet-50 and recipes/a1.toml's settings, in one process:

1. the bare training step (a normalized batch already on the device; forward, backward, optimizer)
   as the engine runs it (``engine.step.train_one_epoch``), images/s at each resolution, eager
   and compiled (``engine.setup.compile_for_training``), next to the peer: timm's model,
   timm's ``Lamb`` (foreach) and timm's ``BinaryCrossEntropy`` in timm train.py's loop;
2. stage 2 with A1's settings (RandAugment rand-m7-mstd0.5-inc1, mixup 0.2 / CutMix 1.0, targets)
   alone, and its share of an end-to-end step fed by a synthetic uint8 stage 1;
3. ``torch.cuda.set_sync_debug_mode("error")`` over 20 end-to-end steps: any host sync raises;
4. one LAMB step, ours vs timm's ``Lamb(foreach=True)``, on ResNet-50's parameters;
5. peak memory of the step per batch size;
and records the GPU, driver, torch/CUDA versions and the command. Syncs: the device is
synchronised at each end of a timed window only. A deadline (``--budget-s``) skips the optional
compiled resolutions beyond the first when time runs short, and says so.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from common.config import Config, load_config
from engine.setup import compile_for_training
from engine.state import EpochProgress
from engine.step import DTYPES, StepContext, build_step, train_one_epoch
from pipelines.augment import Stage2
from pipelines.base import Batch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: the ends of a timed window


class _Repeat:
    """A stage 1 that hands out the same batch (already on the device) and keeps the clock: when
    batch ``warmup`` is requested every earlier step has been queued, so the device is synchronised
    and the timed window starts (``inside`` is entered); after ``warmup + steps`` batches it
    synchronises, stops the clock and ends the epoch. Batch 1's request times the first step."""

    def __init__(self, batch: Batch, device: torch.device, warmup: int, steps: int, inside=None):
        self.batch, self.device, self.warmup, self.steps, self.inside = batch, device, warmup, steps, inside
        self.marks: dict[str, float] = {}
        self.guard = None

    def __iter__(self):
        self.marks["start"] = time.perf_counter()
        for i in range(self.warmup + self.steps + 1):
            if i == 1:
                _sync(self.device)
                self.marks["first"] = time.perf_counter() - self.marks["start"]
            if i == self.warmup:
                _sync(self.device)
                self.marks["t0"] = time.perf_counter()
                if self.inside is not None:
                    self.guard = self.inside()
                    self.guard.__enter__()
            if i == self.warmup + self.steps:
                self.close()
                _sync(self.device)
                self.marks["t1"] = time.perf_counter()
                return
            yield self.batch

    def close(self) -> None:
        if self.guard is not None:
            guard, self.guard = self.guard, None
            guard.__exit__(None, None, None)

    def __len__(self):
        return self.warmup + self.steps + 1


class _Prepared:
    """A stage 2 that returns one prepared (images, targets) pair: the bare step's input."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.out = (images, targets)

    def __call__(self, batch):
        return self.out


def recipe(args) -> Config:
    sets = ["train.precision=bf16", "train.channels_last=true", "data.pipeline=synthetic"]
    if args.smoke:
        sets += ["model.arch=resnet_tiny", "data.num_classes=10"]
    return load_config(ROOT / "recipes" / "a1.toml", sets)


def uint8_batch(n: int, res: int, classes: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return Batch(images.contiguous(memory_format=torch.channels_last).to(device), labels.to(device))


def make_stage2(cfg: Config, backend: str = "auto") -> Stage2:
    return Stage2(cfg.augment, cfg.data.num_classes, cfg.loss.label_smoothing, train=True, channels_last=True,
                  seed=0, backend=backend)


def engine_context(cfg: Config, device: torch.device, compiled: bool, compile_backend: str) -> StepContext:
    ctx = build_step(cfg, device, steps_per_epoch=1000)
    if compiled:
        ctx.model = compile_for_training(ctx.raw_model, backend=compile_backend)
    return ctx


def time_engine(ctx: StepContext, batch: Batch, stage2, *, warmup: int, steps: int,
                inside: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, float]:
    """``warmup + steps`` steps of ``train_one_epoch``; seconds of the first step (compilation,
    autotuning) and of the last ``steps``. ``inside`` wraps the timed steps (sync debug mode)."""
    feed = _Repeat(batch, ctx.device, warmup, steps, inside)
    try:
        for _ in train_one_epoch(ctx, feed, stage2, EpochProgress(), steps_per_epoch=len(feed), log_every=10**9):
            pass
    finally:
        feed.close()
    return {"first_s": feed.marks["first"], "seconds": feed.marks["t1"] - feed.marks["t0"]}


def timm_peer(cfg: Config, device: torch.device, compiled: bool, compile_backend: str):
    """timm train.py's step: timm model, timm Lamb (foreach, timm's own weight-decay groups), timm
    BinaryCrossEntropy inside autocast, ``zero_grad(set_to_none=True)``."""
    import timm
    from timm.loss import BinaryCrossEntropy
    from timm.optim import Lamb as TimmLamb
    from timm.optim import param_groups_weight_decay

    from models.factory import create_model

    model = create_model(cfg.model, cfg.data.num_classes).to(device).to(memory_format=torch.channels_last)
    o = cfg.optim
    opt = TimmLamb(param_groups_weight_decay(model, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay,
                   betas=tuple(o.betas), eps=o.eps, max_grad_norm=o.max_grad_norm, foreach=True)
    loss_fn = BinaryCrossEntropy(smoothing=cfg.loss.label_smoothing, target_threshold=cfg.loss.bce_target_thresh)
    call = torch.compile(model, backend=compile_backend) if compiled else model
    dtype = DTYPES[cfg.train.precision]
    assert timm.__version__

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device_type=device.type, dtype=dtype):
            loss = loss_fn(call(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def time_loop(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return {"first_s": first, "seconds": time.perf_counter() - t0}


def env_lines(device: torch.device, command: str) -> list[str]:
    import timm

    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `{command}`",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
             f"timm {timm.__version__}, Python {platform.python_version()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = "unknown"
        with contextlib.suppress(Exception):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, driver {driver}; apex: {_apex_state()}")
    else:
        lines.append(f"- no GPU: {platform.processor() or platform.machine()} CPU (smoke sizes, figures mean nothing)")
    return lines


def _apex_state() -> str:
    from engine.optim import _apex_fused_lamb

    return "FusedLAMB importable (the engine uses it)" if _apex_fused_lamb() is not None else "not installed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the test suite); figures mean nothing")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the Markdown results go")
    ap.add_argument("--batch", type=int, default=256, help="per-GPU batch of the step and stage 2")
    ap.add_argument("--resolutions", default="160,192,224", help="training resolutions of the step")
    ap.add_argument("--compile-res", default="224,160,192",
                    help="resolutions to compile at, in order; those after the first only within --budget-s")
    ap.add_argument("--mem-batches", default="128,256,384", help="batch sizes whose peak memory is measured")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip optional compiles after this many seconds")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.batch, args.resolutions, args.compile_res, args.mem_batches = 8, "32,48", "32", "4,8"
        args.warmup, args.steps = 2, 2
        device, compile_backend = torch.device("cpu"), "eager"  # dynamo's path without code generation
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --smoke for the CPU dry run", file=sys.stderr)
            return 2
        device, compile_backend = torch.device("cuda", 0), "inductor"
        torch.backends.cudnn.benchmark = True  # as the engine sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    cfg = recipe(args)
    res_list = [int(r) for r in args.resolutions.split(",")]
    compile_list = [int(r) for r in args.compile_res.split(",") if r]
    n = args.batch
    out: list[str] = [f"# GPU check: the CUDA path on one device ({'smoke run, CPU' if args.smoke else 'real'})", ""]
    out += env_lines(device, command)
    out += [f"- model {cfg.model.arch}, batch {n}, {cfg.train.precision}, channels_last; recipe a1.toml "
            f"(LAMB lr {cfg.optim.lr}, BCE thresh {cfg.loss.bce_target_thresh}, smoothing {cfg.loss.label_smoothing}, "
            f"drop path {cfg.model.drop_path_rate}); {args.warmup} warm-up + {args.steps} timed steps each", ""]
    print("\n".join(out), flush=True)

    # 1. the bare step, ours and timm's, eager and compiled
    stage2 = make_stage2(cfg)
    rows = ["| step | res | compiled | images/s | first step s |", "|---|---|---|---|---|"]
    ratios = []
    for compiled in (False, True):
        for res in (compile_list if compiled else res_list):
            if compiled and res != compile_list[0] and time.perf_counter() - started > args.budget_s:
                rows.append(f"| both | {res} | yes | skipped: past the {args.budget_s:.0f} s budget | |")
                continue
            images, targets = stage2(uint8_batch(n, res, cfg.data.num_classes, device))
            ctx = engine_context(cfg, device, compiled, compile_backend)
            ours = time_engine(ctx, Batch(images, targets), _Prepared(images, targets), warmup=args.warmup,
                               steps=args.steps)
            del ctx
            peer_step, *_ = timm_peer(cfg, device, compiled, compile_backend)
            peer = time_loop(lambda: peer_step(images, targets), device, args.warmup, args.steps)
            peer_step = None  # frees the peer's model and optimizer before the next point
            ips_o, ips_t = n * args.steps / ours["seconds"], n * args.steps / peer["seconds"]
            ratios.append((res, compiled, ips_o / ips_t))
            rows.append(f"| ours (engine) | {res} | {'yes' if compiled else 'no'} | {ips_o:,.0f} | {ours['first_s']:.1f} |")
            rows.append(f"| timm peer | {res} | {'yes' if compiled else 'no'} | {ips_t:,.0f} | {peer['first_s']:.1f} |")
            print(rows[-2], "\n" + rows[-1], flush=True)
            _free(device)
    out += ["## 1. Training step (bare: normalized batch on the device)", "", *rows, "",
            "Ours / timm: " + ", ".join(f"{r} px {'compiled' if c else 'eager'} {x:.2f}x" for r, c, x in ratios), ""]

    # 2. stage 2 alone and its share of an end-to-end step; 3. sync debug mode over 20 steps
    res = 224 if not args.smoke else res_list[-1]
    batch = uint8_batch(n, res, cfg.data.num_classes, device, seed=1)
    s2 = make_stage2(cfg)
    s2_time = time_loop(lambda: s2(batch), device, args.warmup, args.steps * 2)
    ctx = engine_context(cfg, device, False, compile_backend)
    e2e = time_engine(ctx, batch, s2, warmup=args.warmup, steps=args.steps)
    images, targets = s2(batch)
    bare = time_engine(ctx, batch, _Prepared(images, targets), warmup=args.warmup, steps=args.steps)
    s2_per = s2_time["seconds"] / (args.steps * 2)
    e2e_per, bare_per = e2e["seconds"] / args.steps, bare["seconds"] / args.steps
    out += ["## 2. Stage 2 on the device (A1: rand-m7-mstd0.5-inc1, mixup 0.2 / CutMix 1.0)", "",
            f"- {res} px, batch {n}: stage 2 alone {n / s2_per:,.0f} images/s ({1e3 * s2_per:.1f} ms per batch)",
            f"- end to end (synthetic uint8 stage 1 -> stage 2 -> step): {n / e2e_per:,.0f} images/s "
            f"({1e3 * e2e_per:.1f} ms); bare step {n / bare_per:,.0f} images/s ({1e3 * bare_per:.1f} ms)",
            f"- stage 2's share of the end-to-end step: {s2_per / e2e_per:.1%} (timed alone); the end-to-end "
            f"step takes {e2e_per / bare_per - 1:+.1%} longer than the bare step", ""]
    sync_line = _sync_debug(ctx, batch, s2, device, args)
    out += ["## 3. Host syncs", "", sync_line, ""]
    print("\n".join(out[-11:]), flush=True)
    del ctx
    _free(device)

    # 4. LAMB step, ours vs timm foreach, on the model's parameters
    out += ["## 4. LAMB step on the model's parameters", "", *_lamb_rows(cfg, device, args), ""]
    # 5. peak memory
    out += ["## 5. Peak memory of the step (eager, ours)", "", "| batch | res | peak GiB |", "|---|---|---|"]
    for b in (int(x) for x in args.mem_batches.split(",")):
        out.append(_memory_row(cfg, device, b, res, args))
    out += ["", f"Total wall time: {time.perf_counter() - started:.0f} s.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out))
    print("\n".join(out[-8:]))
    print(f"wrote {args.out}")
    return 0


def _sync_debug(ctx: StepContext, batch: Batch, s2, device: torch.device, args) -> str:
    if device.type != "cuda":
        return "- `torch.cuda.set_sync_debug_mode('error')`: not run (no CUDA device); tests/test_host_syncs.py counts on CPU"

    @contextlib.contextmanager
    def strict():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    try:
        time_engine(ctx, batch, s2, warmup=args.warmup, steps=20, inside=strict)
    except RuntimeError as e:
        return f"- `set_sync_debug_mode('error')` over 20 end-to-end steps: **raised**: {str(e).splitlines()[0]}"
    return "- `set_sync_debug_mode('error')` over 20 end-to-end steps (stage 2 + step): nothing raised"


def _lamb_rows(cfg: Config, device: torch.device, args) -> list[str]:
    from timm.optim import Lamb as TimmLamb

    from engine.optim import build_optimizer, uses_apex
    from models.factory import create_model

    o = cfg.optim
    results = []
    for name in ("ours", "timm Lamb foreach=True"):
        model = create_model(cfg.model, cfg.data.num_classes).to(device)
        if name == "ours":
            opt = build_optimizer(model, o)
            label = f"ours ({type(opt).__name__}{', apex' if uses_apex(opt) else ''})"
        else:
            from timm.optim import param_groups_weight_decay

            opt = TimmLamb(param_groups_weight_decay(model, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay,
                           max_grad_norm=o.max_grad_norm, foreach=True)
            label = name
        g = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-2
        t = time_loop(opt.step, device, args.warmup, args.steps * 2)
        results.append((label, 1e3 * t["seconds"] / (args.steps * 2)))
        del model, opt
        _free(device)
    params = sum(p.numel() for p in create_model(cfg.model, cfg.data.num_classes).parameters())
    rows = [f"{params / 1e6:.1f} M parameters, decay / no-decay groups, max_grad_norm {o.max_grad_norm}:", "",
            "| optimizer | ms per step |", "|---|---|"]
    rows += [f"| {label} | {ms:.2f} |" for label, ms in results]
    rows += ["", f"Ours / timm: {results[1][1] / results[0][1]:.2f}x faster"]
    return rows


def _memory_row(cfg: Config, device: torch.device, b: int, res: int, args) -> str:
    if device.type != "cuda":
        return f"| {b} | {res} | n/a (CPU) |"
    _free(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        images, targets = make_stage2(cfg)(uint8_batch(b, res, cfg.data.num_classes, device))
        ctx = engine_context(cfg, device, False, "inductor")
        time_engine(ctx, Batch(images, targets), _Prepared(images, targets), warmup=2, steps=2)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        del ctx, images, targets
        return f"| {b} | {res} | {peak:.1f} |"
    except torch.OutOfMemoryError:
        return f"| {b} | {res} | out of memory |"
    finally:
        _free(device)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
