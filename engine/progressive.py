"""Per-epoch training resolution (and regularization scale) for progressive resizing.

- ``linear``: ffcv-imagenet's ramp, res(e) = round(interp(e, [start_epoch, end_epoch],
  [start_res, end_res]) / round_to) * round_to, constant outside the ramp.
- ``stages``: EfficientNetV2 progressive learning (Tan & Le 2021, google/automl efficientnetv2),
  also the way ResNet-RS-style recipes grow resolution: the run is cut into ``num_stages`` equal
  stages; stage i trains at start_res + (end_res - start_res) * i / (num_stages - 1), rounded, and,
  with ``scale_regularization``, RandAugment magnitude and mixup/CutMix alphas grow with it from
  a weak value to the recipe's (scale (i+1)/num_stages).
- ``none``: always ``train.train_res``.
"""
from __future__ import annotations

import numpy as np

from common.config import ProgressiveConfig


def _round(res: float, multiple: int) -> int:
    return int(round(res / multiple)) * multiple


def resolution_for_epoch(p: ProgressiveConfig, epoch: int, epochs: int, train_res: int) -> int:
    if p.kind == "none":
        return train_res
    if p.kind == "linear":
        res = np.interp(epoch, [p.start_epoch, p.end_epoch], [p.start_res, p.end_res])
        return _round(float(res), p.round_to)
    stage = _stage(p, epoch, epochs)
    if p.num_stages == 1:
        return _round(p.end_res, p.round_to)
    res = p.start_res + (p.end_res - p.start_res) * stage / (p.num_stages - 1)
    return _round(res, p.round_to)


def regularization_scale(p: ProgressiveConfig, epoch: int, epochs: int) -> float:
    """Multiplier for RandAugment magnitude and mix alphas (1.0 = the recipe's values)."""
    if p.kind != "stages" or not p.scale_regularization:
        return 1.0
    return (_stage(p, epoch, epochs) + 1) / p.num_stages


def _stage(p: ProgressiveConfig, epoch: int, epochs: int) -> int:
    return min(p.num_stages - 1, epoch * p.num_stages // max(epochs, 1))
