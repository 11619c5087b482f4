"""Grad-CAM of one or more checkpoints side by side on the same val images: a PNG grid, and a W&B Table.

    python tools/gradcam.py runs/a1/model.safetensors runs/a2/model.safetensors runs/a3/model.safetensors \\
        --labels A1,A2,A3 --data data/imagenet --num-images 8 --out gradcam.png
    python tools/gradcam.py runs/demo/ckpt-e0001-s000000234.pt runs/demo/model.safetensors \\
        --labels "epoch 1,epoch 2" --res 64 --layer layer3 --wandb offline

Grid: one row per image; the first column is the image (titled with its true class), then one
heat-map overlay per checkpoint, titled with the checkpoint's label and its predicted class and
probability (green when right, red when wrong). The class explained is each model's own prediction.
Class names come from the converter's manifest.json, else the class folder names.

CHECKPOINT: ``ckpt-*.pt`` (EMA weights when the run kept an EMA) or a ``*.safetensors`` export.
Images: --num-images val images spread evenly over the val set of --data (default: the first
checkpoint's data.root; a converter output whose manifest names its source tree, a tree with
val/<class>/, or a class-folder directory), cut at --res / --crop-pct (default: the first
checkpoint's eval settings) and normalized as each run's eval did.

Target layer: the last block of layer4 (the last conv stage of a ResNet); --layer names another
module, e.g. ``layer3`` when layer4 is too coarse (a 1x1 map at small --res is flat).
--wandb offline|online logs a ``gradcam`` table (image, true class, per checkpoint: overlay and
prediction) to a run under --wandb-dir (default: the PNG's folder).
"""
from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import ConfigError, LogConfig  # noqa: E402
from engine.gradcam import (LayerError, class_name, explain, flat_map_note, overlay, pick_samples,  # noqa: E402
                            target_layer)
from engine.load_model import CheckpointError, load_model  # noqa: E402
from pipelines.base import DataError  # noqa: E402

TITLE_PT = 6.5  # points; the figure is laid out in cells of one inch, so text scales with --cell-px


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("checkpoints", nargs="+", help="ckpt-*.pt or *.safetensors files, one column each")
    p.add_argument("--labels", help="comma-separated column titles (default: each run folder's name)")
    p.add_argument("--data", help="val images (default: the first checkpoint's data.root)")
    p.add_argument("--num-images", type=int, default=8, help="rows of the grid (default 8)")
    p.add_argument("--res", type=int, help="default: the first checkpoint's eval.res")
    p.add_argument("--crop-pct", type=float, help="default: the first checkpoint's eval.crop_pct")
    p.add_argument("--layer", help="target module by name, e.g. layer3 (default: the last block of layer4)")
    p.add_argument("--out", type=Path, default=Path("gradcam.png"), help="PNG to write (default gradcam.png)")
    p.add_argument("--cell-px", type=int, default=160, help="pixels per grid cell; PNG is cols x rows cells")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", help="recipe for a .safetensors export that carries no config")
    p.add_argument("--wandb", choices=["off", "offline", "online"], default="off")
    p.add_argument("--wandb-project", default=LogConfig.project)
    p.add_argument("--wandb-dir", type=Path, help="where the W&B run folder goes (default: the PNG's folder)")
    return p.parse_args(argv)


def column_labels(args) -> list[str]:
    if args.labels:
        labels = [s.strip() for s in args.labels.split(",")]
        if len(labels) != len(args.checkpoints):
            raise ConfigError(f"--labels has {len(labels)} names for {len(args.checkpoints)} checkpoints; "
                              "give one per checkpoint")
        return labels
    paths = [Path(c).resolve() for c in args.checkpoints]
    labels = [p.parent.name for p in paths]
    return labels if len(set(labels)) == len(labels) else [f"{p.parent.name}/{p.stem}" for p in paths]


def run(args) -> dict:
    """Loads every checkpoint, explains the same images with each; returns what the outputs need."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is visible; use --device cpu")
    if args.num_images < 1:
        raise ConfigError("--num-images must be at least 1")
    labels = column_labels(args)
    loaded = [load_model(c, device, recipe=args.recipe) for c in args.checkpoints]
    first = loaded[0][1]
    res, crop_pct = args.res or first.eval.res, args.crop_pct or first.eval.crop_pct
    samples = pick_samples(args.data or first.data.root, args.num_images, res, crop_pct)
    columns = []
    for label, (model, cfg) in zip(labels, loaded):
        exp = explain(model, cfg, samples.images, target_layer(model, cfg.model.arch, args.layer), device)
        note = flat_map_note(exp.feature_hw, res)
        if note:
            print(f"{label}: {note}", file=sys.stderr)
        columns.append((label, exp))
    return {"samples": samples, "columns": columns, "res": res, "crop_pct": crop_pct}


def render_grid(result: dict, out: Path, cell_px: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, columns = result["samples"], result["columns"]
    rows, cols = len(samples.labels), 1 + len(columns)
    fig = plt.figure(figsize=(cols, rows), dpi=cell_px)  # one inch per cell: exactly cols x rows cells
    side, top_gap = 0.74, 0.24  # image height and title room, as fractions of a cell
    pictures = samples.images.permute(0, 2, 3, 1).numpy()
    for r in range(rows):
        for c in range(cols):
            ax = fig.add_axes(((c + (1 - side) / 2) / cols, (rows - r - 1 + 1 - top_gap - side) / rows,
                               side / cols, side / rows))
            ax.set_axis_off()
            if c == 0:
                ax.imshow(pictures[r])
                ax.set_title(class_name(samples.class_names, samples.labels[r]), fontsize=TITLE_PT, pad=2)
                continue
            label, exp = columns[c - 1]
            pred = int(exp.pred[r])
            ax.imshow(overlay(pictures[r], exp.cams[r]))
            ax.set_title(f"{label}\n{class_name(samples.class_names, pred)} {100 * exp.prob[r]:.0f}%",
                         fontsize=TITLE_PT, pad=2, color="tab:green" if pred == samples.labels[r] else "tab:red")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=cell_px)
    plt.close(fig)


def log_wandb(result: dict, args) -> str:
    """One ``gradcam`` wandb.Table row per image; returns the run's folder."""
    from engine.logging import _start_wandb  # the engine's W&B start-up: same online-login check and errors

    import wandb

    samples, columns = result["samples"], result["columns"]
    headers = ["image", "true class"]
    for label, _ in columns:
        headers += [f"{label} Grad-CAM", f"{label} prediction"]
    table = wandb.Table(columns=headers)
    pictures = samples.images.permute(0, 2, 3, 1).numpy()
    for r in range(len(samples.labels)):
        row = [wandb.Image(pictures[r]), class_name(samples.class_names, samples.labels[r])]
        for _, exp in columns:
            row += [wandb.Image(overlay(pictures[r], exp.cams[r])),
                    f"{class_name(samples.class_names, int(exp.pred[r]))} ({100 * exp.prob[r]:.1f}%)"]
        table.add_data(*row)
    where = args.wandb_dir or args.out.parent
    config = {"checkpoints": [str(c) for c in args.checkpoints], "labels": [label for label, _ in columns],
              "res": result["res"], "crop_pct": result["crop_pct"], "layer": args.layer or "layer4[-1]"}
    run = _start_wandb(LogConfig(wandb=args.wandb, project=args.wandb_project, run_name="gradcam"), where,
                       config, uuid.uuid4().hex[:12])  # a fresh run per invocation
    run.log({"gradcam": table})
    folder = run.dir
    run.finish()
    return str(Path(folder).parent)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
        render_grid(result, args.out, args.cell_px)
        where = log_wandb(result, args) if args.wandb != "off" else None
    except (CheckpointError, ConfigError, DataError, LayerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # the W&B start-up's own one-line errors (no login, not installed)
        print(str(e.code), file=sys.stderr)
        return 2
    rows = len(result["samples"].labels)
    for label, exp in result["columns"]:
        right = int((exp.pred == np.array(result["samples"].labels)).sum())
        print(f"{label}: {right}/{rows} predictions right")
    print(f"wrote {args.out} ({rows} images x {len(result['columns'])} checkpoints)"
          + (f"; W&B table in {where}" if where else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
