"""Mixup and CutMix on a batch, with soft targets: timm ``Mixup`` semantics, batched.

Mixup: Zhang et al. 2018 (https://arxiv.org/abs/1710.09412); CutMix: Yun et al. 2019
(https://arxiv.org/abs/1905.04899); conventions from timm ``timm/data/mixup.py``:

* every sample i is mixed with sample N-1-i (the batch flipped);
* with probability ``mix_prob`` a mix happens; when both alphas are > 0, CutMix is chosen with
  probability ``switch_prob``; lambda ~ Beta(alpha, alpha) of the chosen method;
* CutMix's box has area (1 - lambda) of the image, centred uniformly, clipped at the border;
  lambda is then corrected to the kept area (timm ``correct_lam=True``);
* modes: ``batch`` one draw for the batch, ``pair`` one draw per pair (i, N-1-i), ``elem`` one
  per sample;
* targets: one-hot smoothed to ``1 - s + s/C`` / ``s/C``, mixed with the same lambda.

Parameters are drawn on the host (numpy, seeded from a CPU torch generator, so the generator's
state is the whole RNG state); the pixel work is a few elementwise ops on the batch's device.
Only the draws travel to the device (N values and N boxes, a pinned non-blocking copy); masks and
targets are built there, so nothing here makes the host wait for a CUDA device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.config import AugmentConfig

from .transfer import to_device


@dataclass
class MixParams:
    lam: np.ndarray  # float64 [N]: weight of the sample itself (1.0 = unmixed), box-corrected
    cutmix: np.ndarray  # bool [N]
    boxes: np.ndarray  # int64 [N, 4]: (y_lo, y_hi, x_lo, x_hi), empty where not CutMix


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator derived from (and advancing) a CPU torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed)


def mixing_enabled(aug: AugmentConfig) -> bool:
    return aug.mixup_alpha > 0 or aug.cutmix_alpha > 0


def _draw(m: int, h: int, w: int, aug: AugmentConfig, rng: np.random.Generator) -> MixParams:
    if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
        cut = rng.random(m) < aug.switch_prob
    else:
        cut = np.full(m, aug.cutmix_alpha > 0)
    lam = np.ones(m)
    if aug.cutmix_alpha > 0:
        lam = np.where(cut, rng.beta(aug.cutmix_alpha, aug.cutmix_alpha, m), lam)
    if aug.mixup_alpha > 0:
        lam = np.where(cut, lam, rng.beta(aug.mixup_alpha, aug.mixup_alpha, m))
    active = rng.random(m) < aug.mix_prob
    lam = np.where(active, lam, 1.0)
    cut &= active
    # CutMix box of side ratio sqrt(1 - lam), centre uniform over the image, clipped.
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = (h * ratio).astype(np.int64), (w * ratio).astype(np.int64)
    cy, cx = rng.integers(0, h, m), rng.integers(0, w, m)
    boxes = np.stack([np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h),
                      np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)], axis=1)
    boxes[~cut] = 0
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    lam = np.where(cut, 1.0 - area / float(h * w), lam)  # correct lam for the clipped box
    return MixParams(lam, cut, boxes)


def sample_mix_params(n: int, h: int, w: int, aug: AugmentConfig, rng: np.random.Generator) -> MixParams:
    """Draw per-sample mixing parameters for a batch of n images of h x w."""
    if aug.mix_mode == "batch":
        p = _draw(1, h, w, aug, rng)
        return MixParams(np.repeat(p.lam, n), np.repeat(p.cutmix, n), np.repeat(p.boxes, n, axis=0))
    if aug.mix_mode == "pair":
        p = _draw(n // 2, h, w, aug, rng)
        # sample N-1-i shares pair i's draw (and, for CutMix, its box)
        return MixParams(np.concatenate([p.lam, p.lam[::-1]]), np.concatenate([p.cutmix, p.cutmix[::-1]]),
                         np.concatenate([p.boxes, p.boxes[::-1]]))
    if aug.mix_mode == "elem":
        return _draw(n, h, w, aug, rng)
    raise ValueError(f"mix_mode must be batch, pair or elem, got {aug.mix_mode!r}")


def apply_mix(x: torch.Tensor, params: MixParams, *, inplace: bool = False) -> torch.Tensor:
    """Mix images with the flipped batch: mixup blends, CutMix pastes the partner's box.
    ``inplace=True`` overwrites ``x`` (as timm does), saving a copy of the batch."""
    n, _, h, w = x.shape
    if not params.cutmix.any() and np.all(params.lam == 1.0):
        return x
    if _is_batch_wide(params):
        # One draw for the whole batch (timm's default 'batch' mode): no per-pixel weights.
        out = x if inplace else x.clone()
        if params.cutmix[0]:
            y0, y1, x0, x1 = (int(v) for v in params.boxes[0])
            out[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)  # flip() copies: safe in place
        else:
            _mix_pairs_(out, float(1.0 - params.lam[0]))
        return out
    # Per-pixel weight of the sample itself: lam for mixup, 0 inside / 1 outside a CutMix box,
    # built on the batch's device from the N draws (not copied over as an N x H x W mask).
    dev = x.device
    lam = to_device(torch.as_tensor(np.where(params.cutmix, 1.0, params.lam), dtype=torch.float32), dev)
    b = to_device(torch.as_tensor(params.boxes), dev)
    ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None]) &
              (xs >= b[:, 2, None, None]) & (xs < b[:, 3, None, None]))
    weight = torch.where(inside, 0.0, lam.view(n, 1, 1)).unsqueeze(1).to(x.dtype)  # [N, 1, H, W]
    # lerp is exact at weight 0 and 1, so CutMix copies pixels untouched.
    return torch.lerp(x.flip(0), x, weight)


def _mix_pairs_(x: torch.Tensor, w: float) -> None:
    """In place, x[i] += w * (x[N-1-i] - x[i]) for every i: mixup with the flipped batch.

    Works on the two halves (sample i < N/2 pairs with N-1-i in the other half), so the only
    temporaries are half-batch differences. ``lerp_(x.flip(0))`` needs a full copy of the batch,
    and on CPU a fresh 38 MB buffer (a 64x3x224x224 float batch) costs more in page faults
    than the arithmetic."""
    half = x.shape[0] // 2
    top, bottom = x[:half], x[half:]
    diff = top.flip(0).sub_(bottom)  # diff[j] = partner(bottom[j]) - bottom[j]
    bottom.add_(diff, alpha=w)
    top.sub_(diff.flip(0), alpha=w)  # partner(top[i]) - top[i] = -diff[half-1-i]


def _is_batch_wide(p: MixParams) -> bool:
    return bool(np.all(p.lam == p.lam[0]) and np.all(p.cutmix == p.cutmix[0]) and np.all(p.boxes == p.boxes[0]))


# Targets of CPU labels are built in numpy with the same float32 arithmetic when stage 2 runs its
# compiled CPU kernels (``host=True``): torch's CPU ops on these N x C values (64k for ImageNet)
# start OpenMP parallel regions, whose threads then spin for milliseconds on the cores stage 2's
# compiled kernels use next (measured, see cpu_kernels.copy_into). ``host=False`` is the torch
# path a CUDA batch takes (reading device labels into numpy would be a host sync).

def _on_host(y: torch.Tensor, host: bool | None) -> bool:
    return y.device.type == "cpu" if host is None else host


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float, *, host: bool | None = None) -> torch.Tensor:
    off = smoothing / num_classes
    if _on_host(y, host):
        t = np.full((y.shape[0], num_classes), off, np.float32)
        t[np.arange(y.shape[0]), y.long().numpy()] = 1.0 - smoothing + off
        return torch.from_numpy(t)
    t = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    return t.scatter_(1, y.long().view(-1, 1), 1.0 - smoothing + off)


def mix_targets(y: torch.Tensor, lam: np.ndarray, num_classes: int, smoothing: float, *,
                host: bool | None = None) -> torch.Tensor:
    t = smooth_one_hot(y, num_classes, smoothing, host=host)
    if _on_host(y, host):
        tn, lam_n = t.numpy(), np.asarray(lam, np.float32).reshape(-1, 1)
        return torch.from_numpy(tn * lam_n + tn[::-1] * (np.float32(1.0) - lam_n))
    lam_t = to_device(torch.as_tensor(lam, dtype=torch.float32), y.device).view(-1, 1)
    return t * lam_t + t.flip(0) * (1.0 - lam_t)


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, aug: AugmentConfig, generator: torch.Generator, *,
                 num_classes: int, label_smoothing: float = 0.0, inplace: bool = False,
                 host: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a float batch ``x`` [N, C, H, W] and int labels ``y`` [N]; returns (images, soft targets
    float32 [N, num_classes]). ``generator`` is a CPU torch generator. N must be even (as timm).
    ``inplace=True`` may overwrite ``x``; ``host`` as for ``mix_targets``."""
    params = draw_mix_params(x.shape, aug, generator)
    return apply_mix(x, params, inplace=inplace), mix_targets(y, params.lam, num_classes, label_smoothing, host=host)


def draw_mix_params(shape, aug: AugmentConfig, generator: torch.Generator) -> MixParams:
    """The draws ``mixup_cutmix`` makes for a batch of ``shape`` [N, C, H, W] (N even, as timm)."""
    if shape[0] % 2:
        raise ValueError(f"mixup/CutMix needs an even batch size, got {shape[0]}")
    return sample_mix_params(shape[0], shape[-2], shape[-1], aug, numpy_rng(generator))
