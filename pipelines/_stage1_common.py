"""Helpers shared by the FFCV and DALI stage-1 pipelines: the converted data root, which indices a
rank visits, and the batch bookkeeping both backends must agree on.

Kept backend-free (numpy/torch only) so it imports without ffcv or DALI. The index semantics come
from :mod:`pipelines.sampler` (the one sampler every backend uses, docs/design.md); this module only adds
the two rules the pipelines layer on top:

* train: drop the last partial batch (``len = indices // batch_size``), as timm and torch loaders
  do with ``drop_last=True``; resuming mid-epoch skips whole batches of *indices* (nothing decoded).
* val: every sample exactly once across ranks, no padding duplicates (``DistributedSampler`` pads,
  which would count a few images twice in top-1), so rank ``r`` takes ``r, r + world, ...`` and
  ranks may differ by one sample; the last partial batch is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import EVAL_INTERPOLATIONS, TRAIN_INTERPOLATIONS
from pipelines.base import DataError
from pipelines.dataroot import load_manifest
from pipelines.sampler import ShardSampler

def convert_hint(root: Path, fmt: str) -> str:
    """What to run. A ``data.root`` that holds ``train/`` or ``val/`` image folders is the converter's
    source, not its output: the destination named is beside it, never inside it."""
    root = Path(root)
    if (root / "train").is_dir() or (root / "val").is_dir():
        out = root.parent / f"{root.name}_converted"
        return (f"{root} is an image tree, not converted data: run python tools/convert_imagenet.py {root} {out} "
                f"--formats {fmt}, then set data.root={out}")
    return f"run the converter first: python tools/convert_imagenet.py SRC {root} --formats {fmt}"


@dataclass(frozen=True)
class SplitInfo:
    """What the manifest says about one split of one converted format."""

    root: Path
    split: str
    num_samples: int
    num_classes: int
    classes: tuple[str, ...]
    entry: dict  # the split's raw manifest entry (DALI reads its "shards" list)


# timm's train interpolations (``augment.train_interpolation``), as the compiled resizes take them.
INTERPOLATION_CODES = {name: code for code, name in enumerate(TRAIN_INTERPOLATIONS)}


def check_interpolation(name: str) -> None:
    if name not in INTERPOLATION_CODES:
        raise ValueError(f"interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, got {name!r}")


def check_eval_interpolation(name: str) -> bool:
    """True for bicubic, False for bilinear (``eval.interpolation``)."""
    if name not in EVAL_INTERPOLATIONS:
        raise ValueError(f"eval_interpolation must be one of {', '.join(EVAL_INTERPOLATIONS)}, got {name!r}")
    return name == "bicubic"


def _missing(root: Path, what: str, fmt: str) -> DataError:
    return DataError(f"{what} not found under {root}; " + convert_hint(root, fmt))


def _split_entry(manifest: dict, split: str, fmt: str) -> dict | None:
    """The per-split record. Accepts ``{"splits": {split: ...}}`` and ``{split: ...}``, with an
    optional per-format level (``{split: {fmt: {...}}}``) merged over the split's common keys."""
    splits = manifest.get("splits", manifest)
    entry = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(entry, dict):
        return None
    sub = entry.get(fmt)
    if isinstance(sub, dict):
        return {**{k: v for k, v in entry.items() if not isinstance(v, dict)}, **sub}
    return entry


def read_split(root: str | Path, split: str, fmt: str) -> SplitInfo:
    """Read ``manifest.json`` for ``split``; raise :class:`DataError` (one line, how to fix) when
    the converted data is missing or the manifest lacks the split."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(root)
    manifest = load_manifest(root, convert_hint(root, fmt))
    if manifest is None:
        raise _missing(root, "manifest.json", fmt)
    formats = manifest.get("formats")
    if formats is not None and fmt not in formats:
        raise DataError(f"{root} was converted without the {fmt} format (has {list(formats)}); "
                        + convert_hint(root, fmt))
    entry = _split_entry(manifest, split, fmt)
    if entry is None or "images" not in entry:
        raise DataError(f"{root / 'manifest.json'} has no '{split}' split; " + convert_hint(root, fmt))
    classes = tuple(entry.get("classes") or manifest.get("classes") or ())
    num_samples = int(entry["images"])
    if num_samples <= 0:
        raise DataError(f"the {split} split at {root} has no images; " + convert_hint(root, fmt))
    return SplitInfo(root, split, num_samples, len(classes), classes, entry)


def require_file(path: Path, root: Path, fmt: str) -> Path:
    if not path.is_file():
        raise _missing(root, str(path.relative_to(root) if path.is_relative_to(root) else path), fmt)
    return path


def val_indices(num_samples: int, rank: int, world_size: int, limit: int = 0) -> np.ndarray:
    """Rank ``rank``'s share of the val set: every sample exactly once across ranks, in file order.
    With ``limit`` (``eval.max_images``, smoke runs) only ``limit`` samples evenly spaced over the
    set: val is stored class by class, so its first ``limit`` would be a few classes only."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if 0 < limit < num_samples:
        return ((np.arange(limit, dtype=np.int64) * num_samples) // limit)[rank::world_size]
    return np.arange(rank, num_samples, world_size, dtype=np.int64)


class EpochPlan:
    """The indices one rank visits in the current epoch, cut into batches.

    train: the shared :class:`ShardSampler` (DDP sharding + repeated augmentation), last partial
    batch dropped; val: :func:`val_indices`, all batches kept. ``set_epoch(epoch, start_batch)``
    reseeds the order and skips the first ``start_batch`` batches without touching any image.
    """

    def __init__(self, num_samples: int, *, train: bool, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, repeats: int = 0, max_images: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.train, self.batch_size = train, batch_size
        self.sampler = ShardSampler(num_samples, seed=seed, rank=rank, world_size=world_size,
                                    repeats=repeats, shuffle=True) if train else None
        self._val = None if train else val_indices(num_samples, rank, world_size, max_images)
        self.epoch, self.start_batch = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def epoch_order(self) -> np.ndarray:
        """All indices of this epoch for this rank (train: a whole number of batches)."""
        return self.order_for(self.epoch)

    def order_for(self, epoch: int) -> np.ndarray:
        """All indices of ``epoch`` for this rank, without changing the current epoch: a backend
        that prefetches across the epoch boundary asks for the next epoch's order in advance."""
        if self.sampler is None:
            return self._val
        if self._cache is None or self._cache[0] != epoch:
            current = self.sampler.epoch
            self.sampler.set_epoch(epoch)
            idx = self.sampler.indices()  # one permutation per epoch, cached: ImageNet's takes ~20 ms
            self.sampler.set_epoch(current)
            self._cache = (epoch, idx[: len(idx) // self.batch_size * self.batch_size])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches per full epoch (independent of ``start_batch``); the same for every epoch."""
        if self.sampler is None:
            return math.ceil(len(self._val) / self.batch_size)
        return len(self.sampler) // self.batch_size  # ShardSampler's start stays 0 here

    def remaining(self) -> np.ndarray:
        """This epoch's indices from ``start_batch`` on: what the backend should actually read."""
        return self.epoch_order()[self.start_batch * self.batch_size:]

    def take(self) -> np.ndarray:
        """:meth:`remaining` for the pass that starts now; the skip then lapses, so iterating again
        without ``set_epoch`` replays the whole epoch (as the reference pipeline does)."""
        order = self.remaining()
        self.start_batch = 0
        return order


def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
