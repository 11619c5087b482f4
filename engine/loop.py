"""A training run from a resolved config, top to bottom: set-up, resume, the epoch loop (log points,
mid-epoch checkpoints, stop decisions, evaluation, end-of-epoch checkpoints), the export, and what
happens when anything fails.

Called by ``engine.run`` (one process, under torchrun, or one task per GPU under Slurm's srun). The
global batch of the recipe is kept on any device count: per-device batch x world size x accumulation
steps = global batch (``engine.setup``). The step itself: ``engine.step``.
"""
from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from common.config import Config, ConfigError, to_dict
from common.stop_signals import STOP_SIGNALS
from engine import checkpoint as ckpt
from engine import run_folder
from engine.distributed import (DistInfo, any_rank, barrier, cleanup, init_distributed, reduce_bn_stats,
                                set_collective_timeout)
from engine.evaluate import EvalProgress, EvaluationStopped, evaluate
from engine.failures import FailureBoard
from engine.logging import RunLogger
from engine.progressive import regularization_scale, resolution_for_epoch
from engine.setup import batch_composition, build_pipelines, cpu_lines, quiet, say, set_up_device, wrap_for_training
from engine.state import AgreedDataError, EpochProgress, NonFiniteLossError, RanksDisagreeError, StopReason
from engine.step import StepContext, build_step, train_one_epoch
from models.factory import UnknownModelError
from pipelines.base import DataError, MissingBackendError
from pipelines.build import build_stage2


class StopRequest:
    """SIGINT/SIGTERM/SIGUSR2 set a flag that the loop acts on at a consistent point (after an
    optimizer step; under DDP at the next log point, where ranks agree), so a checkpoint is written
    before the process exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT, 140
    for SIGUSR2).

    SIGUSR2 is the scheduler's early warning before a time limit (Slurm's ``--signal``; not SIGUSR1,
    which NCCL may use): its own exit status tells a job script that the run stopped to be requeued,
    where SIGTERM (``scancel``, preemption) stops it for whoever sent it.

    A second SIGINT (Ctrl-C twice) interrupts at once. A second SIGTERM (or any signal after the
    first) does not: under torchrun the whole process group gets the scheduler's SIGTERM and
    torchrun forwards its own copy to every rank; Slurm signals every process of a step, then sends
    SIGTERM again at the time limit. The first signal names the stop. DataLoader workers ignore
    these signals (the main process owns shutdown)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT == self.signal:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGINT)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

def train(cfg: Config, out: Path, resume: str | None = None, max_steps: int | None = None) -> int:
    """Train the recipe ``cfg`` into the run folder ``out``; returns the exit status: 0, 2 for a user
    error (one line: config, data, out of memory, full disk), 3 for a diverged run, 128 + signal
    when stopped by SIGTERM/SIGINT (after an ``interrupted`` checkpoint), 1 for a crash (its
    traceback). Under DDP a failure on any rank ends every rank within seconds and its line is
    printed once (``engine.failures``)."""
    d = init_distributed(out, cfg.train.dist_start_timeout_s)
    board = FailureBoard(d.rank, d.world_size, d.local_rank, stall_s=cfg.train.dist_timeout_s,
                         start_stall_s=cfg.train.dist_start_timeout_s)
    existed = out.exists()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # put back at the end: the caller's own
    try:
        code = _train(cfg, d, out, resume, max_steps, board)
        _ignore_stop_signals()  # the run is complete (or stopped and saved): a late signal must not kill it now
        board.tick("export")
        # Rank 0 writes the export and closes W&B before this barrier, the others wait in it: the
        # board stays open over both, so a failure there (a full disk, a quota) ends every rank too.
        barrier()
        return code
    except Exception as e:
        if board.enabled:  # the run is ending with this failure: a launcher's SIGTERM (torchrun's, on seeing
            _ignore_stop_signals()  # a peer die) must not cut its line
        code, line, agreed = _failure(e, cfg, d, out)
        if line is None:  # not a failure we know: a bug, a library's error, or a peer that vanished
            if not board.enabled:
                raise
            posted = board.posted_code()
            if posted is None and _collective_error(e):  # did a peer die? its neighbour will say so
                posted = board.await_diagnosis()
            if posted is None:
                traceback.print_exc()
                line = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} " \
                       f"(traceback above)"
            # else: the consequence of another rank's failure, whose line is out: nothing of ours to add
        board.fail(line, code, agreed=agreed)
        code = board.posted_code() or code
        if board.enabled:  # told the others: end now (tearing down a group with a dead or stuck peer may hang)
            if not existed and d.is_main:
                run_folder.remove_if_empty(out)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code)
        return code
    finally:
        board.close()
        cleanup()
        if not existed and d.is_main:
            run_folder.remove_if_empty(out)
        for sig, handler in handlers.items():  # a caller in this process (a tool, a test) gets its own back,
            signal.signal(sig, handler)  # and processes it starts later do not inherit an ignored signal



def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _collective_error(e: Exception) -> bool:
    """A collective's own error (gloo: "connection closed by peer", a timeout; NCCL: an aborted
    communicator): the cause may be another rank, so its diagnosis is awaited before a traceback."""
    name = type(e).__name__
    return name.startswith("Dist") or any(w in str(e) for w in ("gloo", "Gloo", "NCCL", "Connection", "Timed out",
                                                                  "timed out", "timeout"))

def _failure(e: Exception, cfg: Config, d: DistInfo, out: Path) -> tuple[int, str | None, bool]:
    """(exit status, the one line, whether every rank raised it at the same step) for a failure the
    user can act on; (1, None, False) for anything else."""
    if isinstance(e, AgreedDataError):
        return 2, f"error: {e}", True
    if isinstance(e, (ConfigError, DataError, MissingBackendError, UnknownModelError)):
        return 2, f"error: {e}", False
    if isinstance(e, NonFiniteLossError):  # raised on reduced values only: every rank at the same step
        # rank 0 writes the checkpoints, so it sets aside the unconfirmed ones and prints the line
        return 3, f"error: {e}; {run_folder.reject_after_failure(out)}" if d.is_main else f"error: {e}", True
    if isinstance(e, RanksDisagreeError):  # found from every rank's fingerprint: agreed
        return 1, f"error: {e}", True
    if isinstance(e, torch.OutOfMemoryError):
        per_device, _ = batch_composition(cfg.train.global_batch_size, d.world_size, cfg.train.per_device_batch_size)
        return 2, (f"error: out of GPU memory at per-device batch {per_device}; set "
                   f"train.per_device_batch_size={max(1, per_device // 2)} (gradient accumulation keeps the global "
                   f"batch {cfg.train.global_batch_size})"), False
    if _collective_error(e) and any(w in str(e) for w in ("Timed out", "timed out", "timeout")):
        return 1, (f"error: a collective waited longer than the process group's timeout (train.dist_timeout_s = "
                   f"{cfg.train.dist_timeout_s:g} s, + 60 s) for another rank; continue with --resume auto"), False
    if isinstance(e, OSError) and ckpt.is_disk_full(e):
        detail = e.strerror if isinstance(e, ckpt.DiskFullError) else str(ckpt.disk_full(out, 0).strerror)
        return 2, f"error: {detail}; earlier checkpoints are intact, continue with --resume auto", False
    return 1, None, False

def _train(cfg: Config, d: DistInfo, out: Path, resume: str | None, max_steps: int | None, board: FailureBoard) -> int:
    """The run top to bottom: set-up, resume, the epoch loop (log points, mid-epoch checkpoints,
    stop decisions, evaluation, end-of-epoch checkpoints), the export."""
    requested = cfg.train.precision
    cfg = set_up_device(cfg, d)
    t = cfg.train
    device = d.device
    per_device, accum = batch_composition(t.global_batch_size, d.world_size, t.per_device_batch_size)
    epochs_total = t.epochs + cfg.optim.cooldown_epochs
    train_pipe, val_pipe, steps_per_epoch = build_pipelines(cfg, d, per_device, accum, epochs_total)
    run_folder.prepare(out, resume, d, log=say if d.is_main else quiet)  # stderr, as every line of the run
    log = RunLogger(cfg.log, out, to_dict(cfg), enabled=d.is_main, run_id=_run_id(out))
    for line in cpu_lines(cfg.data.workers, d):  # after the pipelines: a library's import could have changed them
        log.info(line)
    log.info(f"batch: global {t.global_batch_size} = {per_device} per device x {d.world_size} processes x "
             f"{accum} accumulation steps; device {device}; precision {t.precision}"
             + (" (auto)" if requested == "auto" else "") + f"; stage 1 {cfg.data.pipeline}")
    stage2 = build_stage2(cfg.data, cfg.augment, train=True, label_smoothing=cfg.loss.label_smoothing,
                          channels_last=t.channels_last, seed=t.seed * 1000 + d.rank)
    stage2_eval = build_stage2(cfg.data, cfg.augment, train=False, channels_last=t.channels_last)
    ctx = build_step(cfg, device, steps_per_epoch)
    prog, best = EpochProgress(), {"val_top1": -1.0}
    resumed = run_folder.resume(resume, out, ctx, train_pipe, stage2, prog, best, d, log=log.info,
                                composition=(per_device, accum))
    # Records an interrupted run logged after its last checkpoint (all of them, when it wrote none
    # and this run starts fresh) are logged again: one record per step.
    log.truncate(prog.records, prog.step)
    log.start_clock(prog.elapsed_s)  # elapsed_s continues from the checkpoint's
    if resumed and prog.epoch >= epochs_total and prog.eval_pending is None:
        log.info(f"the run in {out} is finished (epoch {prog.epoch - 1} was its last, step {prog.step}): nothing to "
                 f"train; its checkpoints and exports are as they were")
        log.close()
        return 0
    if resumed:
        log.info(f"resumed from {resumed} at epoch {prog.epoch}, batch {prog.batch}, step {prog.step}"
                 + (f"; the evaluation of epoch {prog.eval_pending} is redone (a stop came during it)"
                    if prog.eval_pending is not None else ""))
    saver = run_folder.Checkpointer(out, cfg, d, ctx.raw_model, ctx.optimizer, ctx.scaler, ctx.ema, train_pipe,
                                    stage2, log, tick=board.tick)
    if resumed is not None and d.is_main:
        saver.await_check(resumed)  # good once the first loss check after it passes
    res = resolution_for_epoch(t.progressive, min(prog.epoch, epochs_total - 1), epochs_total, t.train_res)
    wrap_for_training(ctx, d, accum, t.compile, input_shape=(per_device, 3, res, res),
                       channels_last=t.channels_last, ema_from_model=not resumed)
    # every rank has loaded its data and checkpoint and met the others in DDP's first collectives:
    # from here a collective waits train.dist_timeout_s (the board's stall check) and 60 s more
    set_collective_timeout(t.dist_timeout_s + 60.0)
    final_metrics: dict[str, Any] = {}
    stopped = None
    with StopRequest() as stop:
        while (prog.epoch < epochs_total or prog.eval_pending is not None) and stopped is None:
            if prog.eval_pending is None:  # else a resumed run whose last stop came during an evaluation
                epoch = prog.epoch
                res = resolution_for_epoch(t.progressive, epoch, epochs_total, t.train_res)
                stage2.set_magnitude_scale(regularization_scale(t.progressive, epoch, epochs_total))
                train_pipe.set_epoch(epoch, res, start_batch=prog.batch)
                log.epoch_start(epoch, steps_per_epoch, prog.batch // accum, res)
                for rec in train_one_epoch(ctx, train_pipe, stage2, prog, steps_per_epoch=steps_per_epoch,
                                           log_every=t.log_every, stop=None if d.enabled else stop,
                                           max_steps=max_steps, loss_limit=t.loss_limit, tick=board.tick):
                    saver.confirm_pending()  # the loss window up to this step has passed its check
                    if "train_loss" in rec:
                        log.metrics({**rec, "steps_per_epoch": steps_per_epoch})
                        log.progress(rec, steps_per_epoch)
                    stopped = rec.get("stopped")
                    if stopped is None and d.enabled and any_rank(stop.requested, device):
                        stopped = StopReason.SIGNAL  # agreed at this log point, so every rank stops at the same step
                    if stopped is not None:
                        break
                    if any_rank(saver.due() and d.is_main, device):  # the main rank's clock decides
                        saver.save(prog, best, "mid-epoch")
                log.end_progress()
                if stopped == StopReason.SIGNAL:
                    path = saver.save(prog, best, "interrupted")
                    log.info(f"stopped by {signal.Signals(stop.signal).name} at epoch {prog.epoch} step {prog.step}; "
                             f"checkpoint {path}; continue with --resume auto (exit {stop.exit_code()})")
                    break
                evaluated = epoch == epochs_total - 1 or stopped is not None or (epoch + 1) % t.eval_every == 0
                smoke = stopped == StopReason.MAX_STEPS  # a --max-steps run: evaluated, never checkpointed
                # the epoch's training is done: a checkpoint from here on starts the next epoch
                prog.epoch, prog.batch = epoch + 1, 0
                prog.window_loss, prog.window_count, prog.window_nonfinite = 0.0, 0, 0
                prog.epoch_time_s, prog.epoch_wait_s, prog.epoch_images = 0.0, 0.0, 0
                prog.eval_pending = epoch if evaluated else None
                reduce_bn = True
            else:  # resumed: the ranks' BatchNorm statistics were averaged before the stop, and saved so
                epoch, evaluated, smoke, reduce_bn = prog.eval_pending, True, False, False
            if evaluated:
                try:
                    final_metrics = _evaluate(ctx, val_pipe, stage2_eval, cfg, d, out, epoch, prog, best, log, stop,
                                              reduce_bn=reduce_bn, tick=board.tick)
                except EvaluationStopped:
                    name, code = signal.Signals(stop.signal).name, stop.exit_code()
                    stopped = StopReason.SIGNAL
                    if smoke:  # a --max-steps run keeps no checkpoint
                        log.info(f"stopped by {name} during the evaluation after --max-steps (step {prog.step}); "
                                 f"no checkpoint (exit {code})")
                        break
                    path = saver.save(prog, best, "interrupted")
                    log.info(f"stopped by {name} during the evaluation of epoch {epoch} (step {prog.step}); checkpoint "
                             f"{path} keeps the epoch's training, its evaluation is redone by --resume auto (exit {code})")
                    break
                prog.eval_pending = None
            last_epoch = epoch == epochs_total - 1
            if stopped is None and ((epoch + 1) % cfg.checkpoint.every_epochs == 0 or last_epoch):
                path = saver.save(prog, best, "epoch", confirmed=evaluated)
                if path is not None:
                    log.artifact(path, epoch, {"val_top1": final_metrics.get("val_top1")})
        barrier()
        code = _finish(cfg, d, out, ctx, prog, final_metrics, stop if stopped == StopReason.SIGNAL else None, log)
    if code == 0 and stop.requested and d.is_main:  # it came during the export: the run was complete by then
        print(f"({signal.Signals(stop.signal).name} came after the last evaluation: the run is complete, nothing was "
              f"lost)", file=sys.stderr, flush=True)
    return code

def _run_id(out: Path) -> str:
    """The W&B run id: the same for every resume of one run folder."""
    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]

def _finish(cfg: Config, d: DistInfo, out: Path, ctx: StepContext, prog: EpochProgress, final_metrics: dict,
            stopped_by: StopRequest | None, log) -> int:
    """The export and the final line; the exit status (128 + signal when a stop was requested)."""
    # A resumed run that had already finished trains and evaluates nothing: keep its export as it is.
    fresh_export = bool(final_metrics) or not (out / "model.safetensors").exists()
    if d.is_main and stopped_by is None and cfg.checkpoint.export_safetensors and fresh_export:
        run_folder.export(ctx.ema.module if ctx.ema else ctx.raw_model, out / "model.safetensors", cfg, final_metrics,
                          prog.epoch - 1)
    if final_metrics and d.is_main and stopped_by is None:
        print(f"final val top-1 {final_metrics['val_top1']:.2f} top-5 {final_metrics['val_top5']:.2f} "
              f"(epoch {final_metrics['epoch']}, step {final_metrics['step']}) -> {out}", flush=True)
    log.close()
    return stopped_by.exit_code() if stopped_by is not None else 0

def _evaluate(ctx: StepContext, val_pipe, stage2_eval, cfg: Config, d: DistInfo, out: Path, epoch: int,
              prog: EpochProgress, best: dict, log, stop: StopRequest, *, reduce_bn: bool = True,
              tick=lambda phase: None) -> dict[str, Any]:
    """Validation of the evaluated weights (the EMA's when kept) after BatchNorm statistics are
    averaged over ranks (``reduce_bn``; a resumed evaluation finds them averaged already); a NaN/Inf
    validation loss stops the run like a training one. It says what it evaluates and shows its
    progress; a stop request ends it within a few batches (:class:`EvaluationStopped`)."""
    model, ema = ctx.raw_model, ctx.ema
    if reduce_bn:
        reduce_bn_stats(model, ema.module if ema else None)  # every rank evaluates the same model
    eval_model = ema.module if ema else model
    val_pipe.set_epoch(epoch)
    total = min(val_pipe.num_samples, cfg.eval.max_images) if cfg.eval.max_images else val_pipe.num_samples
    log.info(f"epoch {epoch}: evaluating {total:,} images at {cfg.eval.res} px"
             + (f" (eval.max_images of {val_pipe.num_samples:,})" if total < val_pipe.num_samples else "")
             + (" (EMA weights)" if ema else ""))
    shown = EvalProgress(len(val_pipe), total, d.world_size, tty=log.tty, enabled=d.is_main and cfg.log.progress,
                         write=log.info)

    def progress(batches: int, images: int) -> None:
        tick("eval")
        shown(batches, images)

    tick("eval")
    try:
        metrics = evaluate(eval_model, val_pipe, stage2_eval, device=d.device, precision=cfg.train.precision,
                           stop=stop, progress=progress)
    finally:
        shown.close()
    if not math.isfinite(metrics["val_loss"]):
        raise NonFiniteLossError(f"validation loss is NaN/Inf after epoch {epoch}", step=prog.step)
    record = {"epoch": epoch, "step": prog.step, **metrics}
    log.metrics(record)
    log.info(f"epoch {epoch}: val top-1 {metrics['val_top1']:.2f} top-5 {metrics['val_top5']:.2f}")
    if metrics["val_top1"] > best["val_top1"]:
        best.update(val_top1=metrics["val_top1"], epoch=epoch)
        if d.is_main and cfg.checkpoint.keep_best:
            run_folder.export(eval_model, out / "best.safetensors", cfg, metrics, epoch)
    return record
