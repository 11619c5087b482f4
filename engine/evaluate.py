"""Evaluation: top-1/top-5 and the loss over the whole val set, summed over ranks; the engine's, and
the tools' (``tools/evaluate.py``), so a checkpoint evaluated later gives the run's own figures."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.distributed import all_reduce_sum
from engine.step import DTYPES

@torch.no_grad()
def evaluate(model: nn.Module, pipeline, stage2, *, device: torch.device, precision: str,
             flip_tta: bool = False) -> dict[str, float]:
    """Top-1/top-5 and CE loss over the whole val set, summed across ranks.

    ``flip_tta``: average the softmax of each image and its horizontal mirror (flip test-time
    augmentation; probabilities, not logits, are averaged); the loss is then the NLL of that
    average. Off in training, so the engine's figures are single-view.
    """
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, loss, count
    ctx_autocast = (contextlib.nullcontext() if precision == "fp32"
                    else torch.autocast(device_type=device.type, dtype=DTYPES[precision]))
    for batch in pipeline:
        images, labels = stage2(batch)
        with ctx_autocast:
            logits = model(images)
            flipped = model(images.flip(3)) if flip_tta else None
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
    all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    return {"val_top1": 100.0 * float(sums[0]) / n, "val_top5": 100.0 * float(sums[1]) / n,
            "val_loss": float(sums[2]) / n, "val_images": int(sums[3])}
