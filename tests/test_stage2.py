"""Stage2: the API every pipeline feeds (layout, dtype, targets, determinism, resume, scaling)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.config import AugmentConfig
from pipelines.augment import Stage2, normalize
from pipelines.base import Batch
from tests.helpers.photos import photo_crops

A3 = AugmentConfig(rand_augment="rand-m6-mstd0.5-inc1", mixup_alpha=0.1, cutmix_alpha=1.0)


@pytest.fixture(scope="module")
def batch():
    imgs = photo_crops(8, (64, 64), seed=2)
    x = torch.from_numpy(np.stack([np.array(i) for i in imgs])).permute(0, 3, 1, 2)  # channels_last view
    return Batch(x, torch.arange(8) % 5)


def test_normalize_matches_torchvision(batch):
    import torchvision.transforms.functional as F
    ref = F.normalize(batch.images.float() / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = normalize(batch.images)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    bf = normalize(batch.images, dtype=torch.bfloat16, channels_last=False)
    assert bf.dtype == torch.bfloat16 and bf.is_contiguous()
    torch.testing.assert_close(bf.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_normalize_layouts_non_square(layout, channels_last):
    """normalize views the NHWC output as rows of W * 3 values: a non-square image and both input
    layouts (loaders give NHWC, RandAugment returns NCHW) catch a wrong row shape or stride."""
    import torchvision.transforms.functional as F
    imgs = photo_crops(4, (48, 40), seed=5)  # w 48, h 40
    x = torch.from_numpy(np.stack([np.array(i) for i in imgs])).permute(0, 3, 1, 2)
    x = x.contiguous() if layout == "nchw" else x
    ref = F.normalize(x.float() / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = normalize(x, channels_last=channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.shape == (4, 3, 40, 48) and out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_output_contract(batch, dtype):
    s = Stage2(A3, 5, 0.1, train=True, out_dtype=dtype)
    x, t = s(batch)
    assert x.shape == batch.images.shape and x.dtype == dtype
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert t.shape == (8, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(8))


def test_eval_is_normalize_and_labels(batch):
    s = Stage2(A3, 5, 0.1, train=False)
    x, y = s(batch)
    assert torch.equal(x, normalize(batch.images)) and torch.equal(y, batch.labels)


def test_no_mixing_gives_smoothed_one_hot(batch):
    s = Stage2(AugmentConfig(), 5, 0.1, train=True)
    x, t = s(batch)
    assert torch.equal(x, normalize(batch.images))  # nothing enabled: normalization only
    expected = torch.full((8, 5), 0.02)
    expected[torch.arange(8), batch.labels] = 0.92
    torch.testing.assert_close(t, expected)


def test_deterministic_and_state_dict_resumes_exactly(batch):
    a, b = Stage2(A3, 5, 0.0, train=True, seed=7), Stage2(A3, 5, 0.0, train=True, seed=7)
    xa, ta = a(batch)
    xb, tb = b(batch)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    state = a.state_dict()
    first = a(batch)
    a.load_state_dict(state)
    again = a(batch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    other = Stage2(A3, 5, 0.0, train=True, seed=8)(batch)
    assert not torch.equal(other[0], xa)


def test_magnitude_scale(batch):
    s = Stage2(A3, 5, 0.0, train=True)
    s.set_magnitude_scale(0.0)  # no RandAugment magnitude, no mixing
    x, t = s(batch)
    assert torch.equal(x, normalize(batch.images))
    assert torch.equal(t, torch.nn.functional.one_hot(batch.labels, 5).float())
    s.set_magnitude_scale(0.5)
    assert s._mix_config().cutmix_alpha == 0.5 and s.state_dict()["magnitude_scale"] == 0.5
    with pytest.raises(ValueError):
        s.set_magnitude_scale(-1)


def test_random_erasing_optional(batch):
    aug = dataclasses.replace(AugmentConfig(), random_erasing=1.0)
    x, _ = Stage2(aug, 5, 0.0, train=True)(batch)
    changed = (x != normalize(batch.images)).any(1).float().mean((1, 2))  # erased area per image
    assert torch.all(changed > 0.01) and torch.all(changed < 0.40)


def test_bad_rand_augment_string_fails_at_construction():
    with pytest.raises(ValueError):
        Stage2(AugmentConfig(rand_augment="rand-q7"), 5, 0.0, train=True)


@pytest.mark.parametrize("interpolation", ["random", "bilinear", "bicubic"])
def test_rand_augment_resamples_with_the_train_interpolation_as_timm(interpolation):
    """timm's create_transform hands a fixed ``--train-interpolation`` to RandAugment's geometric ops
    (``hparams['interpolation']``) and leaves ``random`` to RandAugment's own random filter; the
    recipe's ``augment.train_interpolation`` reaches our policy the same way."""
    import timm.data
    from PIL import Image

    from common.config import DataConfig
    from pipelines.build import build_stage2

    aug = dataclasses.replace(A3, train_interpolation=interpolation)
    ours = build_stage2(DataConfig(num_classes=5), aug, train=True).policy.interpolation
    t = timm.data.create_transform(32, is_training=True, auto_augment=A3.rand_augment, interpolation=interpolation)
    (ra,) = [tr for tr in t.transforms if type(tr).__name__ == "RandAugment"]
    theirs = ra.ops[0].hparams.get("interpolation")
    names = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic", None: "random"}
    assert ours == names[theirs] == interpolation


def test_random_erasing_keeps_the_channels_last_layout(batch):
    """Stage 2's output is channels_last (the step's fast path) with random erasing on too."""
    aug = dataclasses.replace(A3, random_erasing=1.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    out, _ = Stage2(aug, 5, 0.0, train=True, channels_last=True, seed=0)(batch)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    erased = (out != Stage2(dataclasses.replace(aug, random_erasing=0.0), 5, 0.0, train=True, channels_last=True,
                            seed=0)(batch)[0])
    assert erased.any()
