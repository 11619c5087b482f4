"""A run folder's checkpoints as the training loop uses them: prepare, save, confirm, reject, resume.

The file-level guarantees (atomic writes, checksums, weights_only loads) are ``engine.checkpoint``'s;
this module holds the run's policy:

* **Start.** Temporary files of a killed save are removed. A folder that already holds a run's
  checkpoints or output (records in ``metrics.jsonl``, exports) is continued only with ``--resume
  auto`` (or a path); ``--resume fresh`` moves the old run's files into ``previous-<time>/`` and
  starts over. Without either, the run stops with one line rather than mixing two runs'
  checkpoints (pruning by step number would delete the new ones) or overwriting a finished run's
  records and exports.
* **Save** (every rank, same step). Weights and optimizer state must be finite, or nothing is
  written. BatchNorm running statistics are averaged over ranks into the checkpoint (timm's
  ``--dist-bn reduce``) while each rank keeps, and stores per rank, its own: a resumed run then
  continues exactly as an uninterrupted one, whose ranks never averaged at that step.
* **Confirm / reject.** A checkpoint is confirmed (in its sidecar record) when the next loss check
  passes, also the one a run resumed from; when a check fails, the checkpoints written since the
  last confirmed one are set aside (see ``engine.checkpoint``).
* **Resume.** ``auto``: the newest usable checkpoint; if the folder holds checkpoints and none can be
  used, one line listing them (never a silent fresh start). A path: that file, or one line saying
  why not.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import checkpoint as ckpt
from common.config import Config, ConfigError, to_dict
from engine.distributed import (DistInfo, barrier, bn_running_stats, broadcast_from_main, gather_objects,
                                gather_to_main, reduce_bn_stats)
from engine.setup import batch_composition
from engine.state import AgreedDataError, EpochProgress, NonFiniteLossError, RanksDisagreeError, advice, trained_epoch
from pipelines.base import DataError, load_random_state, random_state

RUN_FILES = ("metrics.jsonl", "best.safetensors", "model.safetensors")  # a run's output: never overwritten
SIDE_FILES = ("metrics.png",)  # drawn from a run's output (tools/demo.py): moved aside with it


def prepare(out: Path, resume: str | None, d: DistInfo, log=print) -> None:
    """Checks and tidies ``out`` before a run writes to it (every rank calls it; rank 0 acts).

    A run's output is never overwritten: without ``--resume`` a folder with checkpoints or output
    stops the run with the choices that are true for it; ``--resume fresh`` moves the old run's files
    into ``previous-<time>/``; ``--resume auto`` continues from a checkpoint, and where the folder holds
    output but no checkpoint (a ``--max-steps`` run, a run killed before its first checkpoint) there is
    nothing to continue: its files are moved aside as ``fresh`` does and the run starts over (a
    refusal would stop a Slurm job, whose every start runs ``--resume auto``, for good)."""
    existing = ckpt.list_checkpoints(out)
    if existing and resume is None:
        raise ConfigError(f"{out} already holds checkpoints (newest {existing[-1].name}); continue them with "
                          f"--resume auto, or start over with --resume fresh (moves them into {out}/previous-<time>/)")
    outputs = run_outputs(out)
    if outputs and resume is None:
        raise ConfigError(f"{out} already holds a run's output ({', '.join(p.name for p in outputs)}) and no checkpoint "
                          f"to continue from; start over with --resume fresh (moves them into {out}/previous-<time>/), "
                          f"or choose another --out")
    barrier()  # every rank has looked before rank 0 moves anything
    if d.is_main:
        count, size = ckpt.clean_stale_temps(out)
        if count:
            log(f"removed {count} temporary file(s) ({size / 2**20:,.0f} MiB) left by an interrupted save in {out}")
        if resume == "fresh" and out.is_dir():
            moved = _move_aside(out)
            if moved:
                log(f"--resume fresh: moved the previous run's files into {moved}")
        elif resume == "auto" and outputs and not existing:
            moved = _move_aside(out)
            log(f"--resume auto: {out} holds a run's output ({', '.join(p.name for p in outputs)}) but no checkpoint to "
                f"continue from; moved its files into {moved} and starting fresh")
    barrier()


def run_outputs(out: Path) -> list[Path]:
    """The files of an earlier run in ``out`` that a new run would overwrite (metrics with records,
    exports); checkpoints are looked at separately."""
    found = [out / name for name in RUN_FILES if (out / name).is_file()]
    return [p for p in found if p.stat().st_size > 0]


def _move_aside(out: Path) -> Path | None:
    names = [p for p in out.iterdir()
             if p.is_file() and (p.name in RUN_FILES + SIDE_FILES or p.name.startswith("ckpt-"))]
    if not names:
        return None
    dest = out / time.strftime("previous-%Y%m%d-%H%M%S")
    dest.mkdir()
    for p in names:
        p.rename(dest / p.name)
    return dest




def tensor_norms(tensors: list[torch.Tensor]) -> list[float]:
    """The 2-norm of every floating tensor (NaN/Inf when it holds one); one read from the device."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return []
    return torch.stack([n.double() for n in torch._foreach_norm(floats)]).tolist()  # deliberate sync: per checkpoint




def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class Checkpointer:
    """Saves the run's state at a step every rank reaches together; rank 0 writes the files."""

    def __init__(self, out: Path, cfg: Config, d: DistInfo, model: nn.Module, optimizer, scaler, ema, stage1, stage2,
                 log, tick=lambda phase: None):
        self.out, self.cfg, self.d, self.tick = out, cfg, d, tick
        self.model, self.optimizer, self.scaler, self.ema = model, optimizer, scaler, ema
        self.stage1, self.stage2 = stage1, stage2
        self.log = log
        self.pending: list[Path] = []  # written since the last passed loss check
        self.last_save = time.monotonic()

    def _modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.model, (self.ema.module if self.ema else None)

    def due(self) -> bool:
        """The main rank's clock says a mid-epoch checkpoint is due (every rank must agree: the
        caller reduces it under DDP)."""
        minutes = self.cfg.checkpoint.every_minutes
        return minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes

    def save(self, prog: EpochProgress, best: dict, tag: str, *, confirmed: bool = False) -> Path | None:
        """Write a checkpoint of the state at ``prog``; returns its path on rank 0."""
        self.tick("checkpoint")
        self._check_ranks(prog)
        own = [b.detach().clone() for b in bn_running_stats(*self._modules())]
        reduce_bn_stats(*self._modules())  # the checkpoint holds the average over ranks ...
        # to the writer only (an all-gather would send every rank's state to every rank)
        per_rank = gather_to_main({"stage1": random_state(self.stage1), "stage2": self.stage2.state_dict(),
                                   "rng": ckpt.rng_state(),
                                   "window": [prog.window_loss, prog.window_count, prog.window_nonfinite],
                                   "bn": [b.cpu() for b in own] if self.d.enabled else None}, self.d)
        path = None
        try:
            if self.d.is_main:
                prog.records = self.log.records  # the log up to here belongs to this state
                prog.elapsed_s = self.log.elapsed()
                path = self._write(prog, best, tag, per_rank, confirmed)
        finally:
            for b, mine in zip(bn_running_stats(*self._modules()), own):
                b.copy_(mine)  # ... and each rank continues with its own statistics
        self.last_save = time.monotonic()
        return path

    def _check_ranks(self, prog: EpochProgress) -> None:
        """Nothing non-finite is written, and every rank holds the same weights: the parameters, the
        EMA's and the optimizer state must be identical on every rank (DDP averages the gradients,
        so every rank takes the same steps); their norms are compared bit for bit. BatchNorm
        statistics are per rank (checked for finiteness only). One small gather of every rank's
        verdict, so all ranks raise together (``engine.failures``: one line, from rank 0)."""
        shared = [*self.model.parameters(), *_optimizer_tensors(self.optimizer)]
        own = [*self.model.buffers()]
        if self.ema is not None:
            shared += [*self.ema.module.parameters()]
            own += [*self.ema.module.buffers()]
        norms = tensor_norms(shared + own)
        fingerprint = norms[:len([t for t in shared if t.is_floating_point() and t.numel()])]
        everyone = gather_objects({"finite": all(map(math.isfinite, norms)), "fingerprint": fingerprint}, self.d)
        where = f"at step {prog.step} (epoch {prog.epoch}); no checkpoint written"
        bad = [r for r, v in enumerate(everyone) if not v["finite"]]
        if bad:
            ranks = f" on rank {', '.join(map(str, bad))}" if self.d.enabled else ""
            raise NonFiniteLossError(f"weights or optimizer state are NaN/Inf{ranks} {where}; "
                                     f"{advice(self.cfg.train.precision)}", step=prog.step)
        differ = [r for r, v in enumerate(everyone) if v["fingerprint"] != everyone[0]["fingerprint"]]
        if differ:
            raise RanksDisagreeError(f"rank {', '.join(map(str, differ))} of {self.d.world_size} holds other weights than "
                                     f"rank 0 (model, EMA or optimizer state) {where}: every rank must hold the same "
                                     f"model (a faulty GPU, or a bug: please report it); continue from the last "
                                     f"checkpoint with --resume auto")

    def _write(self, prog: EpochProgress, best: dict, tag: str, per_rank: list, confirmed: bool) -> Path:
        per_device, accum = batch_composition(self.cfg.train.global_batch_size, self.d.world_size,
                                              self.cfg.train.per_device_batch_size)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                 "progress": prog.state_dict(), "per_rank": per_rank, "world_size": self.d.world_size,
                 "per_device_batch": per_device, "accum_steps": accum,  # the composition a mid-epoch resume needs
                 "config": to_dict(self.cfg), "best": dict(best), "tag": tag,
                 "workdir": str(Path.cwd())}  # what the config's relative paths (data.root) are relative to
        epoch = trained_epoch(prog)
        path = self.out / ckpt.checkpoint_name(epoch, prog.step)
        ckpt.atomic_save(state, path, {"epoch": epoch, "step": prog.step, "tag": tag, "confirmed": confirmed})
        if not confirmed:
            self.pending.append(path)
        ckpt.prune(self.out, self.cfg.checkpoint.keep_last)
        return path

    def await_check(self, path: Path) -> None:
        """``path`` (the checkpoint this run resumed from) counts as good once the next loss check
        passes, as if this process had written it: an ``interrupted`` checkpoint, or one written
        just before a kill, was never checked by the run that wrote it. Its sidecar keeps the
        verdict, so a later start knows it too."""
        record = ckpt.read_record(path) or {}
        if not record.get("confirmed") and path.parent.resolve() == self.out.resolve():
            self.pending.append(path)

    def confirm_pending(self) -> None:
        """A loss check has passed since the pending checkpoints were written."""
        for path in self.pending:
            if path.exists():
                ckpt.confirm(path)
        self.pending.clear()


def reject_after_failure(out: Path) -> str:
    """Set aside the checkpoints not confirmed by a passed check; a sentence for the error line."""
    moved = ckpt.reject(out)
    good = ckpt.last_confirmed(out)
    aside = f"set aside {len(moved)} checkpoint(s) written since the last passed check (*.pt.rejected); " if moved else ""
    if good is None:
        return aside + "no checkpoint of this run has passed a loss check yet, so it must start over (--resume fresh)"
    return aside + f"the last good checkpoint is {good.name}: fix the cause, then continue with --resume auto"


def resume(spec: str | None, out: Path, parts, stage1, stage2, prog: EpochProgress, best: dict, d: DistInfo,
           log=print, composition: tuple[int, int] | None = None) -> Path | None:
    """Loads the checkpoint ``spec`` names (see the module doc) into the run; returns its path.

    Every rank loads the same checkpoint: rank 0 lists the folder and names each candidate with its
    record (size, sha256), every rank verifies its own read of that file against it, and the ranks'
    verdicts are gathered before any of them uses it. A checkpoint one rank cannot read (EIO or
    ESTALE on one node, a stale directory listing) is passed over by all of them together; ranks
    that resumed from different checkpoints would hold different steps, schedules and optimizer
    moments (DDP broadcasts only the weights) and meet in mismatched collectives.
    ``composition``: this run's (per-device batch, accumulation steps)."""
    if spec in (None, "fresh"):
        return None
    if spec == "auto":
        found = _agreed_newest(out, d, log)
        if found is None:
            log(f"--resume auto: no checkpoint in {out}; starting fresh")
            return None
        path, state = found
    else:
        path = Path(spec)
        state, problem = _load_everywhere(path, d)
        if problem:
            raise AgreedDataError(f"--resume {spec}: cannot use this file: {problem}")
        if not isinstance(state, dict) or not {"model", "optimizer", "progress"} <= set(state):
            raise AgreedDataError(f"--resume {spec}: not a training checkpoint of engine.run (an export or another "
                                  f"file?); pass a ckpt-*.pt from a run folder")
    _check_composition(path, state, d, composition)
    _load_into(state, parts, stage1, stage2, prog, best, d, log)
    return path


def _load_everywhere(path: Path, d: DistInfo) -> tuple[dict[str, Any] | None, str]:
    """(contents, "") when every rank loaded ``path`` as rank 0's record describes it; else (None,
    why: the first ranks that could not, each with its reason)."""
    try:
        seen = (ckpt.read_record(path), "") if d.is_main else None
    except ckpt.UnreadableCheckpoint as e:
        seen = (None, str(e))
    record, problem = broadcast_from_main(seen, d)
    state = None
    if not problem:
        try:
            state = ckpt.load(path, record)
        except ckpt.UnreadableCheckpoint as e:
            problem = str(e)
    verdicts = gather_objects(problem, d)  # small: every rank must know whether all of them can go on
    bad = [(r, why) for r, why in enumerate(verdicts) if why]
    if not bad:
        return state, ""
    return None, "; ".join(f"rank {r}: {why}" if d.enabled else why for r, why in bad[:3]) + \
        (f"; and {len(bad) - 3} more rank(s)" if len(bad) > 3 else "")


def _agreed_newest(out: Path, d: DistInfo, log) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of rank 0's listing that every rank can load (see :func:`resume`)."""
    names = broadcast_from_main([p.name for p in reversed(ckpt.list_checkpoints(out))] if d.is_main else None, d)
    failures = []
    for name in names:
        state, problem = _load_everywhere(out / name, d)
        if not problem:
            return out / name, state
        failures.append(f"{name}: {problem}")
        log(f"checkpoint {name} is unusable ({problem}); " + ("every rank takes an older one" if d.enabled else
                                                               "trying an older one"))
    if failures:
        raise AgreedDataError(f"--resume auto: {out} holds {len(failures)} checkpoint(s) and none can be used: "
                              + "; ".join(failures) + "; fix or remove them, or start over with --resume fresh")
    return None


def _check_composition(path: Path, state: dict, d: DistInfo, composition: tuple[int, int] | None) -> None:
    """A checkpoint written mid-epoch continues only on the batch composition that wrote it: its
    position is a count of micro-batches of this rank's shard, and with another process count, per-
    device batch or accumulation the rest of the epoch would not be the samples it has left (some
    seen twice, some never) and the epoch would take another number of steps. At an epoch's end any
    composition continues (README: Exactness)."""
    batch = int(state["progress"].get("batch", 0))
    then = (state.get("world_size"), state.get("per_device_batch"), state.get("accum_steps"))
    now = (d.world_size, *(composition or (None, None)))
    same = all(a is None or b is None or a == b for a, b in zip(then, now))
    if batch == 0 or same:
        return
    epoch = int(state["progress"]["epoch"])
    boundary = _newest_epoch_end(path.parent, before=path)
    how = (f"--resume {boundary} (the end of epoch {epoch - 1}: epoch {epoch} is then trained from its start)"
           if boundary is not None else "--resume fresh (no end-of-epoch checkpoint is left)")
    shown = lambda c: " x ".join(str(v) for v in c if v is not None)  # noqa: E731
    raise AgreedDataError(f"{path.name} was written in the middle of epoch {epoch} (micro-batch {batch}) by "
                          f"{shown(then)} (processes x per-device batch x accumulation); this run has {shown(now)}: "
                          f"the rest of the epoch would repeat or skip samples. Continue it with the same composition, "
                          f"or from an epoch boundary with {how}")


def _newest_epoch_end(folder: Path, before: Path) -> Path | None:
    found = None
    for p in ckpt.list_checkpoints(folder):
        if p == before:
            break
        try:
            if (ckpt.read_record(p) or {}).get("tag", "epoch") == "epoch":
                found = p
        except ckpt.UnreadableCheckpoint:
            continue
    return found


def _load_into(state: dict, parts, stage1, stage2, prog: EpochProgress, best: dict, d: DistInfo, log) -> None:
    parts.raw_model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.module.load_state_dict(state["ema"])
    elif parts.ema is not None:  # an EMA the checkpoint did not keep starts from its weights, on every rank
        parts.ema.set(parts.raw_model)
    for k, v in state["progress"].items():
        setattr(prog, k, v)
    best.update(state.get("best", {}))
    if state["world_size"] != d.world_size:  # at an epoch's end (_check_composition): continues, not bit-exactly
        log(f"resuming a {state['world_size']}-process checkpoint on {d.world_size} processes at the start of epoch "
            f"{prog.epoch}: augmentation RNG streams restart from the seed, BatchNorm statistics start from their "
            f"average")
        return
    own = state["per_rank"][d.rank]
    load_random_state(stage1, own.get("stage1"))
    stage2.load_state_dict(own["stage2"])
    ckpt.set_rng_state(own["rng"])
    if "window" in own:  # this rank's loss sums since the last log point
        prog.window_loss, prog.window_count = float(own["window"][0]), int(own["window"][1])
        prog.window_nonfinite = int(own["window"][2]) if len(own["window"]) > 2 else 0
    if own.get("bn") is not None:  # this rank's own BatchNorm statistics (the checkpoint holds the average)
        with torch.no_grad():
            for b, mine in zip(bn_running_stats(parts.raw_model, parts.ema.module if parts.ema else None), own["bn"]):
                b.copy_(mine)


def export(model: nn.Module, path: Path, cfg: Config, metrics: dict[str, Any], epoch: int) -> None:
    meta = {"arch": cfg.model.arch, "num_classes": str(cfg.data.num_classes), "epoch": str(epoch),
            "val_top1": str(metrics.get("val_top1", "")), "eval_res": str(cfg.eval.res),
            "crop_pct": str(cfg.eval.crop_pct), "config": json.dumps(to_dict(cfg)), "workdir": str(Path.cwd())}
    ckpt.export_safetensors(model.state_dict(), path, meta)


def remove_if_empty(out: Path) -> None:
    """A run that failed before writing anything leaves no folder behind (only an empty
    metrics.jsonl, if that)."""
    if not out.is_dir():
        return
    files = [p for p in out.rglob("*") if p.is_file()]
    if all(p.name == "metrics.jsonl" and p.stat().st_size == 0 for p in files):
        shutil.rmtree(out, ignore_errors=True)
