"""Stage 2: the one augmentation stage every pipeline feeds (see docs/design.md).

Train: RandAugment (if ``aug.rand_augment``) -> normalize (uint8 -> float/bf16, channels_last)
-> random erasing (if ``aug.random_erasing``) -> mixup/CutMix (if an alpha > 0; otherwise
one-hot targets with label smoothing). The order is timm's: per-image transforms, then
normalization, then mixing in the training loop. Eval: normalize only, integer labels out.

Randomness: one CPU ``torch.Generator`` seeded with ``seed``; all per-sample choices are drawn
from it on the host, pixels are processed on the batch's device, so results are deterministic
given the seed and the same on CPU and CUDA up to float rounding. Because the choices are host
values, a call never reads the batch back: on CUDA it only queues kernels (no host sync), and
the number of kernels does not grow with the batch (``tests/test_host_syncs.py``). Under DDP pass a per-rank
seed (e.g. ``seed + rank``), or ranks draw the same augmentations for their batches.
"""
from __future__ import annotations

import dataclasses

import torch

from common.config import AugmentConfig
from pipelines.base import Batch

from .erasing import random_erasing
from .mixup import draw_mix_params, mix_targets, mixing_enabled, mixup_cutmix, smooth_one_hot
from .buffers import BufferPool
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from .policy import parse_rand_augment
from .randaugment import rand_augment_batch, resolve_backend


class Stage2:
    def __init__(self, aug: AugmentConfig, num_classes: int, label_smoothing: float, *, train: bool,
                 channels_last: bool = True, out_dtype: torch.dtype = torch.float32, seed: int = 0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "random", backend: str = "auto"):
        self.aug = aug
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.train = train
        self.channels_last = channels_last
        self.out_dtype = out_dtype
        self.mean, self.std = mean, std
        # Parse eagerly so a bad string fails at start-up, not at the first batch.
        self.policy = parse_rand_augment(aug.rand_augment, interpolation=interpolation) if aug.rand_augment else None
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.magnitude_scale = 1.0
        resolve_backend(backend, torch.device("cpu"))  # a bad name fails here, not at the first batch
        self.backend = backend  # 'auto': compiled CPU loops for CPU batches (numba), torch otherwise
        self.pool = BufferPool()  # CPU output batches recycled once unreferenced (buffers.py)

    def set_magnitude_scale(self, scale: float) -> None:
        """Progressive regularization (EfficientNetV2): scale RandAugment magnitude and the mixup /
        CutMix alphas; 1.0 is the recipe."""
        if scale < 0:
            raise ValueError(f"magnitude scale must be >= 0, got {scale}")
        self.magnitude_scale = float(scale)

    def _mix_config(self) -> AugmentConfig:
        s = self.magnitude_scale
        if s == 1.0:
            return self.aug
        return dataclasses.replace(self.aug, mixup_alpha=self.aug.mixup_alpha * s,
                                   cutmix_alpha=self.aug.cutmix_alpha * s)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.images
        if not self.train:
            return normalize(x, self.mean, self.std, self.out_dtype, self.channels_last,
                             backend=self.backend, pool=self.pool), batch.labels
        if self.policy is not None and self.magnitude_scale > 0:
            x = rand_augment_batch(x, self.policy.scaled(self.magnitude_scale), self.generator, self.backend,
                                   pool=self.pool)
        mix = self._mix_config()
        host = resolve_backend(self.backend, x.device) == "cpu-kernels"  # targets in numpy, else torch
        if mixing_enabled(mix) and self.aug.random_erasing <= 0:
            # Mixing right after normalization, in the same pass where the backend can fuse it.
            # The draws are the ones mixup_cutmix would make here, so results do not depend on it.
            params = draw_mix_params(x.shape, mix, self.generator)
            x = normalize(x, self.mean, self.std, self.out_dtype, self.channels_last, mix=params,
                          backend=self.backend, pool=self.pool)
            return x, mix_targets(batch.labels, params.lam, self.num_classes, self.label_smoothing, host=host)
        x = normalize(x, self.mean, self.std, self.out_dtype, self.channels_last, backend=self.backend,
                      pool=self.pool)
        if self.aug.random_erasing > 0:
            x = random_erasing(x, self.aug.random_erasing, self.generator)
        if mixing_enabled(mix):
            return mixup_cutmix(x, batch.labels, mix, self.generator, num_classes=self.num_classes,
                                label_smoothing=self.label_smoothing, inplace=True, host=host)  # x is ours
        return x, smooth_one_hot(batch.labels, self.num_classes, self.label_smoothing, host=host)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "magnitude_scale": self.magnitude_scale}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.magnitude_scale = float(state["magnitude_scale"])
