"""Exponential moving average of the weights (Polyak averaging; ResNet-RS keeps one, decay 0.9999)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Exponential moving average of weights (Polyak averaging), as in ResNet-RS (decay 0.9999).
    Kept in fp32 on the model's device; buffers (BN statistics) are copied, not averaged. An
    update is one multi-tensor lerp over the parameters and one multi-tensor copy of the buffers;
    nothing is read back (no host sync)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = _clone_model(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        torch._foreach_copy_(list(self.module.buffers()), list(model.buffers()))


def _clone_model(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()
