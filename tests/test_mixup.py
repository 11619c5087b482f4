"""Batched mixup/CutMix against timm ``timm.data.Mixup`` as the oracle."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from timm.data import Mixup
from timm.data.mixup import mixup_target

from common.config import AugmentConfig
from pipelines.augment import apply_mix, mix_targets, mixup_cutmix, sample_mix_params

A3 = AugmentConfig(mixup_alpha=0.1, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, mix_mode="batch")
H, W = 56, 48  # not square, not a power of two: box clipping and rounding show up


def _timm(aug: AugmentConfig, smoothing=0.0, classes=10):
    return Mixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha, prob=aug.mix_prob,
                 switch_prob=aug.switch_prob, mode=aug.mix_mode, label_smoothing=smoothing, num_classes=classes)


def _timm_lams(aug: AugmentConfig, draws: int, n: int) -> np.ndarray:
    """timm's corrected lambdas per sample over many calls (images are irrelevant, only shapes)."""
    np.random.seed(0)
    mix = _timm(aug)
    x = torch.zeros(n, 1, H, W)
    out = []
    for _ in range(draws):
        if aug.mix_mode == "batch":
            out.append(np.full(n, mix._mix_batch(x)))
        elif aug.mix_mode == "pair":
            out.append(mix._mix_pair(x).numpy().ravel())
        else:
            out.append(mix._mix_elem(x).numpy().ravel())
    return np.concatenate(out).astype(np.float64)


def _our_lams(aug: AugmentConfig, draws: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([sample_mix_params(n, H, W, aug, rng).lam for _ in range(draws)])


@pytest.mark.parametrize("aug", [
    A3,
    dataclasses.replace(A3, mixup_alpha=0.2),  # A1
    dataclasses.replace(A3, mixup_alpha=0.0),  # CutMix only: lam = 1 - box area
    dataclasses.replace(A3, cutmix_alpha=0.0, mixup_alpha=0.8),  # mixup only
    dataclasses.replace(A3, mix_prob=0.6, switch_prob=0.3),
    dataclasses.replace(A3, mix_mode="elem"),
    dataclasses.replace(A3, mix_mode="pair", mix_prob=0.8),
], ids=["a3", "a1", "cutmix", "mixup", "prob0.6", "elem", "pair"])
def test_lambda_distribution_matches_timm(aug):
    n = 1 if aug.mix_mode == "batch" else 8
    draws = 4000 if aug.mix_mode == "batch" else 500
    ours, ref = _our_lams(aug, draws, n), _timm_lams(aug, draws, n)
    # Unmixed fraction (mix_prob), then the lambda distribution itself (incl. box-area correction).
    # "Unmixed" is lam within 1e-6 of 1: timm's elem/pair modes keep lam in float32, where a
    # Beta(0.1, 0.1) draw of 0.99999998 is already 1.0.
    assert abs(np.mean(ours > 1 - 1e-6) - np.mean(ref > 1 - 1e-6)) < 0.03
    assert ks_2samp(ours, ref).pvalue > 1e-3
    assert abs(ours.mean() - ref.mean()) < 0.02


def test_cutmix_box_areas_match_timm_and_lambda_is_corrected():
    aug = dataclasses.replace(A3, mixup_alpha=0.0, mix_mode="elem")
    rng = np.random.default_rng(1)
    p = sample_mix_params(4000, H, W, aug, rng)
    area = (p.boxes[:, 1] - p.boxes[:, 0]) * (p.boxes[:, 3] - p.boxes[:, 2]) / (H * W)
    np.testing.assert_allclose(p.lam, 1.0 - area)  # corrected for clipping at the border
    assert np.all(p.boxes[:, [0, 2]] >= 0) and np.all(p.boxes[:, 1] <= H) and np.all(p.boxes[:, 3] <= W)
    ref_area = 1.0 - _timm_lams(aug, 500, 8)
    assert ks_2samp(area, ref_area).pvalue > 1e-3


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_pixels_and_targets_equal_timm_for_the_same_draw(mode):
    torch.manual_seed(0)
    n, classes, smoothing = 8, 10, 0.1
    x = torch.randn(n, 3, H, W).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (n,))
    aug = dataclasses.replace(A3, mix_mode=mode, mix_prob=0.9)
    seen = set()
    for seed in range(12):
        p = sample_mix_params(n, H, W, aug, np.random.default_rng(seed))
        out = apply_mix(x, p)
        # Oracle: timm's own per-sample operations with our drawn parameters.
        ref = x.clone()
        for i in range(n):
            j = n - 1 - i
            if p.cutmix[i]:
                yl, yh, xl, xh = p.boxes[i]
                ref[i][:, yl:yh, xl:xh] = x[j][:, yl:yh, xl:xh]
                seen.add("cut")
            elif p.lam[i] != 1.0:
                ref[i] = x[i] * p.lam[i] + x[j] * (1 - p.lam[i])
                seen.add("mix")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if mode == "pair":  # partners share the draw
            assert np.array_equal(p.lam, p.lam[::-1]) and np.array_equal(p.boxes, p.boxes[::-1])
        t = mix_targets(y, p.lam, classes, smoothing)
        lam_t = torch.tensor(p.lam, dtype=torch.float32).view(-1, 1)
        torch.testing.assert_close(t, mixup_target(y, classes, lam_t, smoothing))
        torch.testing.assert_close(t.sum(1), torch.ones(n))
    assert seen == {"cut", "mix"}


def test_mixup_cutmix_end_to_end():
    n, classes = 16, 1000
    x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, classes, (n,))
    g = torch.Generator().manual_seed(0)
    for mode in ("batch", "pair", "elem"):
        xo, t = mixup_cutmix(x, y, dataclasses.replace(A3, mix_mode=mode), g, num_classes=classes,
                             label_smoothing=0.1)
        assert xo.shape == x.shape and t.shape == (n, classes) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(n))
        assert float(t.min()) >= 0.1 / classes - 1e-7  # smoothing floor
    with pytest.raises(ValueError):
        mixup_cutmix(x[:3], y[:3], A3, g, num_classes=classes)
    # Same seed, same result; the input is untouched unless inplace=True.
    x0 = x.clone()
    a = mixup_cutmix(x, y, A3, torch.Generator().manual_seed(5), num_classes=classes)
    b = mixup_cutmix(x, y, A3, torch.Generator().manual_seed(5), num_classes=classes)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(x, x0)
