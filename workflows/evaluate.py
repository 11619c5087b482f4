"""Evaluate a checkpoint on a validation set (top-1 / top-5 / loss), for ``tools/evaluate.py``.

The evaluation is the engine's own (``pipelines.build.build_val_pipeline`` + stage 2 +
``engine.evaluate.evaluate``) with the run's resolved config, so with no setting changed it gives
exactly the val top-1 the run logged for those weights (``workflows.load_model`` returns the model
as the engine evaluated it: EMA weights when kept, channels_last when trained so).

The data root may be a converter output folder (``manifest.json``; FFCV/DALI/reference all read
it), a class-folder tree with ``val/<class>/``, or (reference pipeline only) a class-folder
directory itself. ``imagenet_v2``: folder names are class indices (``0`` ... ``999``), as in the
ImageNet-V2 downloads. :func:`val_pipeline_for` is the one place that picks the val reader for a
tool (evaluation here and the images of ``workflows.gradcam``).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common.config import Config, ConfigError
from pipelines.build import build_stage2, build_val_pipeline, check_num_classes
from engine.precision import resolve_precision
from engine.evaluate import evaluate
from pipelines.base import DataError
from workflows.load_model import load_model


def val_pipeline_for(cfg: Config, device: torch.device | str = "cpu", imagenet_v2: bool = False):
    """The engine's val pipeline for ``cfg`` (``pipelines.build.build_val_pipeline``), except for a bare
    class-folder directory or an ImageNet-V2 layout (``imagenet_v2``: class-index folder names), which
    only the reference (PIL) reader can take. Raises DataError with a one-line message."""
    from pipelines.reference import ReferencePipeline, bare_class_folder

    device = torch.device(device)
    data = Path(cfg.data.root)
    split_dir = bare_class_folder(data)
    if imagenet_v2 and split_dir is None:  # a data root: its val/ class folders, or a converter output
        if (data / "manifest.json").is_file():
            raise DataError(f"--imagenet-v2 reads a class-index folder tree (ImageNet-V2's download: DIR/0 ... "
                            f"DIR/999), but {data} is a converter output folder; give the ImageNet-V2 folder as "
                            f"--data, or drop --imagenet-v2")
        split_dir = data / "val"  # class-index folders checked by the reader (one line if they are names)
    if cfg.data.pipeline == "reference" and (split_dir is not None or imagenet_v2):
        return ReferencePipeline(str(data), "val", batch_size=cfg.eval.batch_size, res=cfg.eval.res,
                                 crop_pct=cfg.eval.crop_pct, workers=cfg.data.workers, device=device,
                                 eval_interpolation=cfg.eval.interpolation, split_dir=split_dir,
                                 class_index_folders=imagenet_v2)
    if imagenet_v2:
        raise DataError("--imagenet-v2 reads class-index folders with the reference pipeline; add --pipeline reference")
    return build_val_pipeline(cfg.data, cfg.eval, rank=0, world_size=1, device=device)


def evaluate_checkpoint(checkpoint: str | Path, *, data: str | None = None, pipeline: str | None = None,
                        res: int | None = None, crop_pct: float | None = None, batch_size: int | None = None,
                        workers: int | None = None, flip_tta: bool = False, imagenet_v2: bool = False,
                        precision: str | None = None, device: str | torch.device = "cpu",
                        recipe: str | None = None) -> dict[str, Any]:
    """Top-1/top-5/loss of ``checkpoint`` (``ckpt-*.pt`` or ``*.safetensors``) on its run's val set,
    or on ``data``; None for a setting means the run's own (``data.root``: relative to the run's working
    folder, ``workflows.load_model.run_data_root``; ``data.pipeline``,
    ``eval.res``...). ``flip_tta`` averages the softmax of each image and its mirror. Returns the
    settings used and the metrics. Raises CheckpointError, ConfigError, DataError or
    MissingBackendError with a one-line message."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is visible; use --device cpu")
    model, cfg = load_model(checkpoint, device, recipe=recipe, data=data)  # the run's data.root found, or data
    cfg = replace(cfg,
                  data=replace(cfg.data, pipeline=pipeline or cfg.data.pipeline,
                               workers=workers if workers is not None else cfg.data.workers),
                  eval=replace(cfg.eval, res=res or cfg.eval.res, crop_pct=crop_pct or cfg.eval.crop_pct,
                               batch_size=batch_size or cfg.eval.batch_size))
    precision = precision or resolve_precision(cfg.train.precision, device, warn=lambda m: None)
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; use --precision fp32 or bf16 on CPU")
    pipe = val_pipeline_for(cfg, device, imagenet_v2)
    if not imagenet_v2:  # V2 trees may lack classes; labels are folder numbers anyway
        check_num_classes(cfg.data, pipe)
    stage2 = build_stage2(cfg.data, cfg.augment, train=False, channels_last=cfg.train.channels_last)
    t0 = time.perf_counter()
    metrics = evaluate(model, pipe, stage2, device=device, precision=precision, flip_tta=flip_tta)
    return {"checkpoint": str(checkpoint), "data": cfg.data.root, "pipeline": cfg.data.pipeline,
            "res": cfg.eval.res, "crop_pct": cfg.eval.crop_pct, "flip_tta": flip_tta,
            "imagenet_v2": imagenet_v2, "precision": precision, "arch": cfg.model.arch,
            **metrics, "seconds": round(time.perf_counter() - t0, 2)}


__all__ = ["val_pipeline_for", "evaluate_checkpoint"]
