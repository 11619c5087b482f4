"""Model factory over timm: every timm ResNet family member by name, plus the recipe's knobs.

Knobs: stochastic depth (timm ``drop_path_rate``, Huang et al. 2016), classifier dropout
(``drop_rate``, ResNet-RS uses 0.25), zero-init of each block's last BN gamma (Goyal et al. 2017;
timm's default ``zero_init_last``), and BlurPool anti-aliased downsampling (Zhang 2019; ffcv-imagenet
uses it) through timm's ``aa_layer``. No weights are downloaded: training starts from scratch.

``resnet_tiny`` is the demo's model: a timm ``ResNet`` with one BasicBlock per stage and narrow
channels, so a few epochs of Fashion-MNIST train on two CPU cores in minutes. It is still timm's
ResNet code, so the engine runs the same path as for ResNet-50.
"""
from __future__ import annotations

import sys

import torch.nn as nn

# timm.utils.summary imports wandb whenever it is installed (reached through timm.models -> timm.data),
# for a CSV/W&B summary writer this project never calls: 0.6-0.7 s of every process start on the 2-core
# box, a tenth of a short run's start-up, paid by every rank of every trial of a sweep. While timm loads,
# `import wandb` fails (a None entry in sys.modules makes it raise ImportError, which timm catches);
# engine/logging.py imports the real one when a run logs to W&B. A process that imported wandb first
# keeps it.
_WANDB_HIDDEN = "wandb" not in sys.modules
if _WANDB_HIDDEN:
    sys.modules["wandb"] = None  # type: ignore[assignment]
try:
    import timm
    from timm.layers import BlurPool2d
    from timm.models.resnet import BasicBlock, ResNet
finally:
    if _WANDB_HIDDEN:
        del sys.modules["wandb"]

from common.config import ModelConfig  # noqa: E402 (after timm's import above)


def _resnet_tiny(**kwargs) -> nn.Module:
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32, **kwargs)


LOCAL_MODELS = {"resnet_tiny": _resnet_tiny}


class UnknownModelError(ValueError):
    """The recipe names a model that neither timm nor this factory knows; message is one line."""


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
                  zero_init_last=cfg.zero_init_last)
    if cfg.blurpool:
        kwargs["aa_layer"] = BlurPool2d
    if cfg.arch in LOCAL_MODELS:
        return LOCAL_MODELS[cfg.arch](**kwargs)
    if not timm.is_model(cfg.arch):
        import difflib

        names = list(LOCAL_MODELS) + timm.list_models("*res*")
        guess = difflib.get_close_matches(cfg.arch, names, n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        raise UnknownModelError(f"model.arch = {cfg.arch!r} is not a timm model{hint}")
    try:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)
    except TypeError as e:  # a non-ResNet timm model without zero_init_last / aa_layer
        raise UnknownModelError(f"model.arch = {cfg.arch!r} does not take these options ({e}); "
                                "set model.blurpool=false or use a ResNet") from None
