"""Grad-CAM of one or more checkpoints side by side on the same val images: a PNG grid, and a W&B Table.

    python tools/gradcam.py runs/a1/model.safetensors runs/a2/model.safetensors runs/a3/model.safetensors \\
        --labels A1,A2,A3 --data data/imagenet --num-images 8 --out gradcam.png
    python tools/gradcam.py runs/demo/model.safetensors --out runs/demo/gradcam.png     # after make demo
    python tools/gradcam.py runs/demo/model.safetensors --res 64 --layer layer2 --wandb offline

Grid: one row per image; the first column is the image (titled with its true class), then one
heat-map overlay per checkpoint, titled with the checkpoint's label and its predicted class and
probability (green when right, red when wrong). The class explained is each model's own prediction.
Class names come from the converter's manifest.json, else the class folder names.

CHECKPOINT: ``ckpt-*.pt`` (EMA weights when the run kept an EMA) or a ``*.safetensors`` export.
Images: --num-images val images spread evenly over the val set of --data (default: the first
checkpoint's data.root; a converter output whose manifest names its source tree, a tree with
val/<class>/, or a class-folder directory), cut at --res / --crop-pct (default: the first
checkpoint's eval settings) and normalized as each run's eval did.

Target layer: the deepest ResNet stage whose map is at least 4x4 at the resolution used (layer4 at
224 px, 7x7; layer2 at the demo's 32 px, where layer4 is 1x1 and its heat-map flat); the output says
which. --layer names another module, e.g. layer3 or layer4.0.
--wandb offline|online logs a ``gradcam`` table (image, true class, per checkpoint: overlay and
prediction) to a run under --wandb-dir (default: the PNG's folder).
Logic: workflows/gradcam.py; this file parses options and prints.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import examples, prog
from common.config import LogConfig

SCRIPT = "python tools/gradcam.py"


def parse_args(argv=None) -> argparse.Namespace:
    name = prog(SCRIPT)
    p = argparse.ArgumentParser(prog=name, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=examples(__doc__.split("\n", 1)[1], SCRIPT, name))
    p.add_argument("checkpoints", nargs="+", help="ckpt-*.pt or *.safetensors files, one column each")
    p.add_argument("--labels", help="comma-separated column titles (default: each run folder's name)")
    p.add_argument("--data", help="val images (default: the first checkpoint's data.root)")
    p.add_argument("--num-images", type=int, default=8, help="rows of the grid (default 8)")
    p.add_argument("--res", type=int, help="default: the first checkpoint's eval.res")
    p.add_argument("--crop-pct", type=float, help="default: the first checkpoint's eval.crop_pct")
    p.add_argument("--layer", help="target module by name, e.g. layer3 (default: the deepest stage at least 4x4)")
    p.add_argument("--out", type=Path, default=Path("gradcam.png"), help="PNG to write (default gradcam.png)")
    p.add_argument("--cell-px", type=int, default=160, help="pixels per grid cell; PNG is cols x rows cells")
    p.add_argument("--device", help="cpu or cuda (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--recipe", help="recipe for a .safetensors export that carries no config")
    p.add_argument("--wandb", choices=["off", "offline", "online"], default="off")
    p.add_argument("--wandb-project", default=LogConfig.project)
    p.add_argument("--wandb-dir", type=Path, help="where the W&B run folder goes (default: the PNG's folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # before torch is imported: --help and usage errors answer at once
    import torch

    from common.config import ConfigError
    from pipelines.base import DataError
    from workflows.gradcam import LayerError, compare, layer_lines, log_wandb, predictions_right, render_grid
    from workflows.load_model import CheckpointError

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = compare(args.checkpoints, labels=args.labels, data=args.data, num_images=args.num_images,
                         res=args.res, crop_pct=args.crop_pct, layer=args.layer, device=args.device,
                         recipe=args.recipe)
        render_grid(result, args.out, args.cell_px)
        where = (log_wandb(result, args.wandb_dir or args.out.parent, args.wandb, args.wandb_project)
                 if args.wandb != "off" else None)
    except (CheckpointError, ConfigError, DataError, LayerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # the W&B start-up's own one-line errors (no login, not installed)
        print(str(e.code), file=sys.stderr)
        return 2
    rows = len(result["samples"].labels)
    for line in layer_lines(result):
        print(line)
    for label, right in predictions_right(result):
        print(f"{label}: {right}/{rows} predictions right")
    print(f"wrote {args.out} ({rows} images x {len(result['columns'])} checkpoints)"
          + (f"; W&B table in {where}" if where else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
