"""What the epoch loop, the step and the run folder all speak of: the position in a run, why a run
stops, and the errors that end it. A leaf of the engine (imports nothing of it), so the step, the
loop and the checkpoint policy share it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class StopReason(str, Enum):
    """Why a run stops before its last epoch: decided at one step that every rank agrees on."""

    SIGNAL = "stop requested"  # SIGTERM/SIGINT/SIGUSR2: an agreed stop with an ``interrupted`` checkpoint
    MAX_STEPS = "max_steps"  # ``--max-steps`` reached: a smoke run ends, evaluated, without a checkpoint


@dataclass
class EpochProgress:
    """Position and running sums inside an epoch; saved in checkpoints so a resume is exact."""

    epoch: int = 0
    batch: int = 0  # micro-batches consumed in this epoch
    step: int = 0  # global optimizer steps done
    window_loss: float = 0.0  # finite losses summed since the last log point (micro-batch means)
    window_count: int = 0  # micro-batches since the last log point
    window_nonfinite: int = 0  # of which with a NaN/Inf loss (fp16 only: other precisions stop at once)
    skipped_images: int = 0  # unreadable images stage 1 replaced so far (Batch.skipped), this run
    epoch_time_s: float = 0.0  # this epoch's training wall time so far (over resumes; eval not included)
    epoch_wait_s: float = 0.0  # of which waiting for stage 1
    epoch_images: int = 0  # images trained this epoch, all ranks
    records: int = -1  # metrics.jsonl records when this state was saved (-1: not counted)
    elapsed_s: float = 0.0  # the run's wall time when this state was saved (over all its resumes)
    eval_pending: int | None = None  # an epoch whose training is done and whose evaluation a stop cut short

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

class NonFiniteLossError(RuntimeError):
    """Loss became NaN/Inf (or, with fp16, every loss of a window, or the loss scale collapsed), or its
    mean passed ``train.loss_limit``, or the weights are no longer finite; the run stops and the last
    good checkpoint stays. Raised only from values reduced over ranks, so under DDP every rank
    raises it at the same step (``engine.failures``: printed once, by rank 0)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

class AgreedDataError(Exception):
    """A data or resume error every rank raises alike at the same point, from values all ranks agreed
    on (a checkpoint none can use, one written by another process count): printed once, by rank 0."""


class RanksDisagreeError(RuntimeError):
    """Ranks that must hold the same weights do not (found at a checkpoint, from every rank's
    fingerprint, so every rank raises it at the same step)."""

def advice(precision: str) -> str:
    """What to change when a run diverges; fp32 is suggested only to a run that is not fp32."""
    if precision == "fp32":
        return "lower optim.lr or lengthen optim.warmup_epochs (the run is already fp32)"
    return f"lower optim.lr or lengthen optim.warmup_epochs, or try train.precision=fp32 (this run is {precision})"

def trained_epoch(prog: EpochProgress) -> int:
    """The epoch of the last step in the weights, counted from 0 as metrics.jsonl and timm count: what a
    checkpoint's name and record say. At an epoch's end ``prog`` already points at the next epoch's
    batch 0, so the end-of-epoch checkpoint of epoch 5 is ``ckpt-e0005-...``, not ``e0006``."""
    return prog.epoch - 1 if prog.batch == 0 and prog.epoch > 0 else prog.epoch
