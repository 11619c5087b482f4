"""Throughput measurements behind ``tools/profile_throughput.py``, the rule that reads them, and the
whole profile the tool runs (:func:`profile`: every point, the verdict, profile.json and profile.png).

The training loop is three stages, and each is measured alone for one (per-device batch,
resolution) point, then the whole:

* stage 1 (row ``data``/``stage1``): the recipe's decoding pipeline alone (the producer, run by
  ``data.workers`` processes or threads); mode ``data`` also times stage 1 + stage 2 consumed in this
  thread.
* stage 2 (row ``data``/``stage2``): the recipe's batched augmentation (RandAugment, mixup/CutMix,
  normalisation, layout) alone, on one decoded batch already on the device. The engine runs it in the
  training thread, between ``next(batch)`` and the forward pass, so it adds to the step's time.
* the step (row ``model``/``bare step``, the ceiling): forward, backward, optimizer (and EMA as the
  recipe says) on one batch already normalised on the device, run by ``engine.trainer.
  train_one_epoch`` unchanged, exactly as the engine runs it, with no stage 1 and no stage 2.
* ``e2e`` (row ``e2e``/``recipe step``): the same loop fed by the recipe's real pipeline and stage 2,
  with the fraction of the time blocked in ``next(batch)`` (what the engine logs as
  ``data_wait_frac``). It does all the work the ceiling does and more, so it cannot exceed it.

The verdict (:func:`diagnose`) names the slowest of stage 1, stage 2 and the step with their figures,
one short line per finding, and holds back advice resting on repeats that disagree.

Timing: ``warmup`` steps first (DataLoader start-up, cuDNN autotuning, ``torch.compile``), then a
window of ``steps`` steps. On CUDA the device is synchronised once at each end of the window, never
per step (DESIGN.md hot-path rule), so queued kernels are counted and overlap is kept.

Each point is measured for one process without gradient accumulation: the per-device batch is the
batch size swept, which is what ``train.per_device_batch_size`` sets in a real run.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import statistics
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common.config import Config, load_config, to_dict
from pipelines.build import build_stage2, build_train_pipeline, check_data_root, check_num_classes
from engine.precision import resolve_precision
from engine.trainer import EpochProgress, build_step, train_one_epoch
from pipelines.augment import Stage2
from pipelines.base import DataError

MODES = ("data", "model", "e2e")
PROFILE_MODES = (*MODES, "all")  # what tools/profile_throughput.py takes as MODE
ROOT = Path(__file__).resolve().parents[1]


class ProfileError(ValueError):
    """A user-caused problem with the profiler's own options; the message is one line."""

# Rule thresholds (see diagnose): named so the table's reader and the tests see the same numbers.
DATA_WAIT_LIMIT = 0.20  # e2e blocked on next(batch) more than this: data-bound
BATCH_GAIN = 1.10  # images/s still rising >10% from one batch size to the next: the batch is too small
FAR_BELOW_CEILING = 0.80  # e2e below 80% of stage 2 + the bare step at the same point (stage 1 free)
SPREAD_LIMIT = 1.5  # repeats of one point differing more than this (fastest / slowest window): not a figure to act on


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
    Runs ``engine.trainer.train_one_epoch`` unchanged, assembled as ``engine.train_main`` assembles it
    for one process (no DDP, no accumulation, no checkpoints or logs).
    """
    from engine.train_main import compile_for_training, seed_everything

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


# --------------------------------------------------------------------------- the verdict
def _by_point(rows: list[dict[str, Any]], mode: str, what: str | None = None) -> dict[tuple[int, int], dict]:
    return {(r["batch"], r["res"]): r for r in rows if r["mode"] == mode and (what is None or r["what"] == what)}


def _still_rising(points: dict[tuple[int, int], dict]) -> list[tuple[int, int, int, float]]:
    """(best smaller batch, largest batch, resolution, gain between them) for each resolution where
    images/s still grows more than BATCH_GAIN with batch size; largest gain first."""
    found = []
    for res in sorted({r for _, r in points}):
        curve = sorted((b, points[(b, r)]["images_per_s"]) for b, r in points if r == res)
        if len(curve) < 2:
            continue
        b1, v1 = curve[-1]
        b0, v0 = max(curve[:-1], key=lambda bv: bv[1])  # the best smaller batch, so one slow point is not a trend
        gain = v1 / max(v0, 1e-9)
        if gain > BATCH_GAIN:
            found.append((b0, b1, res, gain))
    return sorted(found, key=lambda f: -f[3])


STAGES = (("stage 1", "data", "stage1"), ("stage 2", "data", "stage2"), ("the step", "model", "bare step"))


def _stage_rows(rows: list[dict[str, Any]]) -> tuple[tuple[int, int], dict[str, dict]] | None:
    """The point the verdict reads and each measured stage's row there: the point where the slowest
    stage is fastest (the best setting measured), among points with the most stages."""
    by_point: dict[tuple[int, int], dict[str, dict]] = {}
    for name, mode, what in STAGES:
        for p, r in _by_point(rows, mode, what).items():
            by_point.setdefault(p, {})[name] = r
    if not by_point:
        return None
    most = max(len(v) for v in by_point.values())
    p = max((p for p, v in by_point.items() if len(v) == most),
            key=lambda p: min(r["images_per_s"] for r in by_point[p].values()))
    return p, by_point[p]


def _in_series(stage2_ips: float, step_ips: float) -> float:
    """images/s of stage 2 and the step one after the other in the training thread."""
    return 1.0 / (1.0 / stage2_ips + 1.0 / step_ips)


def spread(row: dict[str, Any]) -> float:
    """Fastest over slowest window of a point's repeats (1.0 for a single window)."""
    repeats = row.get("images_per_s_repeats") or [row["images_per_s"]]
    return max(repeats) / max(min(repeats), 1e-9)


def _at(p: tuple[int, int]) -> str:
    return f"batch {p[0]}, res {p[1]}"


def _shaky(used: list[dict[str, Any]], effect: float | None = None) -> str | None:
    """Why a finding that rests on the rows ``used`` cannot be trusted, or None: their repeats differ
    more than SPREAD_LIMIT, or the effect it claims (a ratio > 1) is no larger than that disagreement."""
    worst = max(used, key=spread)
    s = spread(worst)
    where = f"{worst['what']} at {_at((worst['batch'], worst['res']))}"
    if s > SPREAD_LIMIT:
        return f"its repeats differ {s:.1f}x ({where})"
    if effect is not None and s > 1.0 and effect <= s:
        return f"the {100 * (effect - 1):.0f}% is within its repeats' {s:.2f}x spread ({where})"
    return None


Finding = tuple[str, str]  # (kind, one short line): bottleneck | figures | advice | held back | note


def diagnose(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[Finding]:
    """Which stage limits training and what to change, derived only from ``rows``: one short line per
    finding, each naming its batch size and resolution. The first is the ``bottleneck``, then the
    ``figures`` it rests on, then ``advice``; advice whose figures are noise is ``held back``.

    The slowest of stage 1 (decoding), stage 2 (batched augmentation) and the bare step is named at
    the point where the slowest stage is fastest. Stage 2 and the step run one after the other in
    the training thread, so together they deliver at most 1 / (1/stage2 + 1/step) images/s; stage 1
    overlaps them (its workers run ahead). An e2e run that waits for data more than
    ``DATA_WAIT_LIMIT`` of its time is data-bound whatever stage 1 alone measured. The advice
    follows the named stage: workers and backend for stage 1, RandAugment and the device for stage
    2, AMP, channels-last, batch size and resolution for the step.

    Noise: each point's figure is the median of its repeats. A finding is held back, with the
    reason, when the repeats of a figure it rests on differ more than ``SPREAD_LIMIT`` (a neighbour's
    job slowed some windows), or when the effect it claims (e.g. +14% images/s from a larger batch) is
    no larger than its repeats' own disagreement; AMP and channels-last advice rests on settings, not
    figures.
    """
    workers = env.get("workers")
    pipeline = env.get("pipeline")
    cuda = env.get("device", "").startswith("cuda")
    model = _by_point(rows, "model")
    e2e = _by_point(rows, "e2e")
    stage2 = _by_point(rows, "data", "stage2")
    out: list[Finding] = []

    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"

    def advise(where: str, claim: str, action: str, used: list[dict[str, Any]], effect: float | None = None) -> None:
        """``where: claim: action``, or held back as ``where: claim; not acted on: why``."""
        why = _shaky(used, effect)
        if why:
            out.append(("held back", f"{where}: {claim}; not acted on: {why}"))
        else:
            out.append(("advice", f"{where}: {claim}: {action}" if claim else f"{where}: {action}"))

    found = _stage_rows(rows)
    point, stages = found if found else (None, {})
    rates = {name: r["images_per_s"] for name, r in stages.items()}
    e2e_row = e2e.get(point) if point else None
    if e2e_row is None and e2e:
        e2e_row = max(e2e.values(), key=lambda r: r["images_per_s"])
        point = point or (e2e_row["batch"], e2e_row["res"])
    if not rates and e2e_row is None:
        return [("bottleneck", "nothing measured")]
    at = _at(point)
    slowest = min(rates, key=rates.get) if rates else None
    if rates:
        figures = ", ".join(f"{name} {fmt(v)} img/s" for name, v in sorted(rates.items(), key=lambda kv: kv[1]))
        if "stage 2" in rates and "the step" in rates:
            figures += f"; stage 2 + step {fmt(_in_series(rates['stage 2'], rates['the step']))}"
        out.append(("figures", f"{at}: {figures}"))
    if e2e_row is not None:
        wait = e2e_row["data_wait_frac"]
        out.append(("figures", f"{_at((e2e_row['batch'], e2e_row['res']))}: e2e {fmt(e2e_row['images_per_s'])} img/s"
                    + (f", waiting for data {100 * wait:.0f}%" if wait is not None else "")))
    waiting = e2e_row is not None and (e2e_row["data_wait_frac"] or 0) > DATA_WAIT_LIMIT
    # the verdict's own evidence: the slowest stage against the next one (or e2e's wait)
    ranked = sorted(stages.values(), key=lambda r: r["images_per_s"])
    order_rows = ranked[:2]
    order_effect = ranked[1]["images_per_s"] / ranked[0]["images_per_s"] if len(ranked) > 1 else None

    if (slowest == "stage 1" and len(rates) > 1) or waiting:
        cpus = env.get("cpus_usable") or env.get("cpu_count") or 0
        if workers is not None and cpus and workers >= cpus:
            more = f"data.workers is already {workers} on {cpus} usable CPUs: more CPUs per GPU"
        else:
            more = f"raise data.workers (now {workers})"
        switch = " or switch data.pipeline to ffcv/dali" if pipeline not in ("ffcv", "dali") else ""
        if pipeline == "dali" and cuda:
            switch = " (DALI decodes on the GPU already: lower train_res or fewer CPU-side transforms)"
        if slowest == "stage 1" and not waiting:
            head = f"data-bound: stage 1 is the slowest at {at}"
        else:
            head = f"data-bound: e2e waits for data more than {100 * DATA_WAIT_LIMIT:.0f}% of the time at " \
                   f"{_at((e2e_row['batch'], e2e_row['res']))}"
        used = [e2e_row] if waiting else order_rows
        advise(at, "", f"{more}{switch}", used, None if waiting else order_effect)
        return [("bottleneck", head), *out]

    if len(rates) == 1 and slowest != "the step" and e2e_row is None:
        r = next(iter(stages.values()))
        per = r["images_per_s_per_worker"]
        return [("bottleneck", f"{slowest} only: {fmt(r['images_per_s'])} img/s at {at}"
                 + (f" ({fmt(per)} per worker, {workers} workers)" if per is not None else "")
                 + "; run mode all to compare the stages")]
    if slowest is None:  # e2e alone, not waiting
        return [("bottleneck", f"e2e {fmt(e2e_row['images_per_s'])} img/s at {at}, waiting for data "
                 f"{100 * (e2e_row['data_wait_frac'] or 0):.0f}%; run mode all to see which stage limits it"), *out]
    if slowest == "stage 2":
        where_s2 = "on the GPU" if cuda else "on the CPU, in the training thread"
        advise(at, f"stage 2 runs {where_s2}", "fewer RandAugment ops (augment.rand_augment n) or a larger "
               "per-device batch" + ("" if cuda else "; a GPU runs it as batched kernels"), order_rows, order_effect)
        return [("bottleneck", f"stage2-bound: stage 2 is the slowest at {at}"), *out]

    out.insert(0, ("bottleneck", f"compute-bound: the step is the slowest at {at}"))
    step_rows = list(model.values())
    if cuda and any(r["precision"] == "fp32" for r in step_rows):
        out.append(("advice", f"{at}: AMP is off: set train.precision=bf16"))
    if cuda and any(not r["channels_last"] for r in step_rows):
        out.append(("advice", f"{at}: channels_last is off: set train.channels_last=true"))
    tips = len(out)
    for b0, b1, res, gain in _still_rising(model):
        advise(f"batch {b0} -> {b1}, res {res}", f"the step's images/s rises {100 * (gain - 1):.0f}%",
               "raise train.per_device_batch_size", [model[(b0, res)], model[(b1, res)]], gain)

    def bound(p: tuple[int, int]) -> tuple[float, str, list[dict]]:
        """What e2e could reach at ``p`` if stage 1 were free: the step, after stage 2 when measured."""
        step = model[p]["images_per_s"]
        if p in stage2:
            return _in_series(stage2[p]["images_per_s"], step), "stage 2 + step", [model[p], stage2[p]]
        return step, "the bare step", [model[p]]

    why = "CPU-side work (decode, copies) delays the GPU" if cuda else "decode workers share the CPU cores with the step"
    for p in sorted(e2e):
        if p not in model:
            continue
        ref, name, used = bound(p)
        e = e2e[p]
        if e["images_per_s"] < FAR_BELOW_CEILING * ref and (e["data_wait_frac"] or 0) <= DATA_WAIT_LIMIT:
            advise(_at(p), f"e2e reaches {100 * e['images_per_s'] / ref:.0f}% of {name}, waiting "
                   f"{100 * (e['data_wait_frac'] or 0):.0f}%", why, [e, *used], ref / e["images_per_s"])
    resolutions = sorted({r for _, r in model})
    if len(resolutions) >= 2 and len(out) == tips:
        b = max(b for b, _ in model)
        lo, hi = model.get((b, resolutions[0])), model.get((b, resolutions[-1]))
        if lo and hi:
            cost = lo["images_per_s"] / hi["images_per_s"]
            advise(f"batch {b}, res {resolutions[0]} -> {resolutions[-1]}", f"{cost:.1f}x the step's time per image",
                   "low-res early epochs (train.progressive) save that", [lo, hi], cost)
    if not any(kind in ("advice", "held back") for kind, _ in out):
        out.append(("advice", f"{at}: nothing cheap to change at these settings"))
    return out


def verdict_lines(findings: list[Finding]) -> list[str]:
    """The findings as the tool prints them: ``kind: text``, one line each."""
    return [f"{kind}: {text}" for kind, text in findings]


def merge_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, what, batch, res): the median images/s (and data wait) of its repeats, in
    first-seen order; ``images_per_s_repeats`` keeps every window. On a shared machine a neighbour's
    job can slow one window many times over; interleaved repeats and the median absorb that."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["what"], r["batch"], r["res"]), []).append(r)
    merged = []
    for group in groups.values():
        ips = sorted(r["images_per_s"] for r in group)
        mid = statistics.median(ips)
        row = dict(min(group, key=lambda r: abs(r["images_per_s"] - mid)))
        row["images_per_s"] = mid
        if row["images_per_s_per_worker"] is not None:
            row["images_per_s_per_worker"] = mid / max(row["workers"], 1)
        waits = [r["data_wait_frac"] for r in group if r["data_wait_frac"] is not None]
        row["data_wait_frac"] = statistics.median(waits) if waits else None
        row["images"] = sum(r["images"] for r in group)
        row["seconds"] = sum(r["seconds"] for r in group)
        row["images_per_s_repeats"] = [r["images_per_s"] for r in group]
        merged.append(row)
    return merged


def add_ceiling_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_ceiling``: e2e images/s over the bare step at the same point, and stage 1 + stage 2 over
    stage 2 alone (data mode); None where the ceiling was not measured."""
    model = _by_point(rows, "model")
    ceiling = _by_point(rows, "data", "stage2")
    for r in rows:
        ref = {"e2e": model}.get(r["mode"]) or (ceiling if r["what"] == "stage1+stage2" else {})
        c = ref.get((r["batch"], r["res"]))
        r["vs_ceiling"] = r["images_per_s"] / c["images_per_s"] if c else None


def spread_note(rows: list[dict[str, Any]], limit: float | None = None) -> str | None:
    """A note when repeats of a point differ more than ``limit`` (SPREAD_LIMIT) times: the machine is
    shared or throttled; the findings resting on those points are held back."""
    limit = SPREAD_LIMIT if limit is None else limit
    repeated = [r for r in rows if len(r.get("images_per_s_repeats", [])) > 1]
    wide = [r for r in repeated if spread(r) > limit]
    if not wide:
        return None
    worst = max(wide, key=spread)
    return (f"repeats of {len(wide)} of {len(repeated)} points differ more than {limit:g}x (up to "
            f"{spread(worst):.1f}x, {worst['what']} at {_at((worst['batch'], worst['res']))}): other jobs share "
            f"this machine; advice resting on them is held back; rerun with more --repeats, --threads 1 or on "
            f"a quiet machine")


# --------------------------------------------------------------------------- table
COLUMNS = (("mode", 6), ("what", 17), ("pipeline", 10), ("batch", 6), ("res", 5), ("img/s", 10),
           ("img/s/wkr", 10), ("vs ceil", 8), ("wait", 6), ("prec", 5), ("ch_last", 8), ("compile", 8))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table, one line per measurement."""
    def cell(r: dict[str, Any], name: str) -> str:
        v = {"mode": r["mode"], "what": r["what"], "pipeline": r["pipeline"], "batch": r["batch"], "res": r["res"],
             "img/s": r["images_per_s"], "img/s/wkr": r["images_per_s_per_worker"],
             "vs ceil": None if r.get("vs_ceiling") is None else f"{r['vs_ceiling']:.2f}",
             "wait": None if r["data_wait_frac"] is None else f"{100 * r['data_wait_frac']:.0f}%",
             "prec": r["precision"] if r["mode"] != "data" else None,
             "ch_last": ("on" if r["channels_last"] else "off") if r["mode"] != "data" else None,
             "compile": ("on" if r["compile"] else "off") if r["mode"] != "data" else None}[name]
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
        return str(v)

    head = " ".join(name.ljust(w) if i < 3 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(cell(r, name).ljust(w) if i < 3 else cell(r, name).rjust(w)
                              for i, (name, w) in enumerate(COLUMNS)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot
def bottleneck_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measurement the verdict names as the limit: the slowest stage at the verdict's point (see
    :func:`diagnose`), or the e2e row there when e2e waits for data more than DATA_WAIT_LIMIT."""
    e2e = _by_point(rows, "e2e")
    found = _stage_rows(rows)
    if found is None:
        return max(e2e.values(), key=lambda r: r["images_per_s"]) if e2e else None
    point, stages = found
    waiting = e2e.get(point)
    if waiting is not None and (waiting["data_wait_frac"] or 0) > DATA_WAIT_LIMIT:
        return waiting
    return min(stages.values(), key=lambda r: r["images_per_s"])


def figure(rows: list[dict[str, Any]], title: str = "", verdict: str = ""):
    """images/s vs per-device batch size: one panel per mode, one line per (what, resolution); the
    bottleneck (:func:`bottleneck_row`) ringed in red on its panel, whose title says so; legends under
    the panels, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    limit = bottleneck_row(rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["mode"] == mode:
                series.setdefault((r["what"], r["res"]), []).append((r["batch"], r["images_per_s"]))
        for (what, res), pts in sorted(series.items()):
            pts.sort()
            style = "--" if what == "stage2" else "-"
            ax.plot([b for b, _ in pts], [v for _, v in pts], style, marker="o", label=f"{what} @{res}px")
        batches = sorted({r["batch"] for r in rows if r["mode"] == mode})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("per-device batch size")
        ax.set_ylabel("images/s")
        ax.set_title(mode)
        values = [r["images_per_s"] for r in rows if r["mode"] == mode]
        if max(values) > 20 * min(values):  # e.g. stage 2 on a GPU far above real decoding
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=1.12 * max(values))  # room above the highest point for the ring
        if limit is not None and limit["mode"] == mode:
            ax.plot([limit["batch"]], [limit["images_per_s"]], "o", ms=16, mfc="none", mec="tab:red", mew=2.2,
                    gid="bottleneck", label=f"bottleneck: {limit['what']} @{limit['res']}px", zorder=5, clip_on=False)
            ax.set_title(f"{mode}: the bottleneck", color="tab:red")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    heading = "\n".join(t for t in (title, verdict) if t)
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict[str, Any]], path, title: str = "", verdict: str = "") -> None:
    """:func:`figure` written to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(rows, title, verdict)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_int_list(text: str, name: str) -> list[int]:
    """``"64,128"`` -> [64, 128]; ProfileError with a one-line message for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ProfileError(f"{name} takes comma-separated positive integers, e.g. 64,128; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ProfileError(f"{name} takes comma-separated positive integers, e.g. 64,128; got {text!r}")
    return values


# --------------------------------------------------------------------------- the whole profile
def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None is cuda when this torch sees a GPU, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ProfileError(f"--device {name}: use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ProfileError(f"--device {name} but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def default_out(recipe: str | Path) -> Path:
    """runs/profile-<recipe name> under the repository root."""
    return ROOT / "runs" / f"profile-{Path(recipe).stem}"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def profile(recipe: str | Path, mode: str, *, overrides: list[str] = (), batch_sizes: str | None = None,
            resolutions: str | None = None, steps: int = 20, warmup: int = 5, repeats: int = 1,
            threads: int | None = None, device: str | None = None, amp: bool | None = None,
            channels_last: bool | None = None, compile: bool | None = None, out: Path | None = None,
            progress: Callable[[str], None] = _to_stderr) -> dict[str, Any]:
    """Measure every (batch size, resolution) point of ``mode`` (one of :data:`PROFILE_MODES`) for
    ``recipe`` with ``overrides``; returns the report that :func:`write_profile` writes, with the
    folder it goes to under ``"out"`` (created here, before measuring). ``batch_sizes`` and
    ``resolutions`` are comma lists (default: the recipe's per-device batch and train resolution);
    the toggles are :func:`apply_toggles`'. Each point is measured ``repeats`` times, interleaved,
    and the median kept. ``progress`` gets one line before each measurement. Raises ProfileError,
    ConfigError, DataError, MissingBackendError with a one-line message."""
    if mode not in PROFILE_MODES:
        raise ProfileError(f"unknown mode {mode!r}; choose one of {', '.join(PROFILE_MODES)}")
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ProfileError("--steps and --repeats must be >= 1, --warmup >= 0")
    dev = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ProfileError("--threads must be >= 1")
        torch.set_num_threads(threads)
    overrides = list(overrides)
    cfg = load_config(recipe, overrides)
    cfg = apply_toggles(cfg, amp=amp, channels_last=channels_last, compile=compile, device=dev)
    t = cfg.train
    batches = parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes else [t.per_device_batch_size
                                                                                 or t.global_batch_size]
    res_list = parse_int_list(resolutions, "--resolutions") if resolutions else [t.train_res]
    modes = ("data", "model", "e2e") if mode == "all" else (mode,)
    if cfg.data.pipeline != "synthetic" and modes != ("model",):
        check_data_root(cfg.data)  # before any progress line, so the error is the only output
    if "e2e" in modes and "model" not in modes:
        modes = ("model", *modes)  # e2e is read against the bare step at the same point
    out = Path(out) if out else default_out(recipe)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    started = time.perf_counter()
    for repeat in range(repeats):
        for res in res_list:
            for batch in batches:
                kw = dict(steps=steps, warmup=warmup, device=dev)
                progress(f"measuring stage 2: batch {batch}, res {res}, round {repeat + 1}/{repeats}")
                rows.append(measure_stage2(cfg, batch, res, **kw))  # every mode's verdict reads it
                for m in modes:
                    progress(f"measuring {m}: batch {batch}, res {res}, round {repeat + 1}/{repeats}")
                    if m == "data":
                        rows += measure_data(cfg, batch, res, **kw)
                    else:
                        rows.append(measure_step(cfg, batch, res, synthetic=m == "model", **kw))
    rows = merge_repeats(rows)
    add_ceiling_ratios(rows)
    env = environment(dev, cfg)
    findings = diagnose(rows, env)
    title = f"{Path(recipe).name} on {env['device_name']} ({env['device']}), {cfg.data.pipeline}, " \
            f"{cfg.data.workers} workers, {t.precision}, {env['torch_threads']} torch threads"
    return {"recipe": str(recipe), "overrides": overrides, "mode": mode,
            "settings": {"batch_sizes": batches, "resolutions": res_list, "steps": steps,
                         "warmup": warmup, "repeats": repeats, "precision": t.precision,
                         "channels_last": t.channels_last,
                         "compile": t.compile},
            "environment": env, "measurements": rows, "findings": findings, "bottleneck": findings[0][1],
            "note": spread_note(rows),
            "seconds_total": time.perf_counter() - started, "config": to_dict(cfg), "out": str(out),
            "title": title}


def write_profile(report: dict[str, Any]) -> tuple[Path, Path]:
    """OUT/profile.json (the report: every figure, the findings and the environment) and OUT/profile.png
    (images/s vs batch size, the bottleneck marked); returns their paths."""
    out = Path(report["out"])
    saved = {k: v for k, v in report.items() if k not in ("out", "title")}
    (out / "profile.json").write_text(json.dumps(saved, indent=1) + "\n")
    plot(report["measurements"], out / "profile.png", report["title"], f"bottleneck: {report['bottleneck']}")
    return out / "profile.json", out / "profile.png"
