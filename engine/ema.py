"""Exponential moving average of the weights (Polyak averaging; ResNet-RS keeps one, decay 0.9999).

What is averaged: every floating-point entry of the model's state, parameters *and* BatchNorm
running statistics; integer buffers (``num_batches_tracked``) are copied. This is what timm's
``ModelEmaV3.apply_update_`` does (timm 1.0.31 ``timm/utils/model_ema.py``: it lerps every floating
``state_dict`` value and copies the others) and what the TPU reference behind ResNet-RS and
EfficientNet does (``tensorflow/tpu`` ``models/official/efficientnet/utils.py::get_ema_vars``: the
trainable variables plus every ``moving_mean``/``moving_variance``). Copying the live statistics
instead would evaluate weights that lag ~1/(1 - decay) steps with the statistics of today's
weights.

Every rank must hold the same EMA: the engine starts it from the model after DDP has broadcast rank
0's weights (:meth:`EMA.set`), or loads it from a checkpoint, and every rank applies the same updates.
BatchNorm statistics stay per rank, as the model's do, and are averaged over ranks before every
evaluation, checkpoint and export (``engine.distributed.reduce_bn_stats``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Kept in fp32 on the model's device. An update is one multi-tensor lerp over the floating
    state and one multi-tensor copy of the integer buffers; nothing is read back (no host sync)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = _clone_model(model)
        self._floats, self._ints = _split_state(self.module)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        floats, ints = _split_state(model)
        torch._foreach_lerp_(self._floats, floats, 1.0 - self.decay)
        if ints:
            torch._foreach_copy_(self._ints, ints)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Start the average from ``model`` as it is now (every rank's copy, after DDP's broadcast)."""
        floats, ints = _split_state(model)
        torch._foreach_copy_(self._floats + self._ints, floats + ints)


def _split_state(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floating parameters and buffers, other buffers), in a fixed order for two copies of one model."""
    tensors = [p.detach() for p in model.parameters()] + list(model.buffers())
    return [t for t in tensors if t.is_floating_point()], [t for t in tensors if not t.is_floating_point()]


def _clone_model(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()
