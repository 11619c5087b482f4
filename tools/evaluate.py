"""Evaluate a checkpoint on a validation set: top-1 / top-5 (and loss), printed and as JSON.

    python tools/evaluate.py runs/a1/ckpt-e0599-s000374400.pt --data data/imagenet
    python tools/evaluate.py runs/a1/best.safetensors --data data/imagenet --pipeline dali --res 288 --flip-tta
    python tools/evaluate.py runs/a1/model.safetensors --data imagenetv2-matched-frequency-format-val \\
        --imagenet-v2 --json runs/a1/eval_v2.json

CHECKPOINT is a training checkpoint (``ckpt-*.pt``: its EMA weights when the run kept an EMA, as the
engine evaluates) or a ``*.safetensors`` export of a run. The evaluation is the engine's own
(engine.data.build_val_pipeline + stage 2 + engine.trainer.evaluate) with the run's resolved config,
so with no options changed it gives exactly the val top-1 the run logged for those weights.

--data: a converter output folder (``manifest.json``; FFCV/DALI/reference all read it), a class-folder
tree with ``val/<class>/``, or (reference pipeline) a class-folder directory itself. --imagenet-v2:
folder names are class indices (``0`` ... ``999``), as in the ImageNet-V2 downloads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.config import CHOICES, ConfigError  # noqa: E402
from engine.data import build_val_pipeline, check_num_classes  # noqa: E402
from engine.load_model import CheckpointError, load_model  # noqa: E402
from engine.precision import resolve_precision  # noqa: E402
from engine.trainer import evaluate  # noqa: E402
from pipelines.augment import Stage2  # noqa: E402
from pipelines.base import DataError, MissingBackendError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("checkpoint", help="ckpt-*.pt or *.safetensors from a run folder")
    p.add_argument("--data", help="val data (default: the run's data.root)")
    p.add_argument("--pipeline", choices=[c for c in CHOICES["data.pipeline"] if c != "synthetic"],
                   help="decoder backend (default: the run's data.pipeline)")
    p.add_argument("--res", type=int, help="eval resolution (default: the run's eval.res)")
    p.add_argument("--crop-pct", type=float, help="resize to res / crop_pct, centre-crop res (default: eval.crop_pct)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    p.add_argument("--workers", type=int, help="decode workers (default: the run's data.workers)")
    p.add_argument("--flip-tta", action="store_true", help="average the softmax of each image and its mirror")
    p.add_argument("--imagenet-v2", action="store_true",
                   help="class folders are named by class index (0..999), as ImageNet-V2's (reference pipeline)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: the run's train.precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", help="recipe for a .safetensors export that carries no config")
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args(argv)


def _val_pipeline(cfg, args, device: torch.device):
    """The engine's val pipeline, except for a bare class-folder directory or ImageNet-V2 layout,
    which only the reference (PIL) reader can take."""
    from pipelines.reference import ReferencePipeline, bare_class_folder

    data = Path(cfg.data.root)
    split_dir = bare_class_folder(data)
    if cfg.data.pipeline == "reference" and (split_dir is not None or args.imagenet_v2):
        return ReferencePipeline(str(data), "val", batch_size=cfg.eval.batch_size, res=cfg.eval.res,
                                 crop_pct=cfg.eval.crop_pct, workers=cfg.data.workers, device=device,
                                 split_dir=split_dir, class_index_folders=args.imagenet_v2)
    if args.imagenet_v2:
        raise DataError("--imagenet-v2 reads class-index folders with the reference pipeline; add --pipeline reference")
    return build_val_pipeline(cfg.data, cfg.eval, rank=0, world_size=1, device=device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is visible; use --device cpu")
    model, cfg = load_model(args.checkpoint, device, recipe=args.recipe)
    cfg = replace(cfg,
                  data=replace(cfg.data, root=args.data or cfg.data.root, pipeline=args.pipeline or cfg.data.pipeline,
                               workers=args.workers if args.workers is not None else cfg.data.workers),
                  eval=replace(cfg.eval, res=args.res or cfg.eval.res, crop_pct=args.crop_pct or cfg.eval.crop_pct,
                               batch_size=args.batch_size or cfg.eval.batch_size))
    precision = args.precision or resolve_precision(cfg.train.precision, device, warn=lambda m: None)
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; use --precision fp32 or bf16 on CPU")
    pipe = _val_pipeline(cfg, args, device)
    if not args.imagenet_v2:  # V2 trees may lack classes; labels are folder numbers anyway
        check_num_classes(cfg.data, pipe)
    stage2 = Stage2(cfg.augment, cfg.data.num_classes, 0.0, train=False, channels_last=cfg.train.channels_last)
    t0 = time.perf_counter()
    metrics = evaluate(model, pipe, stage2, device=device, precision=precision, flip_tta=args.flip_tta)
    return {"checkpoint": str(args.checkpoint), "data": cfg.data.root, "pipeline": cfg.data.pipeline,
            "res": cfg.eval.res, "crop_pct": cfg.eval.crop_pct, "flip_tta": args.flip_tta,
            "imagenet_v2": args.imagenet_v2, "precision": precision, "arch": cfg.model.arch,
            **metrics, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (CheckpointError, ConfigError, DataError, MissingBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['arch']} on {result['data']} ({result['pipeline']}, res {result['res']}, crop_pct "
          f"{result['crop_pct']}{', flip TTA' if result['flip_tta'] else ''}): top-1 {result['val_top1']:.2f} "
          f"top-5 {result['val_top5']:.2f} loss {result['val_loss']:.4f} over {result['val_images']} images")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
