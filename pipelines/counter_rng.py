"""Counter-based random numbers: a uniform draw is a pure function of (key, sample, slot, draw).

Why: FFCV decodes a batch on a pool of threads, and its augmentations draw from numba's per-thread
generators, which FFCV does not let a user seed (FFCV issues #164 and #392 ask for it): which thread
decodes which image changes from run to run, so crops and flips were random per run, and a resumed
run could not repeat the crops of an uninterrupted one. A counter-based generator has no state to
share or seed per thread: the numbers for an image depend only on the run's seed, the epoch, the
rank, the image and its place in the batch, so they are the same for any thread count, order of
execution, or resume (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", use the
same idea with Philox; here the mixing function is SplitMix64's finaliser, Steele, Lea and Flood
2014, "Fast splittable pseudorandom number generators", which passes BigCrush on a counter).

Every function is numba-compiled (``nopython``) so FFCV's compiled decode calls it, and plain
Python can call it too (tests compare its crops with torchvision's sampler).
"""
from __future__ import annotations

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio, SplitMix64's increment
M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # SplitMix64's multipliers
S30, S27, S31, S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
TWO_M53 = 1.0 / 9007199254740992.0  # 2^-53: 53 random bits -> a double in [0, 1)


@numba.njit(cache=True, nogil=True)
def mix64(z):
    """SplitMix64's finaliser: a bijection of 64-bit words that scatters every input bit."""
    z = np.uint64(z)
    z = (z ^ (z >> S30)) * M1
    z = (z ^ (z >> S27)) * M2
    return z ^ (z >> S31)


@numba.njit(cache=True, nogil=True)
def stream_key(seed, epoch, rank):
    """The key of one rank's epoch: a new stream per (seed, epoch, rank)."""
    z = mix64(np.uint64(seed) * GOLDEN + np.uint64(1))
    z = mix64(z ^ (np.uint64(epoch) * GOLDEN + np.uint64(2)))
    return mix64(z ^ (np.uint64(rank) * GOLDEN + np.uint64(3)))


@numba.njit(cache=True, nogil=True)
def uniform(key, sample, slot, draw):
    """A double in [0, 1) for draw number ``draw`` of ``sample`` (its dataset index) at ``slot``
    (its place in the batch: two copies of one image in a rank's epoch, as repeated augmentation
    gives when ranks are fewer than repeats, are at different places, so they get other numbers)."""
    z = mix64(np.uint64(key) ^ (np.uint64(sample) * GOLDEN))
    z = mix64(z ^ (np.uint64(slot) * M2 + np.uint64(draw)))
    return np.float64(z >> S11) * TWO_M53


@numba.njit(cache=True, nogil=True)
def random_resized_crop(height, width, scale, ratio, key, sample, slot):
    """torchvision's ``RandomResizedCrop.get_params`` (timm's ``RandomResizedCropAndInterpolation``
    draws the same way): up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``, the offset uniform over the positions that fit, else the centre crop
    clipped to ``ratio``; draws 0..39 of (key, sample, slot). Returns (top, left, h, w)."""
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height) * np.float64(width)
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for attempt in range(10):
        d = 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, sample, slot, d))
        aspect = np.exp(log_lo + (log_hi - log_lo) * uniform(key, sample, slot, d + 1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, sample, slot, d + 2) * (height - h + 1))
            left = int(uniform(key, sample, slot, d + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio[0], ratio[1]):
        w = width
        h = int(round(w / min(ratio[0], ratio[1])))
    elif in_ratio > max(ratio[0], ratio[1]):
        h = height
        w = int(round(h * max(ratio[0], ratio[1])))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


DRAW_CUBIC, DRAW_FLIP = 40, 41  # the draws after the crop's: the random filter's coin, the flip's coin
