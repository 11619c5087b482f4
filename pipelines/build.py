"""Builds the recipe's train and val pipelines; the only place that maps config to a backend.

A backend the recipe names but this machine lacks is an error with what to install, never a
silent switch to another backend (docs/design.md: a missing backend is an error, never a silent switch).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from common.config import AugmentConfig, DataConfig, EvalConfig
from pipelines.base import DataError, MissingBackendError

INSTALL_HINT = {
    "ffcv": "FFCV is not installed: as root run `apt-get install pkg-config libturbojpeg0-dev libopencv-dev`, "
            "then `make setup` (or pip install -e '.[ffcv]'), or set data.pipeline=reference",
    "dali": "DALI is not installed: pip install -e '.[dali]' (nvidia-dali-cuda130), or set data.pipeline=reference",
}


def _require(module: str, backend: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if backend in INSTALL_HINT and (backend in str(e) or "nvidia" in str(e)):
            raise MissingBackendError(INSTALL_HINT[backend]) from None
        raise


def check_data_root(data: DataConfig) -> None:
    root = Path(data.root)
    if not root.exists():
        raise DataError(f"data.root {root} does not exist; convert your dataset first: "
                        f"python tools/convert_imagenet.py SRC {root}")


def build_train_pipeline(data: DataConfig, aug: AugmentConfig, *, res: int, batch_size: int, rank: int,
                         world_size: int, device: torch.device, seed: int, channels_last: bool = True):
    check_data_root(data) if data.pipeline != "synthetic" else None
    common = dict(batch_size=batch_size, res=res, device=device)
    if data.pipeline == "synthetic":
        from pipelines.synthetic import SyntheticPipeline

        return SyntheticPipeline(**common, num_classes=data.num_classes, num_samples=batch_size * world_size * 50,
                                 seed=seed + rank, channels_last=channels_last)
    sampling = dict(rank=rank, world_size=world_size, seed=seed, repeats=aug.repeated_aug, workers=data.workers,
                    scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
                    interpolation=aug.train_interpolation)
    if data.pipeline == "reference":
        from pipelines.reference import ReferencePipeline

        return ReferencePipeline(data.root, "train", **common, **sampling)
    if data.pipeline == "ffcv":
        mod = _require("pipelines.ffcv", "ffcv")
        return mod.FFCVPipeline(data.root, "train", **common, **sampling)
    mod = _require("pipelines.dali", "dali")
    return mod.DALIPipeline(data.root, "train", **common, **sampling)


def build_val_pipeline(data: DataConfig, ev: EvalConfig, *, rank: int, world_size: int, device: torch.device):
    common = dict(batch_size=ev.batch_size, res=ev.res, crop_pct=ev.crop_pct, device=device, rank=rank,
                  world_size=world_size, workers=data.workers, eval_interpolation=ev.interpolation,
                  max_images=ev.max_images)
    if data.pipeline == "synthetic":
        from pipelines.synthetic import SyntheticPipeline

        return SyntheticPipeline(batch_size=ev.batch_size, res=ev.res, num_classes=data.num_classes,
                                 num_samples=ev.batch_size * 2, device=device)
    check_data_root(data)
    if data.pipeline == "reference":
        from pipelines.reference import ReferencePipeline

        return ReferencePipeline(data.root, "val", **common)
    if data.pipeline == "ffcv":
        return _require("pipelines.ffcv", "ffcv").FFCVPipeline(data.root, "val", **common)
    return _require("pipelines.dali", "dali").DALIPipeline(data.root, "val", **common)


def build_stage2(data: DataConfig, aug: AugmentConfig, *, train: bool, label_smoothing: float = 0.0,
                 channels_last: bool = True, seed: int = 0):
    """Stage 2 for the recipe: augmentation (train) and normalization with ``data.mean``/``data.std``,
    the same for every backend and for evaluation (the engine, evaluate, Grad-CAM, the profiler).
    RandAugment's geometric ops resample with ``augment.train_interpolation`` as timm's
    ``create_transform`` passes it to ``rand_augment_transform`` (a fixed filter when one is set;
    ``random``: bilinear or bicubic per op call, timm's RandAugment default)."""
    from pipelines.augment import Stage2

    return Stage2(aug, data.num_classes, label_smoothing if train else 0.0, train=train, channels_last=channels_last,
                  seed=seed, mean=tuple(data.mean), std=tuple(data.std), interpolation=aug.train_interpolation)


def check_num_classes(data: DataConfig, pipeline) -> None:
    found = getattr(pipeline, "num_classes", None)
    if found is not None and found != data.num_classes:
        raise DataError(f"data.num_classes = {data.num_classes} but the dataset at {data.root} has {found} classes; "
                        f"set data.num_classes={found}")
