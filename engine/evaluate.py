"""Evaluation: top-1/top-5 and the loss over the whole val set, summed over ranks; the engine's, and
the tools' (``tools/evaluate.py``), so a checkpoint evaluated later gives the run's own figures.

A stop request (SIGTERM, SIGINT, the scheduler's early signal) is honoured during an evaluation, not
after it: a 224-px ImageNet evaluation takes minutes on a slow device, longer than Slurm's
``KillWait`` or a pod's grace period, after which the stop becomes a SIGKILL. A lone process looks at
its flag after every batch (a host value: no sync). Under DDP the ranks agree, so that all of them
leave at the same batch and none waits in the final all-reduce: every :data:`STOP_CHECK_EVERY`
batches one tiny all-reduce of the flags (a host sync, deliberately that rarely; on a GPU a few
batches take well under a second). Shards may differ by one batch between ranks, so the checks
happen only within the shortest rank's batches (one all-reduce of the lengths first).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.distributed import all_reduce_min, all_reduce_sum, any_rank
from engine.step import DTYPES

STOP_CHECK_EVERY = 8  # batches between the ranks' agreements on a stop request (one tiny all-reduce each)


class EvaluationStopped(Exception):
    """A stop request every rank agreed on ended the evaluation early; nothing was reduced."""

    def __init__(self, images: int):
        super().__init__(f"evaluation stopped after {images} images on this rank")
        self.images = images


@torch.no_grad()
def evaluate(model: nn.Module, pipeline, stage2, *, device: torch.device, precision: str,
             flip_tta: bool = False, stop: Any = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Top-1/top-5 and CE loss over the whole val set, summed across ranks.

    ``flip_tta``: average the softmax of each image and its horizontal mirror (flip test-time
    augmentation; probabilities, not logits, are averaged); the loss is then the NLL of that
    average. Off in training, so the engine's figures are single-view.

    ``stop``: an object with a ``requested`` flag (the engine's ``StopRequest``); when set, every rank
    leaves at the same batch and :class:`EvaluationStopped` is raised (see the module doc).
    ``progress(batches_done, images_done)``: called after every batch on this rank (the engine
    shows a bar or a line every so often; see ``engine.logging``).
    """
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss, count
    ctx_autocast = (contextlib.nullcontext() if precision == "fp32"
                    else torch.autocast(device_type=device.type, dtype=DTYPES[precision]))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    agreed_batches = 0  # batches every rank has: the checks happen among these only
    if stop is not None and distributed:
        lengths = all_reduce_min(torch.tensor([len(pipeline)], dtype=torch.int64, device=device))
        agreed_batches = int(lengths.item())  # deliberate sync: once per evaluation
    images = 0
    for i, batch in enumerate(pipeline):
        x, labels = stage2(batch)
        with ctx_autocast:
            logits = model(x)
            flipped = model(x.flip(3)) if flip_tta else None
        logits = logits.float()
        if flipped is not None:
            log_probs = torch.logsumexp(torch.stack([logits.log_softmax(1), flipped.float().log_softmax(1)]), 0)
            logits = log_probs - math.log(2.0)  # log of the mean probability: ranks and NLL as the average
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += labels.numel()
        images += labels.shape[0]
        if progress is not None:
            progress(i + 1, images)
        if stop is not None:
            if not distributed:
                if stop.requested:
                    raise EvaluationStopped(images)
            elif (i + 1) % STOP_CHECK_EVERY == 0 and i < agreed_batches and any_rank(stop.requested, device):
                raise EvaluationStopped(images)
    all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return {"val_top1": 100.0 * float(sums[0]) / n, "val_top5": 100.0 * float(sums[1]) / n,
            "val_loss": float(sums[2]) / n, "val_images": int(sums[3])}


class EvalProgress:
    """What evaluation shows while it runs (rank 0): a tqdm bar on a terminal, else one line every
    :data:`LINE_EVERY_S` seconds, so a long evaluation is never silent (a 224-px ImageNet val on a
    CPU takes a quarter of an hour)."""

    LINE_EVERY_S = 30.0

    def __init__(self, total_batches: int, images_total: int, world_size: int, tty: bool, enabled: bool, write):
        self.total, self.world, self.write, self.enabled = total_batches, world_size, write, enabled
        self.images_total = images_total
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_batches, desc="eval", unit="batch", leave=False, dynamic_ncols=True)

    def __call__(self, batches: int, images: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(batches - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last >= self.LINE_EVERY_S and batches < self.total:
            self.last = now
            done = min(images * self.world, self.images_total)
            self.write(f"evaluating: {done:,} of {self.images_total:,} images ({batches / max(self.total, 1):.0%}), "
                       f"{now - self.start:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
