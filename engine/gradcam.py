"""Grad-CAM heat-maps (Selvaraju et al. 2017) of trained checkpoints, for ``tools/gradcam.py``.

The CAM itself is the maintained ``grad-cam`` package's (``pytorch_grad_cam.GradCAM``); this module
only decides what it is computed on, so that comparing checkpoints is fair:

* the same images for every checkpoint, cut by the reference reader's eval transform (resize the
  shorter side to ``floor(res / crop_pct)``, centre-crop ``res``) and normalized by each run's own
  eval stage 2, i.e. what the engine's evaluation feeds the model;
* the last convolutional stage as target layer (``layer4[-1]`` for timm ResNets, where the paper
  puts it: the last spatial features before pooling), or a named module;
* the class explained is the model's own prediction, in fp32 (gradients need no autocast).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.config import Config
from pipelines.augment import Stage2
from pipelines.base import Batch, DataError


class LayerError(ValueError):
    """No Grad-CAM target layer for this model; one-line message."""


def target_layer(model: nn.Module, arch: str, name: str | None = None) -> nn.Module:
    """``name`` (a dotted module path such as ``layer3`` or ``layer4.0``) when given, else the last
    block of the last stage of a ResNet-style model (timm ResNet/ResNet-D/SE-ResNet...: ``layer4``)."""
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            stages = [n for n, _ in model.named_children()]
            raise LayerError(f"{arch} has no module {name!r}; top-level modules are {', '.join(stages)}") from None
    last = getattr(model, "layer4", None)
    if isinstance(last, nn.Sequential) and len(last):
        return last[-1]
    raise LayerError(f"no default Grad-CAM layer for model.arch={arch} (no ResNet layer4); "
                     "name its last conv stage with --layer")


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
    folder names."""
    from pipelines.reference import ReferencePipeline, bare_class_folder

    root = Path(root)
    pipe = ReferencePipeline(str(root), "val", batch_size=1, res=res, crop_pct=crop_pct, workers=0,
                             split_dir=bare_class_folder(root))
    total = pipe.num_samples
    picks = sorted({int(i * total / n) for i in range(min(n, total))})
    loaded = [(i, pipe.dataset[(i, None)]) for i in picks]
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
    stage2 = Stage2(cfg.augment, cfg.data.num_classes, 0.0, train=False, channels_last=cfg.train.channels_last)
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
            "use a larger --res or an earlier --layer (e.g. layer3)")


__all__ = ["LayerError", "target_layer", "Samples", "pick_samples", "Explanation", "explain", "overlay",
           "class_name", "flat_map_note"]
