"""The compiled CPU backend of stage 2 against the torch backend, and output-buffer recycling.

Each backend is checked against timm op by op in test_randaugment.py; here whole batches: the
same draws must give the same pixels (exact, except float rounding at a few resampled pixels),
normalize+mixup fused in one pass must equal normalize then ``apply_mix``, and a recycled output
buffer must never be one the caller can still see.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.config import AugmentConfig
from pipelines.augment import Stage2, apply_mix, normalize, parse_rand_augment, sample_mix_params, sample_params
from pipelines.augment import apply_params, cpu_kernels
from pipelines.augment.buffers import BufferPool
from pipelines.augment.randaugment import resolve_backend
from pipelines.base import Batch
from tests.helpers.photos import photo_crops

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba not installed")
A1 = AugmentConfig(rand_augment="rand-m7-mstd0.5-inc1", mixup_alpha=0.2, cutmix_alpha=1.0)


@pytest.fixture(scope="module")
def photos():
    imgs = photo_crops(8, (72, 56), seed=4)  # non-square: w 72, h 56
    return torch.from_numpy(np.stack([np.array(i) for i in imgs])).permute(0, 3, 1, 2)  # channels_last


@pytest.mark.parametrize("config", ["rand-m9-n3-mstd0.5-inc1", "rand-m10-n2-mstd1-p0.9", "rand-m6-n4-mstd0.5"])
def test_backends_give_the_same_batch(photos, config):
    policy = parse_rand_augment(config)  # random bilinear / bicubic
    for seed in range(4):
        params = sample_params(photos.shape[0], policy, torch.Generator().manual_seed(seed))
        a = apply_params(photos, params, policy, "torch")
        b = apply_params(photos, params, policy, "cpu-kernels")
        assert b.is_contiguous(memory_format=torch.channels_last) and b.dtype == torch.uint8
        diff = (a.int() - b.int()).abs()
        # Rotate's float32 sampling may round a value the other way; a later LUT op can carry it.
        assert float((diff > 0).float().mean()) < 2e-3 and float(diff.float().mean()) < 0.05, (seed, int(diff.max()))
    assert not torch.equal(b, photos)


def test_kernels_accept_nchw_input_and_leave_it_alone(photos):
    policy = parse_rand_augment("rand-m9-n3-mstd0.5-inc1")
    x = photos.contiguous()
    before = x.clone()
    params = sample_params(8, policy, torch.Generator().manual_seed(1))
    out = apply_params(x, params, policy, "cpu-kernels")
    assert torch.equal(x, before)
    assert torch.equal(out, apply_params(photos, params, policy, "cpu-kernels"))


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_fused_normalize_mix_equals_normalize_then_apply_mix(photos, mode, layout):
    x = photos if layout == "nhwc" else photos.contiguous()
    aug = dataclasses.replace(A1, mix_mode=mode, mix_prob=0.9)
    seen = set()
    for seed in range(10):
        p = sample_mix_params(8, 56, 72, aug, np.random.default_rng(seed))
        fused = normalize(x, mix=p, backend="cpu-kernels")
        ref = apply_mix(normalize(x, backend="torch"), p)
        assert fused.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        seen |= {"cut"} if p.cutmix.any() else set()
        seen |= {"mix"} if (~p.cutmix & (p.lam < 1)).any() else set()
    assert seen == {"cut", "mix"}
    torch.testing.assert_close(normalize(x, backend="cpu-kernels"), normalize(x, backend="torch"))


def test_stage2_backends_make_the_same_draws(photos):
    batch = Batch(photos, torch.arange(8) % 5)
    a = Stage2(A1, 5, 0.1, train=True, seed=3, backend="torch")
    b = Stage2(A1, 5, 0.1, train=True, seed=3, backend="cpu-kernels")
    for _ in range(3):
        (xa, ta), (xb, tb) = a(batch), b(batch)
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
        close = (xa - xb).abs() < 1e-4
        assert float(close.float().mean()) > 0.998


def test_backend_choice_and_errors(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "cpu-kernels" and resolve_backend("auto", cuda) == "torch"
    with pytest.raises(ValueError, match="needs a CPU batch"):
        resolve_backend("cpu-kernels", cuda)
    with pytest.raises(ValueError, match="one of"):
        Stage2(A1, 5, 0.1, train=True, backend="numba")
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    assert resolve_backend("auto", cpu) == "torch"  # no numba: the torch code, not an error
    with pytest.raises(ValueError, match="pip install numba"):
        resolve_backend("cpu-kernels", cpu)


# ----------------------------------------------------------------------------- buffer recycling
def test_pool_hands_out_only_unreferenced_buffers():
    pool = BufferPool()
    shape = (2, 3, 8, 8)
    a = pool.empty(shape, torch.float32)
    a_ptr = a.data_ptr()
    b = pool.empty(shape, torch.float32)
    assert b.data_ptr() != a_ptr  # a is still held
    del a
    c = pool.empty(shape, torch.float32)
    assert c.data_ptr() == a_ptr and pool.reused == 1
    view = c[1:]  # a view keeps the storage alive: no reuse while it exists
    del c
    d = pool.empty(shape, torch.float32)
    assert d.data_ptr() != a_ptr
    del view, b, d
    # autograd keeps a conv's input for the weight gradient: not reusable until backward frees it
    conv = torch.nn.Conv2d(3, 1, 1)
    e = pool.empty(shape, torch.float32).normal_()
    e_ptr = e.data_ptr()
    loss = conv(e).sum()
    del e
    assert pool.empty(shape, torch.float32).data_ptr() != e_ptr
    loss.backward()
    del loss
    assert pool.empty(shape, torch.float32).data_ptr() == e_ptr


def test_stage2_never_overwrites_a_batch_the_caller_holds(photos):
    batch = Batch(photos, torch.arange(8) % 5)
    s2 = Stage2(A1, 5, 0.1, train=True, seed=0)
    held = []
    for _ in range(4):
        x, _ = s2(batch)
        held.append((x, x.clone()))
    for x, copy in held:
        assert torch.equal(x, copy)
    assert len({x.data_ptr() for x, _ in held}) == 4
    del held, x
    for _ in range(3):
        s2(batch)  # results dropped at once, as a training loop does
    assert s2.pool.reused >= 2
