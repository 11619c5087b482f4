"""Measuring the three stages of the training loop, alone and together, at one (per-device batch,
resolution) point each: what ``tools/profile_throughput.py`` times (``workflows.profiling.profile``
runs every point; ``verdict`` reads the figures; ``report`` shows them).

The training loop is three stages, and each is measured alone for one (per-device batch,
resolution) point, then the whole:

* stage 1 (row ``data``/``stage1``): the recipe's decoding pipeline alone (the producer, run by
  ``data.workers`` processes or threads); mode ``data`` also times stage 1 + stage 2 consumed in this
  thread.
* stage 2 (row ``data``/``stage2``): the recipe's batched augmentation (RandAugment, mixup/CutMix,
  normalisation, layout) alone, on one decoded batch already on the device. The engine runs it in the
  training thread, between ``next(batch)`` and the forward pass, so it adds to the step's time.
* the step (row ``model``/``bare step``, the ceiling): forward, backward, optimizer (and EMA as the
  recipe says) on one batch already normalised on the device, run by ``engine.step.
  train_one_epoch`` unchanged, exactly as the engine runs it, with no stage 1 and no stage 2.
* ``e2e`` (row ``e2e``/``recipe step``): the same loop fed by the recipe's real pipeline and stage 2,
  with the fraction of the time blocked in ``next(batch)`` (what the engine logs as
  ``data_wait_frac``). It does all the work the ceiling does and more, so it cannot exceed it.

Timing: ``warmup`` steps first (DataLoader start-up, cuDNN autotuning, ``torch.compile``), then a
window of ``steps`` steps. On CUDA the device is synchronised once at each end of the window, never
per step (the hot-path rule), so queued kernels are counted and overlap is kept.

Each point is measured for one process without gradient accumulation: the per-device batch is the
batch size swept, which is what ``train.per_device_batch_size`` sets in a real run.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import time
from typing import Any, Iterator

import torch

from common.config import Config
from engine.precision import resolve_precision
from engine.state import EpochProgress
from engine.step import build_step, train_one_epoch
from pipelines.augment import Stage2
from pipelines.base import DataError
from pipelines.build import build_stage2, build_train_pipeline, check_num_classes

MODES = ("data", "model", "e2e")
PROFILE_MODES = (*MODES, "all")  # what tools/profile_throughput.py takes as MODE


class ProfileError(ValueError):
    """A user-caused problem with the profiler's own options; the message is one line."""

# --------------------------------------------------------------------------- settings
def apply_toggles(cfg: Config, *, amp: bool | None, channels_last: bool | None, compile: bool | None,
                  device: torch.device) -> Config:
    """The recipe with the profiler's toggles applied. ``amp=None`` keeps the recipe's precision
    (``auto`` resolved for ``device``, engine/precision.py);
    ``True`` keeps it if it is already bf16/fp16, else bf16; ``False`` is fp32. ``compile=None`` is
    the recipe's ``train.compile`` on CUDA and off on CPU (compiling takes minutes on a small CPU)."""
    t = cfg.train
    precision = resolve_precision(t.precision, device)
    if amp is True and precision == "fp32":
        precision = "bf16"
    elif amp is False:
        precision = "fp32"
    if compile is None:
        compile = t.compile and device.type == "cuda"
    cl = t.channels_last if channels_last is None else channels_last
    train = dataclasses.replace(t, precision=precision, channels_last=cl, compile=compile)
    return dataclasses.replace(cfg, train=train)


def _at_point(cfg: Config, batch: int, res: int) -> Config:
    """One process, per-device batch ``batch`` without accumulation, fixed resolution ``res``."""
    prog = dataclasses.replace(cfg.train.progressive, kind="none")
    train = dataclasses.replace(cfg.train, global_batch_size=batch, per_device_batch_size=batch, train_res=res,
                                progressive=prog)
    return dataclasses.replace(cfg, train=train)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(cfg: Config, device: torch.device, *, synthetic: bool = False):
    data = dataclasses.replace(cfg.data, pipeline="synthetic") if synthetic else cfg.data
    pipe = build_train_pipeline(data, cfg.augment, res=cfg.train.train_res, batch_size=cfg.train.global_batch_size,
                                rank=0, world_size=1, device=device, seed=cfg.train.seed,
                                channels_last=cfg.train.channels_last)
    if not synthetic:
        check_num_classes(cfg.data, pipe)
    if len(pipe) == 0:
        n = getattr(pipe, "num_samples", "too few")
        raise DataError(f"batch {cfg.train.global_batch_size} is larger than the train set at {cfg.data.root} "
                        f"({n} images); give smaller --batch-sizes")
    return pipe


def _endless(pipe, res: int) -> Iterator[Any]:
    """Batches across epoch boundaries (a new epoch costs what it costs in training, e.g. worker start)."""
    epoch = 0
    while True:
        pipe.set_epoch(epoch, res)
        n = 0
        for batch in pipe:
            n += 1
            yield batch
        if n == 0:
            raise DataError("the train pipeline yielded no batch in an epoch; give smaller --batch-sizes")
        epoch += 1


def _stage2(cfg: Config, *, seed: int = 0) -> Stage2:
    return build_stage2(cfg.data, cfg.augment, train=True, label_smoothing=cfg.loss.label_smoothing,
                        channels_last=cfg.train.channels_last, seed=seed)


# --------------------------------------------------------------------------- data mode
def _time_batches(batches: Iterator[Any], stage2: Stage2 | None, *, warmup: int, steps: int,
                  device: torch.device) -> tuple[float, int]:
    """(seconds, images) for ``steps`` batches after ``warmup``; stage 2 applied when given."""
    images = 0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = next(batches)
        if stage2 is not None:
            stage2(batch)
        if i >= warmup:
            images += batch.images.shape[0]
    _sync(device)
    return time.perf_counter() - start, images


def measure_data(cfg: Config, batch: int, res: int, *, steps: int, warmup: int,
                 device: torch.device) -> list[dict[str, Any]]:
    """Stage 1 alone and stage 1 + stage 2 consumed in this thread (the recipe's backend)."""
    cfg = _at_point(cfg, batch, res)
    workers = cfg.data.workers
    rows = []
    for what, with_stage2 in (("stage1", False), ("stage1+stage2", True)):
        pipe = _pipeline(cfg, device)
        batches = _endless(pipe, res)
        try:
            seconds, images = _time_batches(batches, _stage2(cfg) if with_stage2 else None, warmup=warmup,
                                            steps=steps, device=device)
        finally:
            batches.close()  # ends the DataLoader workers now, not at garbage collection
        ips = images / max(seconds, 1e-9)
        rows.append(_row("data", what, cfg.data.pipeline, cfg, batch, res, ips, images, seconds,
                         per_worker=ips / max(workers, 1)))
    return rows


def _one_batch(cfg: Config, device: torch.device):
    """One decoded uint8 batch on the device, as stage 1 hands it to stage 2 (synthetic pixels)."""
    pipe = _pipeline(cfg, device, synthetic=True)
    pipe.set_epoch(0, cfg.train.train_res)
    return next(iter(pipe))


def measure_stage2(cfg: Config, batch: int, res: int, *, steps: int, warmup: int,
                   device: torch.device) -> dict[str, Any]:
    """Stage 2 alone: ``warmup + steps`` calls on the same decoded batch (each call draws new
    augmentation parameters, so each does the full work); the last ``steps`` are timed."""
    cfg = _at_point(cfg, batch, res)
    decoded = _one_batch(cfg, device)
    stage2 = _stage2(cfg)
    seconds, images = _time_batches(itertools.repeat(decoded), stage2, warmup=warmup, steps=steps, device=device)
    return _row("data", "stage2", "-", cfg, batch, res, images / max(seconds, 1e-9), images, seconds)


# --------------------------------------------------------------------------- model and e2e modes
class _WaitTimer:
    """Wraps a pipeline: adds up the time spent inside ``next(batch)`` (the data wait) and times a
    window of steps by the batches handed out. When batch ``warmup`` (0-based) is requested, every
    step before it has been queued: the device is synchronised and the clock starts; after
    ``warmup + steps`` batches it synchronises again, stops the clock and hands out no more (the
    training loop then ends its epoch). No hook inside the training step is needed."""

    def __init__(self, pipe, device: torch.device, warmup: int, steps: int):
        self.pipe, self.device, self.warmup, self.steps = pipe, device, warmup, steps
        self.wait = 0.0
        self.handed = 0
        self.marks: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.pipe)

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        self.pipe.set_epoch(epoch, res)

    def _mark(self, name: str) -> None:
        _sync(self.device)
        self.marks[name] = time.perf_counter()
        self.marks[f"wait_{name}"] = self.wait

    @property
    def done(self) -> bool:
        return "end" in self.marks

    def __iter__(self):
        it = iter(self.pipe)
        while not self.done:
            if self.handed == self.warmup:
                self._mark("start")
            if self.handed == self.warmup + self.steps:
                self._mark("end")
                return
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t0
            self.handed += 1
            yield batch


class _Prepared:
    """The bare step's pipeline and stage 2: one decoded batch handed out ``length`` times per epoch,
    and a stage 2 that returns the same (images, targets) every call: what the real stage 2 made of
    that batch once (normalised, channels-last, mixed targets as the loss expects them)."""

    def __init__(self, decoded, stage2_out, length: int):
        self.decoded, self.stage2_out, self.length = decoded, stage2_out, length

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int, res: int | None = None) -> None:
        pass

    def __iter__(self):
        for _ in range(self.length):
            yield self.decoded

    def __call__(self, batch):
        return self.stage2_out


def measure_step(cfg: Config, batch: int, res: int, *, steps: int, warmup: int, device: torch.device,
                 synthetic: bool) -> dict[str, Any]:
    """The engine's training loop for ``warmup + steps`` optimizer steps; the last ``steps`` are timed.

    ``synthetic`` (mode ``model``, the ceiling): the bare step, one batch already normalised on the
    device every step (no stage 1, no stage 2); else (mode ``e2e``) the recipe's pipeline and stage 2.
    Runs ``engine.step.train_one_epoch`` unchanged, assembled as ``engine.setup`` and ``engine.loop`` assemble it
    for one process (no DDP, no accumulation, no checkpoints or logs).
    """
    from engine.setup import compile_for_training, seed_everything

    cfg = _at_point(cfg, batch, res)
    t = cfg.train
    seed_everything(t.seed)
    stage2 = _stage2(cfg, seed=t.seed * 1000)
    if synthetic:
        decoded = _one_batch(cfg, device)
        # one batch more than the window, so the clock stops inside the epoch (no end-of-epoch read)
        prepared = _Prepared(decoded, stage2(decoded), length=warmup + steps + 1)
        source, stage2 = prepared, prepared
    else:
        source = _pipeline(cfg, device)
    pipe = _WaitTimer(source, device, warmup, steps)
    steps_per_epoch = len(pipe)
    ctx = build_step(cfg, device, steps_per_epoch)  # one process: no DDP, accum_steps 1
    if t.compile:
        ctx = dataclasses.replace(ctx, model=compile_for_training(ctx.raw_model))
    prog = EpochProgress()
    while not pipe.done:
        pipe.set_epoch(prog.epoch, res)
        for _ in train_one_epoch(ctx, pipe, stage2, prog, steps_per_epoch=steps_per_epoch, log_every=10**9):
            pass  # records only at the end of an epoch; the clock is kept by the pipeline wrapper
        prog.epoch, prog.batch = prog.epoch + 1, 0
    window = pipe.marks
    seconds = window["end"] - window["start"]
    images = steps * batch
    ips = images / max(seconds, 1e-9)
    mode = "model" if synthetic else "e2e"
    what = "bare step" if synthetic else "recipe step"
    backend = "-" if synthetic else cfg.data.pipeline
    wait = min(1.0, (window["wait_end"] - window["wait_start"]) / max(seconds, 1e-9))
    return _row(mode, what, backend, cfg, batch, res, ips, images, seconds, data_wait_frac=wait)


def _row(mode: str, what: str, backend: str, cfg: Config, batch: int, res: int, ips: float, images: int,
         seconds: float, *, per_worker: float | None = None, data_wait_frac: float | None = None) -> dict[str, Any]:
    t = cfg.train
    return {"mode": mode, "what": what, "pipeline": backend, "batch": batch, "res": res,
            "images_per_s": ips, "images_per_s_per_worker": per_worker, "data_wait_frac": data_wait_frac,
            "images": images, "seconds": seconds, "workers": cfg.data.workers, "precision": t.precision,
            "channels_last": t.channels_last, "compile": t.compile}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, cfg: Config) -> dict[str, Any]:
    """What the figures depend on besides the recipe."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
            "workers": cfg.data.workers, "pipeline": cfg.data.pipeline,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def parse_int_list(text: str, name: str) -> list[int]:
    """``"64,128"`` -> [64, 128]; ProfileError with a one-line message for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProfileError(f"{name} takes comma-separated positive integers, e.g. 64,128; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ProfileError(f"{name} takes comma-separated positive integers, e.g. 64,128; got {text!r}")
    return values


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None is cuda when this torch sees a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ProfileError(f"--device {name}: use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError(f"--device {name} but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)
