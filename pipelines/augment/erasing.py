"""Random erasing, batched (optional: no ResNet-strikes-back recipe uses it).

Zhong et al. 2020, "Random Erasing Data Augmentation" (https://arxiv.org/abs/1708.04896), with
timm ``RandomErasing`` defaults (``timm/data/random_erasing.py``): with probability ``prob`` one
box per image, area 2 %..33 % of the image, log-uniform aspect ratio in [0.3, 1/0.3], up to 10
tries to fit, filled with per-pixel N(0, 1) noise in normalized space (timm's ``pixel`` mode).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .transfer import to_device

ATTEMPTS = 10


def erase_boxes(n: int, h: int, w: int, prob: float, rng: np.random.Generator,
                area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))) -> np.ndarray:
    """[N, 4] boxes (y_lo, y_hi, x_lo, x_hi); empty rows where nothing is erased."""
    target = rng.uniform(*area, (n, ATTEMPTS)) * h * w
    ratio = np.exp(rng.uniform(*log_ratio, (n, ATTEMPTS)))
    bh = np.rint(np.sqrt(target * ratio)).astype(np.int64)
    bw = np.rint(np.sqrt(target / ratio)).astype(np.int64)
    fits = (bh < h) & (bw < w)
    first = fits.argmax(1)  # first attempt that fits
    rows = np.arange(n)
    bh, bw = bh[rows, first], bw[rows, first]
    ok = fits[rows, first] & (rng.random(n) < prob)
    top = rng.integers(0, np.maximum(h - bh, 0) + 1)
    left = rng.integers(0, np.maximum(w - bw, 0) + 1)
    boxes = np.stack([top, top + bh, left, left + bw], axis=1)
    boxes[~ok] = 0
    return boxes


def random_erasing(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Erase one random box per image of a normalized float batch with probability ``prob``."""
    from .mixup import numpy_rng

    n, _, h, w = x.shape
    boxes = erase_boxes(n, h, w, prob, numpy_rng(generator))
    if not (boxes[:, 1] > boxes[:, 0]).any():  # host values: no device sync
        return x
    # The mask is built on the batch's device from the N boxes (a pinned non-blocking copy).
    dev = x.device
    b = to_device(torch.as_tensor(boxes), dev)
    ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None]) &
              (xs >= b[:, 2, None, None]) & (xs < b[:, 3, None, None])).unsqueeze(1)
    noise_gen = torch.Generator(device=x.device)
    noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    # drawn in the batch's own memory layout (channels_last in training), so the result keeps it:
    # torch.where takes its output layout from its operands, and an NCHW noise tensor made it NCHW
    noise = torch.empty_like(x).normal_(generator=noise_gen)
    return torch.where(inside, noise, x)
