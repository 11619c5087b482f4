"""Reference stage 1: PIL decode + torchvision-style crops in a ``DataLoader`` (CPU fallback).

The yardstick the fast backends (FFCV, DALI) are checked against, so its transforms are
timm's, from ``timm/data/transforms_factory.py`` and ``timm/data/transforms.py``:

* train: ``RandomResizedCropAndInterpolation(res, scale, ratio, interpolation='random')``
  (timm train.py's ``--train-interpolation`` default: bilinear or bicubic at random per image),
  then horizontal flip with probability ``hflip``;
* eval: resize the shorter side to ``floor(res / crop_pct)`` (bicubic, the ResNet pretrained
  configs' interpolation), then centre-crop ``res``.

Images are decoded with ``Image.open(p).convert('RGB')`` (EXIF orientation ignored, as ImageNet
practice). Output: :class:`pipelines.base.Batch` of uint8 [N, 3, res, res] in channels_last
memory and int64 labels, on ``device``; stage 2 does the rest.

Determinism: each sample's randomness comes from its own generator seeded by
``(seed, epoch, rank, position in this rank's epoch)``, so results do not depend on worker count
or timing, repeated copies of an image get different crops, and a resumed run
(``set_epoch(epoch, start_batch=k)`` or ``skip_batches(k)``) continues exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode

from .base import Batch, DataError
from .sampler import ShardSampler

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """``root/<split>``, or ``<source>/<split>`` where ``root/manifest.json`` names a ``source`` tree."""
    root = Path(root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text()).get("source")
        if source:
            src = Path(source)
            root = src if src.is_absolute() else root / src
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"no class-folder tree at {split_dir} (expected {split_dir}/<class>/<image>)")
    return split_dir


def bare_class_folder(root: str | Path) -> Path | None:
    """``root`` when it is itself a class-folder directory (``root/<class>/<image>``, e.g. an
    ImageNet-V2 download) rather than a data root (``manifest.json`` or ``val/``), else None."""
    root = Path(root)
    return None if (root / "manifest.json").is_file() or (root / "val").is_dir() else root


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: np.random.Generator):
    """(top, left, h, w) as timm's ``RandomResizedCropAndInterpolation.get_params``: 10 tries at a
    random area and log-uniform aspect ratio, else a centre crop at the nearest allowed ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Folder(torch.utils.data.Dataset):
    """Items are addressed by ``(index, key)``: key seeds the sample's own generator (train)."""

    def __init__(self, samples, train: bool, res: int, crop_pct: float, scale, ratio, hflip: float,
                 interpolation: str):
        self.samples = samples
        self.train = train
        self.res = res
        self.crop_pct = crop_pct
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation = interpolation

    def __len__(self):
        return len(self.samples)

    def transform(self, img: Image.Image, rng: np.random.Generator | None) -> Image.Image:
        if not self.train:
            img = TF.resize(img, math.floor(self.res / self.crop_pct), InterpolationMode.BICUBIC)
            return TF.center_crop(img, [self.res, self.res])
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
        name = self.interpolation
        if name == "random":
            name = "bilinear" if rng.random() < 0.5 else "bicubic"
        img = TF.resized_crop(img, top, left, h, w, [self.res, self.res], INTERPOLATIONS[name])
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __getitem__(self, item):
        index, key = item
        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        rng = np.random.default_rng(key) if self.train else None
        return np.asarray(self.transform(img, rng)), label


def _collate(items):
    images = torch.from_numpy(np.stack([a for a, _ in items]))  # [N, H, W, 3]
    labels = torch.tensor([b for _, b in items], dtype=torch.int64)
    return images.permute(0, 3, 1, 2), labels  # NCHW view of NHWC memory: channels_last


class ReferencePipeline:
    """torchvision/PIL ``DataLoader`` pipeline over a class-folder tree; implements ``Pipeline``."""

    def __init__(self, root: str, split: str, *, batch_size: int, res: int, crop_pct: float = 0.875,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, workers: int = 2,
                 device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0, repeats: int = 0,
                 drop_last: bool | None = None, interpolation: str = "random", split_dir: str | Path | None = None,
                 class_index_folders: bool = False):
        """``split_dir``: read this class-folder directory instead of ``root/<split>`` (e.g. an
        ImageNet-V2 download). ``class_index_folders``: folder names are class indices ("0".."999",
        ImageNet-V2's layout), so label = int(name), not the position in sorted name order (where
        "10" would sort before "2")."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if interpolation not in ("random", *INTERPOLATIONS):
            raise ValueError(f"interpolation must be random, bilinear or bicubic, got {interpolation!r}")
        self.train = split == "train"
        if split_dir is not None:
            split_dir = Path(split_dir)
            if not split_dir.is_dir():
                raise DataError(f"no class-folder tree at {split_dir} (expected {split_dir}/<class>/<image>)")
        else:
            split_dir = resolve_split_dir(root, split)
        self.classes, class_to_idx = find_classes(str(split_dir))
        if class_index_folders:
            bad = [c for c in self.classes if not c.isdigit()]
            if bad:
                raise DataError(f"class-index folders expected (0, 1, ... as in ImageNet-V2) but {split_dir} has "
                                f"folder {bad[0]!r}; drop the class-index option for named class folders")
            class_to_idx = {c: int(c) for c in self.classes}
            self.classes = [str(i) for i in range(max(class_to_idx.values()) + 1)]
        try:  # ImageNet-V2-style trees may hold a class with no image: allowed there, an error elsewhere
            samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS,
                                   allow_empty=class_index_folders)
        except FileNotFoundError as e:
            raise DataError(f"{split_dir}: {str(e).splitlines()[0]}") from None
        if not samples:
            raise DataError(f"no images under {split_dir}")
        self.num_classes = len(self.classes)
        self.num_samples = len(samples)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.workers = workers
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.drop_last = self.train if drop_last is None else drop_last
        self.dataset = _Folder(samples, self.train, res, crop_pct, scale, ratio, hflip, interpolation)
        # Eval visits every image once in file order (padded to equal length across ranks).
        self.sampler = ShardSampler(self.num_samples, seed=seed, rank=rank, world_size=world_size,
                                    repeats=repeats if self.train else 0, shuffle=self.train)
        self.epoch = 0
        self.start_batch = 0

    @property
    def res(self) -> int:
        return self.dataset.res

    def set_epoch(self, epoch: int, res: int | None = None, *, start_batch: int = 0) -> None:
        self.epoch = epoch
        if res is not None:
            self.dataset.res = res
        self.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def skip_batches(self, n: int) -> None:
        """Start the coming epoch at batch ``n`` (resume mid-epoch)."""
        self.start_batch = n

    def _indices(self):
        # val: every sample exactly once across ranks (no DistributedSampler-style padding), so
        # metrics summed over ranks count each image once
        if self.train:
            return self.sampler.indices()
        from ._stage1_common import val_indices
        return val_indices(self.num_samples, self.rank, self.world_size)

    def _batches(self) -> list[list[tuple[int, tuple[int, ...]]]]:
        idx = self._indices()
        keys = [(self.seed, self.epoch, self.rank, pos) for pos in range(len(idx))]
        items = list(zip(idx.tolist(), keys))
        n = len(items) // self.batch_size if self.drop_last else math.ceil(len(items) / self.batch_size)
        return [items[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.start_batch, n)]

    def __len__(self) -> int:
        n = len(self.sampler) if self.train else len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self._batches(), num_workers=self.workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda")
        self.start_batch = 0  # a skip applies to one epoch only
        for images, labels in loader:
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
