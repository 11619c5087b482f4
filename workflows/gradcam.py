"""Grad-CAM heat-maps (Selvaraju et al. 2017) of trained checkpoints side by side, for ``tools/gradcam.py``:
the heat-maps (:func:`explain`), the comparison of several checkpoints on the same images
(:func:`compare`), the PNG grid (:func:`render_grid`) and the W&B table (:func:`log_wandb`).

The CAM itself is the maintained ``grad-cam`` package's (``pytorch_grad_cam.GradCAM``); this module
only decides what it is computed on, so that comparing checkpoints is fair:

* the same images for every checkpoint, cut by the reference reader's eval transform (resize the
  shorter side to ``floor(res / crop_pct)``, centre-crop ``res``) and normalized by each run's own
  eval stage 2, i.e. what the engine's evaluation feeds the model;
* the target layer: the deepest ResNet stage whose feature map is still at least 4x4 at the
  resolution used (:func:`target_layer`), or a named module. The paper puts it at the last
  convolutional features (``layer4``), whose map is res / 32: 7x7 at 224 px, but 1x1 at the demo's
  32 px, where the map is one number and the heat-map a flat sheet; the deepest 4x4-or-larger stage
  keeps the most semantic features that can still point somewhere;
* the class explained is the model's own prediction, in fp32 (gradients need no autocast).

Grid: one row per image; the first column is the image (titled with its true class), then one
heat-map overlay per checkpoint, titled with the checkpoint's label and its predicted class and
probability (green when right, red when wrong). Class names come from the converter's
manifest.json, else the class folder names.
"""
from __future__ import annotations

import json
import math
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from common.config import Config, ConfigError, LogConfig
from pipelines.build import build_stage2
from pipelines.base import Batch, DataError
from workflows.evaluate import val_pipeline_for
from workflows.load_model import load_model

TITLE_PT = 6.5  # points; the figure is laid out in cells of one inch, so text scales with cell_px
MIN_MAP = 4  # the default layer's map is at least MIN_MAP x MIN_MAP: 1x1 is flat, 2x2 four blocks
STAGES = ("layer1", "layer2", "layer3", "layer4")  # timm ResNet/ResNet-D/SE-ResNet... stages, input side first


class LayerError(ValueError):
    """No Grad-CAM target layer for this model; one-line message."""


@dataclass
class Layer:
    """The Grad-CAM target: the module, the name ``--layer`` takes for it, and why it was chosen."""
    name: str
    module: nn.Module
    why: str


def stage_maps(model: nn.Module, res: int, channels_last: bool = False) -> list[tuple[str, tuple[int, int]]]:
    """(stage name, output height x width) of each ResNet stage of ``model`` for a ``res`` x ``res``
    input, input side first; one forward pass of a blank image."""
    stages = [(n, m) for n in STAGES if isinstance(m := getattr(model, n, None), nn.Sequential) and len(m)]
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            sizes[name] = tuple(output.shape[-2:])
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in stages]
    param = next(model.parameters())
    x = torch.zeros(1, 3, res, res, device=param.device, dtype=param.dtype)
    try:
        with torch.no_grad():
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    finally:
        for h in hooks:
            h.remove()
    return [(n, sizes[n]) for n, _ in stages]


def target_layer(model: nn.Module, arch: str, name: str | None = None, res: int = 224,
                 channels_last: bool = False) -> Layer:
    """``name`` (a dotted module path such as ``layer3`` or ``layer4.0``) when given; else the deepest
    ResNet stage whose map is at least MIN_MAP x MIN_MAP at ``res`` (its last block: the stage's
    output), or the shallowest stage when none is (with a note)."""
    if name:
        try:
            return Layer(name, model.get_submodule(name), "as --layer says")
        except AttributeError:
            stages = [n for n, _ in model.named_children()]
            raise LayerError(f"{arch} has no module {name!r}; top-level modules are {', '.join(stages)}") from None
    maps = stage_maps(model, res, channels_last)
    if not maps:
        raise LayerError(f"no default Grad-CAM layer for model.arch={arch} (no ResNet stages layer1..layer4); "
                         "name its last conv stage with --layer")
    big = [(n, hw) for n, hw in maps if min(hw) >= MIN_MAP]
    pick, hw = big[-1] if big else maps[0]
    deeper = ", ".join(f"{n} {h}x{w}" for n, (h, w) in maps[[n for n, _ in maps].index(pick) + 1:])
    why = (f"{hw[0]}x{hw[1]} at res {res} (the deepest stage at least {MIN_MAP}x{MIN_MAP}" if big else
           f"{hw[0]}x{hw[1]} at res {res} (no stage reaches {MIN_MAP}x{MIN_MAP}: a larger --res shows more")
    why += (f"; deeper: {deeper}" if deeper else "") + "; --layer picks another)"
    return Layer(pick, getattr(model, pick)[-1], why)


@dataclass
class Samples:
    """Images to explain: uint8 [N, 3, res, res] (channels_last), true labels, source paths, class names."""
    images: torch.Tensor
    labels: list[int]
    paths: list[str]
    class_names: list[str]


def pick_samples(root: str | Path, n: int, res: int, crop_pct: float) -> Samples:
    """``n`` val images spread evenly over the (class-sorted) val set, so most classes show up.

    ``root``: a converter output (its ``manifest.json`` names the source tree), a tree with
    ``val/<class>/``, or a class-folder directory itself. Class names: the manifest's, else the
    folder names. Always the reference (PIL) reader: the images are read one by one, by index."""
    root = Path(root)
    cfg = Config()
    cfg = replace(cfg, data=replace(cfg.data, root=str(root), pipeline="reference", workers=0),
                  eval=replace(cfg.eval, batch_size=1, res=res, crop_pct=crop_pct))
    pipe = val_pipeline_for(cfg)
    total = pipe.num_samples
    picks = sorted({int(i * total / n) for i in range(min(n, total))})
    loaded = [(i, pipe.dataset[(i, None, res)]) for i in picks]
    picks = [i for i, (a, _, _) in loaded if a is not None]  # an unreadable image is left out, as in training
    items = [(a, b) for a, b, _ in (item for _, item in loaded) if a is not None]
    if not items:
        raise DataError(f"none of the {len(loaded)} val images picked from {root} could be read")
    images = torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2)
    names = list(pipe.classes)
    manifest = root / "manifest.json"
    if manifest.is_file():
        named = json.loads(manifest.read_text()).get("splits", {}).get("val", {}).get("classes")
        names = list(named) if named else names
    return Samples(images, [int(b) for _, b in items], [pipe.dataset.samples[i][0] for i in picks], names)


@dataclass
class Explanation:
    cams: np.ndarray  # float32 [N, res, res] in [0, 1], per-image min-max scaled (the grad-cam package's)
    pred: np.ndarray  # int64 [N] predicted class (the one explained)
    prob: np.ndarray  # float32 [N] its softmax probability
    feature_hw: tuple[int, int]  # the target layer's spatial size: 1x1 gives a flat map


def explain(model: nn.Module, cfg: Config, images: torch.Tensor, layer: nn.Module,
            device: torch.device) -> Explanation:
    """Grad-CAM of ``model`` for its predicted class on uint8 ``images`` (normalized as its run did)."""
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        raise DataError("Grad-CAM needs the grad-cam package; pip install -e '.[dev]'") from None
    stage2 = build_stage2(cfg.data, cfg.augment, train=False, channels_last=cfg.train.channels_last)
    x, _ = stage2(Batch(images.to(device), torch.zeros(len(images), dtype=torch.int64, device=device)))
    shape: list[tuple[int, int]] = []
    hook = layer.register_forward_hook(lambda m, i, o: shape.append(tuple(o.shape[-2:])))
    try:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=x, targets=None)  # None: each image's argmax class
            logits = cam.outputs.detach().float()
    finally:
        hook.remove()
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    return Explanation(maps.astype(np.float32), pred.cpu().numpy(),
                       probs.gather(1, pred[:, None])[:, 0].cpu().numpy(), shape[0])


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 HWC image blended with the CAM drawn in matplotlib's ``jet`` colormap."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    mixed = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * heat
    return np.clip(np.round(mixed * 255.0), 0, 255).astype(np.uint8)


def class_name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def flat_map_note(feature_hw: tuple[int, int], res: int) -> str | None:
    if math.prod(feature_hw) > 1:
        return None
    return (f"note: the target layer is 1x1 at res {res}, so its heat-map is flat; "
            "use a larger --res or an earlier --layer (e.g. layer3), or leave --layer out")


def column_labels(checkpoints: list[str], labels: str | None = None) -> list[str]:
    """Column titles: the comma-separated ``labels`` (one per checkpoint), else each run folder's name
    (with the file's stem when two folders share a name)."""
    if labels:
        names = [s.strip() for s in labels.split(",")]
        if len(names) != len(checkpoints):
            raise ConfigError(f"--labels has {len(names)} names for {len(checkpoints)} checkpoints; "
                              "give one per checkpoint")
        return names
    paths = [Path(c).resolve() for c in checkpoints]
    names = [p.parent.name for p in paths]
    return names if len(set(names)) == len(names) else [f"{p.parent.name}/{p.stem}" for p in paths]


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def compare(checkpoints: list[str], *, labels: str | None = None, data: str | None = None, num_images: int = 8,
            res: int | None = None, crop_pct: float | None = None, layer: str | None = None,
            device: str | torch.device = "cpu", recipe: str | None = None,
            warn: Callable[[str], None] = _to_stderr) -> dict[str, Any]:
    """Loads every checkpoint and explains the same images with each: ``num_images`` val images of
    ``data`` (default: the first checkpoint's data.root) cut at ``res`` / ``crop_pct`` (default: the
    first checkpoint's eval settings); ``layer`` names the target module (default: per checkpoint, the
    deepest stage at least 4x4 at ``res``, :func:`target_layer`). Returns what :func:`render_grid` and
    :func:`log_wandb` need, with each column's layer and why (``"layers"``); ``warn`` gets the note
    for a flat (1x1) map. Raises CheckpointError, ConfigError, DataError or LayerError (one line)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is visible; use --device cpu")
    if num_images < 1:
        raise ConfigError("--num-images must be at least 1")
    names = column_labels(checkpoints, labels)
    loaded = [load_model(checkpoints[0], device, recipe=recipe, data=data)]  # the first run's data, found
    first = loaded[0][1]
    loaded += [load_model(c, device, recipe=recipe, data=first.data.root) for c in checkpoints[1:]]
    res, crop_pct = res or first.eval.res, crop_pct or first.eval.crop_pct
    samples = pick_samples(first.data.root, num_images, res, crop_pct)
    columns, layers = [], []
    for label, (model, cfg) in zip(names, loaded):
        target = target_layer(model, cfg.model.arch, layer, res, cfg.train.channels_last)
        exp = explain(model, cfg, samples.images, target.module, device)
        note = flat_map_note(exp.feature_hw, res)
        if note:
            warn(f"{label}: {note}")
        columns.append((label, exp))
        layers.append((label, target.name, target.why))
    return {"samples": samples, "columns": columns, "res": res, "crop_pct": crop_pct,
            "checkpoints": [str(c) for c in checkpoints], "layer": layer, "layers": layers}


def layer_lines(result: dict[str, Any]) -> list[str]:
    """What the tool prints about the target layer: one line when every column uses the same one."""
    layers = result["layers"]
    if len({(name, why) for _, name, why in layers}) == 1:
        _, name, why = layers[0]
        return [f"Grad-CAM layer: {name}, {why}"]
    return [f"{label}: Grad-CAM layer {name}, {why}" for label, name, why in layers]


def predictions_right(result: dict[str, Any]) -> list[tuple[str, int]]:
    """(column label, images whose prediction is the true class) per checkpoint."""
    truth = np.array(result["samples"].labels)
    return [(label, int((exp.pred == truth).sum())) for label, exp in result["columns"]]


def render_grid(result: dict[str, Any], out: Path, cell_px: int) -> None:
    """The PNG grid (module docstring), ``cell_px`` pixels per cell: cols x rows cells."""
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


def log_wandb(result: dict[str, Any], where: Path, mode: str, project: str = LogConfig.project) -> str:
    """One ``gradcam`` wandb.Table row per image (image, true class, per checkpoint: overlay and
    prediction), logged to a fresh W&B run (``mode`` offline or online) under ``where``; returns the
    run's folder. Started as the engine starts its runs (``engine.logging.start_wandb``: the same
    online-login check, and its one-line SystemExit errors)."""
    from engine.logging import start_wandb

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
    config = {"checkpoints": result["checkpoints"], "labels": [label for label, _ in columns],
              "res": result["res"], "crop_pct": result["crop_pct"],
              "layer": {label: name for label, name, _ in result["layers"]}}
    run = start_wandb(LogConfig(wandb=mode, project=project, run_name="gradcam"), Path(where),
                      config, uuid.uuid4().hex[:12])  # a fresh run per invocation
    run.log({"gradcam": table})
    folder = run.dir
    run.finish()
    return str(Path(folder).parent)


__all__ = ["LayerError", "Layer", "MIN_MAP", "stage_maps", "target_layer", "layer_lines", "Samples", "pick_samples", "Explanation", "explain", "overlay",
           "class_name", "flat_map_note", "column_labels", "compare", "predictions_right", "render_grid", "log_wandb"]
