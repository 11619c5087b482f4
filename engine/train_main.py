"""A training run from a resolved config: set-up, resume, the epoch loop, checkpoints, final eval.

Called by ``engine.run`` (single process or under torchrun). The global batch of the recipe is
kept on any device count: per-device batch x world size x accumulation steps = global batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from engine import checkpoint as ckpt
from engine.config import Config, ConfigError, to_dict
from engine.data import build_train_pipeline, build_val_pipeline, check_num_classes
from engine.distributed import DistInfo, any_rank, barrier, cleanup, init_distributed, reduce_bn_stats
from engine.logging import RunLogger, format_progress
from engine.losses import build_loss
from engine.optim import build_optimizer
from engine.progressive import regularization_scale, resolution_for_epoch
from engine.schedule import build_schedule
from engine.trainer import EpochProgress, NonFiniteLossError, StepContext, evaluate, train_one_epoch
from models.factory import UnknownModelError, create_model
from pipelines.augment import Stage2
from pipelines.base import DataError, MissingBackendError


def batch_composition(global_batch: int, world: int, per_device: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) such that their product x world = global batch."""
    if per_device == 0:
        if global_batch % world:
            raise ConfigError(f"train.global_batch_size {global_batch} is not divisible by {world} processes; "
                              f"set train.per_device_batch_size")
        per_device = global_batch // world
    if global_batch % (per_device * world):
        raise ConfigError(f"train.global_batch_size {global_batch} is not a multiple of per-device batch {per_device} "
                          f"x {world} processes; pick a per_device_batch_size that divides {global_batch // world}")
    return per_device, global_batch // (per_device * world)


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads after an optimizer step, so a checkpoint is
    written at a consistent point; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class EMA:
    """Exponential moving average of weights (Polyak averaging), as in ResNet-RS (decay 0.9999).
    Kept in fp32 on the model's device; buffers (BN statistics) are copied, not averaged. An
    update is one multi-tensor lerp over the parameters and one multi-tensor copy of the buffers;
    nothing is read back (no host sync)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = _clone_model(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))


def _clone_model(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()


class StepParts(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    ema: EMA | None


def build_step_parts(cfg: Config, device: torch.device, steps_per_epoch: int) -> StepParts:
    """What a training step needs, built from the recipe as every run builds it (the engine, and
    the throughput profiler, which must time the very same step)."""
    t = cfg.train
    model = create_model(cfg.model, cfg.data.num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return StepParts(model=model, optimizer=build_optimizer(model, cfg.optim),
                     lr_at=build_schedule(cfg.optim, t.epochs, steps_per_epoch),
                     loss_fn=build_loss(cfg.loss, cfg.data.num_classes).to(device),
                     scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
                     ema=EMA(model, t.ema_decay) if t.ema_decay > 0 else None)


def compile_for_training(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` as the engine uses it: static shapes, so a progressive-resolution run
    compiles once per training resolution and reuses each graph (``dynamic=None`` would switch to
    a dynamic-shape graph at the second resolution). Evaluation runs the uncompiled module.
    ``backend`` is for tests (the default is what training uses)."""
    return torch.compile(module, dynamic=False, backend=backend)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train_from_args(cfg: Config, args: argparse.Namespace) -> int:
    dist_info = init_distributed()
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    try:
        return _train(cfg, args, dist_info, out)
    except (ConfigError, DataError, MissingBackendError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError:
        per_device, _ = batch_composition(cfg.train.global_batch_size, dist_info.world_size,
                                          cfg.train.per_device_batch_size)
        print(f"error: out of GPU memory at per-device batch {per_device}; set "
              f"train.per_device_batch_size={max(1, per_device // 2)} (gradient accumulation keeps the global "
              f"batch {cfg.train.global_batch_size})", file=sys.stderr)
        return 2
    finally:
        cleanup()


def _train(cfg: Config, args, d: DistInfo, out: Path) -> int:
    t, device = cfg.train, d.device
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(t.seed + d.rank)
    per_device, accum = batch_composition(t.global_batch_size, d.world_size, t.per_device_batch_size)
    run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]
    log = RunLogger(cfg.log, out, to_dict(cfg), enabled=d.is_main, run_id=run_id)
    log.info(f"batch: global {t.global_batch_size} = {per_device} per device x {d.world_size} processes x "
             f"{accum} accumulation steps; device {device}; precision {t.precision}")

    epochs_total = t.epochs + cfg.optim.cooldown_epochs
    res0 = resolution_for_epoch(t.progressive, 0, epochs_total, t.train_res)
    train_pipe = build_train_pipeline(cfg.data, cfg.augment, res=res0, batch_size=per_device, rank=d.rank,
                                      world_size=d.world_size, device=device, seed=t.seed,
                                      channels_last=t.channels_last)
    val_pipe = build_val_pipeline(cfg.data, cfg.eval, rank=d.rank, world_size=d.world_size, device=device)
    check_num_classes(cfg.data, train_pipe)
    steps_per_epoch = len(train_pipe) // accum
    if steps_per_epoch == 0:
        raise DataError(f"the train set gives {len(train_pipe)} batches per process, fewer than one optimizer step "
                        f"({accum} batches); lower train.global_batch_size")
    nc = cfg.data.num_classes
    out_dtype = torch.float32
    stage2 = Stage2(cfg.augment, nc, cfg.loss.label_smoothing, train=True, channels_last=t.channels_last,
                    out_dtype=out_dtype, seed=t.seed * 1000 + d.rank)
    stage2_eval = Stage2(cfg.augment, nc, 0.0, train=False, channels_last=t.channels_last, out_dtype=out_dtype)

    model, optimizer, lr_at, loss_fn, scaler, ema = build_step_parts(cfg, device, steps_per_epoch)

    prog = EpochProgress()
    best = {"val_top1": -1.0}
    resumed = _resume(args.resume, out, model, optimizer, scaler, ema, stage2, prog, best, log, d)
    if resumed:
        log.info(f"resumed from {resumed} at epoch {prog.epoch}, batch {prog.batch}, step {prog.step}")

    call_model: nn.Module = model
    if d.enabled:
        call_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=64,
            gradient_as_bucket_view=True, broadcast_buffers=False)
    if t.compile:
        call_model = compile_for_training(call_model)
    ctx = StepContext(model=call_model, raw_model=model, optimizer=optimizer, loss_fn=loss_fn, lr_at=lr_at,
                      scaler=scaler, precision=t.precision, device=device, accum_steps=accum,
                      grad_clip=t.grad_clip, ema=ema, is_ddp=d.enabled)

    def save(tag: str) -> Path | None:
        """Called on every rank at the same step: BatchNorm statistics are averaged over ranks, each
        rank's RNG, augmentation state and loss window are gathered, the main rank writes (all
        ranks then hold the same model and optimizer)."""
        reduce_bn_stats(model, ema.module if ema else None)
        own = {"stage2": stage2.state_dict(), "rng": ckpt.rng_state(),
               "window": [prog.window_loss, prog.window_count]}
        per_rank = gather_objects(own, d)
        if not d.is_main:
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "ema": ema.module.state_dict() if ema else None, "progress": prog.state_dict(),
                 "per_rank": per_rank, "world_size": d.world_size, "config": to_dict(cfg),
                 "best": dict(best), "tag": tag}
        path = out / ckpt.checkpoint_name(prog.epoch, prog.step)
        ckpt.atomic_save(state, path)
        ckpt.prune(out, cfg.checkpoint.keep_last)
        return path

    stop = StopRequest()
    last_save = time.monotonic()
    final_metrics: dict[str, Any] = {}

    def after_step(p: EpochProgress) -> bool:
        """False to stop (the loop then saves); mid-epoch checkpoints only at log points, where the
        loss window has just been read and checked (trainer.train_one_epoch)."""
        nonlocal last_save
        at_log = p.step % t.log_every == 0
        requested = stop.requested
        if d.enabled:  # acted on at the next agreed check, so ranks stop at the same step
            requested = any_rank(requested, device) if at_log else False
        if requested:
            return False
        minutes = cfg.checkpoint.every_minutes
        if minutes > 0 and at_log:
            due = time.monotonic() - last_save >= 60 * minutes
            if d.enabled:  # the main rank's clock decides, so every rank saves at the same step
                due = any_rank(due and d.is_main, device)
            if due:
                save("mid-epoch")
                last_save = time.monotonic()
        return True

    def on_log(rec: dict[str, Any]) -> None:
        log.metrics(rec)
        if cfg.log.progress:
            log.info(format_progress(rec["epoch"], prog.batch // accum, steps_per_epoch, rec))

    interrupted = False
    with stop:
        while prog.epoch < epochs_total:
            epoch = prog.epoch
            res = resolution_for_epoch(t.progressive, epoch, epochs_total, t.train_res)
            stage2.set_magnitude_scale(regularization_scale(t.progressive, epoch, epochs_total))
            train_pipe.set_epoch(epoch, res, start_batch=prog.batch)
            if prog.batch == 0:
                log.info(f"epoch {epoch}: train res {res}, {steps_per_epoch} steps")
            finished = train_one_epoch(ctx, train_pipe, stage2, prog, steps_per_epoch=steps_per_epoch,
                                       log_every=t.log_every, on_log=on_log, after_step=after_step,
                                       max_steps=args.max_steps)
            if not finished and stop.requested:
                path = save("interrupted")
                log.info(f"stopped on request at epoch {prog.epoch} step {prog.step}; checkpoint {path}; "
                         f"continue with --resume auto")
                interrupted = True
                break
            last_epoch = epoch == epochs_total - 1 or not finished
            if last_epoch or (epoch + 1) % t.eval_every == 0:
                reduce_bn_stats(model, ema.module if ema else None)  # every rank evaluates the same model
                eval_model = ema.module if ema else model
                val_pipe.set_epoch(epoch)
                metrics = evaluate(eval_model, val_pipe, stage2_eval, device=device, precision=t.precision)
                final_metrics = {"epoch": epoch, "step": prog.step, **metrics}
                log.metrics(final_metrics)
                log.info(f"epoch {epoch}: val top-1 {metrics['val_top1']:.2f} top-5 {metrics['val_top5']:.2f}")
                if metrics["val_top1"] > best["val_top1"]:
                    best.update(val_top1=metrics["val_top1"], epoch=epoch)
                    if d.is_main and cfg.checkpoint.keep_best:
                        _export(model if not ema else ema.module, out / "best.safetensors", cfg, metrics, epoch)
            prog.epoch, prog.batch = epoch + 1, 0
            prog.window_loss, prog.window_count = 0.0, 0
            if finished and ((epoch + 1) % cfg.checkpoint.every_epochs == 0 or last_epoch):
                path = save("epoch")
                last_save = time.monotonic()
                if path is not None:
                    log.artifact(path, epoch, {"val_top1": final_metrics.get("val_top1")})
            if not finished:
                break
    barrier()
    # A resumed run that had already finished trains and evaluates nothing: keep its export as it is.
    fresh_export = bool(final_metrics) or not (out / "model.safetensors").exists()
    if d.is_main and not interrupted and cfg.checkpoint.export_safetensors and fresh_export:
        _export(ema.module if ema else model, out / "model.safetensors", cfg, final_metrics, prog.epoch - 1)
    if final_metrics and d.is_main:
        print(f"final val top-1 {final_metrics['val_top1']:.2f} top-5 {final_metrics['val_top5']:.2f} "
              f"(epoch {final_metrics['epoch']}, step {final_metrics['step']}) -> {out}", flush=True)
    log.close()
    return 130 if interrupted else 0


def _export(model: nn.Module, path: Path, cfg: Config, metrics: dict[str, Any], epoch: int) -> None:
    meta = {"arch": cfg.model.arch, "num_classes": str(cfg.data.num_classes), "epoch": str(epoch),
            "val_top1": str(metrics.get("val_top1", "")), "eval_res": str(cfg.eval.res),
            "crop_pct": str(cfg.eval.crop_pct), "config": json.dumps(to_dict(cfg))}
    ckpt.export_safetensors(model.state_dict(), path, meta)


def gather_objects(obj: Any, d: DistInfo) -> list[Any]:
    if not d.enabled:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * d.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _resume(spec: str | None, out: Path, model, optimizer, scaler, ema, stage2, prog: EpochProgress,
            best: dict, log: RunLogger, d: DistInfo) -> Path | None:
    if not spec:
        return None
    if spec == "auto":
        found = ckpt.newest_good(out, log=log.info)
        if found is None:
            log.info(f"--resume auto: no checkpoint in {out}; starting fresh")
            return None
        path, state = found
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"--resume {spec}: no such checkpoint file")
        state = ckpt.load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None and state.get("ema") is not None:
        ema.module.load_state_dict(state["ema"])
    for k, v in state["progress"].items():
        setattr(prog, k, v)
    best.update(state.get("best", {}))
    if state["world_size"] == d.world_size:
        own = state["per_rank"][d.rank]
        stage2.load_state_dict(own["stage2"])
        ckpt.set_rng_state(own["rng"])
        if "window" in own:  # this rank's loss sums since the last log point
            prog.window_loss, prog.window_count = float(own["window"][0]), int(own["window"][1])
    else:  # a different process count: the run continues, but not bit-exactly
        log.info(f"resuming {state['world_size']}-process checkpoint on {d.world_size} processes: "
                 "augmentation RNG streams restart from the seed")
    return path

