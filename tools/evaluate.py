"""Evaluate a checkpoint on a validation set: top-1 / top-5 (and loss), printed and as JSON.

    python tools/evaluate.py runs/a1/ckpt-e0599-s000375000.pt --data data/imagenet
    python tools/evaluate.py runs/a1/best.safetensors --data data/imagenet --pipeline dali --res 288 --flip-tta
    python tools/evaluate.py runs/a1/model.safetensors --data imagenetv2-matched-frequency-format-val \\
        --imagenet-v2 --json runs/a1/eval_v2.json

CHECKPOINT is a training checkpoint (``ckpt-*.pt``: its EMA weights when the run kept an EMA, as the
engine evaluates) or a ``*.safetensors`` export of a run. The evaluation is the engine's own
(pipelines.build.build_val_pipeline + stage 2 + engine.evaluate.evaluate) with the run's resolved config,
so with no options changed it gives exactly the val top-1 the run logged for those weights
(logic: workflows/evaluate.py; this file parses options and prints).

--data: a converter output folder (``manifest.json``; FFCV/DALI/reference all read it), a class-folder
tree with ``val/<class>/``, or (reference pipeline) a class-folder directory itself. --imagenet-v2:
folder names are class indices (``0`` ... ``999``), as in the ImageNet-V2 downloads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import examples, prog
from common.config import CHOICES

SCRIPT = "python tools/evaluate.py"


def parse_args(argv=None) -> argparse.Namespace:
    name = prog(SCRIPT)
    p = argparse.ArgumentParser(prog=name, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=examples(__doc__.split("\n", 1)[1], SCRIPT, name))
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
    p.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--recipe", help="recipe for a .safetensors export that carries no config")
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and usage errors answer at once
    import torch

    from common.config import ConfigError
    from pipelines.base import DataError, MissingBackendError
    from workflows.evaluate import evaluate_checkpoint
    from workflows.load_model import CheckpointError

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = evaluate_checkpoint(args.checkpoint, data=args.data, pipeline=args.pipeline, res=args.res,
                                     crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers,
                                     flip_tta=args.flip_tta, imagenet_v2=args.imagenet_v2,
                                     precision=args.precision, device=args.device, recipe=args.recipe)
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


def cli() -> None:
    """The ``rsb-evaluate`` console script: :func:`main`, then the same end as ``python -m``: at once, without
    the interpreter's teardown (common/process_exit.py)."""
    from common.process_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    cli()
