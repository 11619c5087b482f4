"""ReferencePipeline: class-folder input, timm's eval transform, determinism, resume, sharding."""
from __future__ import annotations

import gc
import json
import math

import numpy as np
import pytest
import torch
from timm.data import create_transform

from pipelines.base import DataError, Pipeline
from pipelines.reference import ReferencePipeline, random_resized_crop_params
from tests.helpers.photos import photo_crops


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for split in ("train", "val"):
        for i, img in enumerate(photo_crops(10, (96, 80), seed=4)):
            d = root / split / f"class_{'bca'[i % 3]}"
            d.mkdir(parents=True, exist_ok=True)
            img.save(d / f"{i:03d}.png")
    return root


def _all(p):
    return [(b.images.clone(), b.labels.clone()) for b in p]


def test_train_batches_contract(tree):
    p = ReferencePipeline(str(tree), "train", batch_size=4, res=32, workers=0)
    assert isinstance(p, Pipeline)
    assert p.num_classes == 3 and p.num_samples == 10 and len(p) == 2  # drop_last
    batches = _all(p)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
        assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    p.set_epoch(1, res=48)
    assert _all(p)[0][0].shape == (4, 3, 48, 48)


def test_eval_equals_timm_eval_transform(tree):
    res, crop_pct = 40, 0.9
    p = ReferencePipeline(str(tree), "val", batch_size=3, res=res, crop_pct=crop_pct, workers=0)
    assert len(p) == 4  # 10 images, last batch kept
    tf = create_transform(res, is_training=False, crop_pct=crop_pct, interpolation="bicubic", use_prefetcher=True)
    got = torch.cat([x for x, _ in _all(p)])
    labels = torch.cat([y for _, y in _all(p)])
    from PIL import Image
    for i, (path, label) in enumerate(p.dataset.samples):  # ImageFolder order: sorted class folders
        ref = tf(Image.open(path).convert("RGB"))  # uint8 CHW, no normalization
        assert torch.equal(got[i], ref), i
        assert labels[i] == label
    assert p.classes == ["class_a", "class_b", "class_c"]
    assert math.floor(res / crop_pct) == 44  # timm's scale_size


def test_deterministic_independent_of_workers_and_resumes(tree):
    a = ReferencePipeline(str(tree), "train", batch_size=2, res=32, workers=0, seed=3)
    b = ReferencePipeline(str(tree), "train", batch_size=2, res=32, workers=2, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    ra, rb = _all(a), _all(b)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(ra, rb))
    a.set_epoch(3)
    assert not torch.equal(_all(a)[0][0], ra[0][0])  # a new epoch draws new crops
    fresh = ReferencePipeline(str(tree), "train", batch_size=2, res=32, workers=2, seed=3)
    for p in (a, b, fresh):  # in-process; workers' later pass; a resumed process's first pass
        p.set_epoch(2, start_batch=3)
        resumed = _all(p)
        assert len(resumed) == len(ra) - 3
        assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(resumed, ra[3:]))
    a.skip_batches(4)
    assert len(_all(a)) == len(ra) - 4
    assert len(_all(a)) == len(ra)  # a skip applies to one epoch only


def test_repeats_get_different_crops_and_ranks_partition(tree):
    p = ReferencePipeline(str(tree), "train", batch_size=1, res=24, workers=0, repeats=3, drop_last=False)
    idx = p.sampler.indices()
    assert len(p) == len(idx)  # N < 256: ceil(N / world)
    seen = {}
    for (x, _), i in zip(_all(p), idx):
        if int(i) in seen:
            assert not torch.equal(seen[int(i)], x)  # a repeat is a different augmentation
        seen[int(i)] = x
    r0 = ReferencePipeline(str(tree), "val", batch_size=4, res=24, workers=0, rank=0, world_size=2)
    r1 = ReferencePipeline(str(tree), "val", batch_size=4, res=24, workers=0, rank=1, world_size=2)
    assert sorted(r0.sampler.indices().tolist() + r1.sampler.indices().tolist()) == list(range(10))


def test_manifest_source_and_missing_tree(tree, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"source": str(tree)}))
    p = ReferencePipeline(str(tmp_path), "val", batch_size=4, res=24, workers=0)
    assert p.num_samples == 10
    with pytest.raises(DataError):
        ReferencePipeline(str(tmp_path / "nowhere"), "train", batch_size=4, res=24)


def test_random_resized_crop_params_follow_timm_ranges():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(120, 80, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= 80 - h and 0 <= left <= 120 - w
        assert 0.08 * 9600 * 0.8 <= h * w <= 9600
    # Impossible ratio falls back to a centre crop clamped to the allowed ratio.
    assert random_resized_crop_params(300, 50, (0.99, 1.0), (1.0, 1.0), rng) == (0, 125, 50, 50)


def test_a_dropped_pipeline_ends_its_workers_at_once(tree):
    """Its persistent workers are shut down when the last reference goes, not when (and in whatever
    order) the cycle collector gets to it, which leaves each worker to a 5-s join timeout."""
    p = ReferencePipeline(str(tree), "train", batch_size=2, res=32, workers=2, seed=3)
    it = iter(p)
    next(it)
    it.close()
    workers = list(p._dataloader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    gc.disable()  # reference counting alone must do it
    try:
        del p
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()


def test_persistent_workers_follow_a_resolution_change(tree):
    """Progressive resolution: the same workers serve every epoch, each at that epoch's size, with
    the crops a new in-process pipeline draws at that size."""
    p = ReferencePipeline(str(tree), "train", batch_size=2, res=24, workers=2, seed=3)
    q = ReferencePipeline(str(tree), "train", batch_size=2, res=24, workers=0, seed=3)
    for epoch, res in ((0, 24), (1, 40), (2, 32)):
        p.set_epoch(epoch, res)
        q.set_epoch(epoch, res)
        got, want = _all(p), _all(q)
        assert {x.shape[-1] for x, _ in got} == {res}, epoch
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want)), epoch

