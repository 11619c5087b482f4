"""Classification losses for index labels ``[N]`` or soft targets ``[N, C]``.

Where label smoothing happens (once): with mixup/CutMix, stage 2 (pipelines/augment) builds soft
targets that already contain the smoothing, as timm's ``Mixup(label_smoothing=...)`` does
(off = s / C, on = 1 - s + s / C, then mixed). These losses therefore smooth only index labels and
take soft targets as they are, so smoothing is never applied twice. This is timm's behaviour too
(timm/loss/binary_cross_entropy.py, timm/loss/cross_entropy.py), which the tests use as the oracle.

- ``bce`` (``BinaryCrossEntropy``), the "ResNet strikes back" loss (Wightman et al. 2021):
  one-vs-all sigmoid BCE averaged over N * C. Index labels become one-hot with timm's smoothing
  values above; when ``bce_target_thresh > 0`` targets become ``target > thresh`` (0/1).
  A1 (smoothing 0.1, thresh 0.2): the off value 1e-4 is zeroed and the on value 0.9001 becomes 1,
  so for index labels the smoothing has no effect at all; with mixup a class is a positive when its
  mixed weight ``lam * 0.9001 + (1 - lam) * 1e-4 > 0.2``, i.e. ``lam > ~0.222`` instead of
  ``lam > 0.2``: smoothing only moves the binarization cut slightly. A2/A3 use smoothing 0.
- ``ce``: softmax cross-entropy. Index labels use torch's ``label_smoothing`` (equal to timm
  ``LabelSmoothingCrossEntropy``: (1 - s) * NLL + s * mean over classes of -log p); soft targets
  use ``sum(-t * log_softmax)`` (timm ``SoftTargetCrossEntropy``).
Both compute in fp32 whatever the logits' dtype (autocast would do the same for BCE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import LossConfig


def _check_classes(num_classes: int | None, logits: Tensor, target: Tensor) -> None:
    """Shapes only (no device sync): a wrong class count fails loudly instead of broadcasting."""
    if num_classes is not None and (logits.shape[-1] != num_classes
                                    or (target.ndim == 2 and target.shape[-1] != num_classes)):
        raise ValueError(f"loss expects {num_classes} classes, got logits {tuple(logits.shape)} "
                         f"and targets {tuple(target.shape)}")


class BinaryCrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.0, target_thresh: float = 0.0, num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing
        self.target_thresh = target_thresh  # 0 = keep soft targets

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_classes(self.num_classes, logits, target)
        logits = logits.float()
        if target.ndim == 1:  # index labels: one-hot, smoothed here (and only here)
            c = logits.shape[-1]
            off = self.smoothing / c
            target = torch.full_like(logits, off).scatter_(1, target.long().view(-1, 1), 1.0 - self.smoothing + off)
        else:
            target = target.float()
        if self.target_thresh > 0:
            target = (target > self.target_thresh).float()
        return F.binary_cross_entropy_with_logits(logits, target)


class SoftTargetCrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.0, num_classes: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_classes(self.num_classes, logits, target)
        logits = logits.float()
        if target.ndim == 1:
            return F.cross_entropy(logits, target.long(), label_smoothing=self.smoothing)
        return torch.sum(-target.float() * F.log_softmax(logits, dim=-1), dim=-1).mean()


def build_loss(cfg: LossConfig, num_classes: int) -> nn.Module:
    """The loss named by ``cfg.name``; logits and soft targets must have ``num_classes`` columns."""
    if cfg.name == "bce":
        return BinaryCrossEntropy(cfg.label_smoothing, cfg.bce_target_thresh, num_classes)
    elif cfg.name == "ce":
        if cfg.bce_target_thresh > 0:
            raise ValueError("loss.bce_target_thresh applies to loss.name = 'bce' only")
        return SoftTargetCrossEntropy(cfg.label_smoothing, num_classes)
    raise ValueError(f"loss.name = {cfg.name!r} is not one of bce, ce")

