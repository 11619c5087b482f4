"""A CPU stand-in for NVIDIA apex's ``FusedLAMB`` with apex's exact interface and state layout.

apex cannot be installed here; it ships in NVIDIA's containers, where most users run, and the
engine picks it there. This class copies what the engine can touch, read from NVIDIA/apex at
commit 6424da3b (2026-07-08), ``apex/optimizers/fused_lamb.py`` and ``csrc/multi_tensor_lamb.cu``:

* ``__init__(params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
  weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True,
  max_grad_norm=1.0, use_nvlamb=False)``; defaults (hence every param group) hold lr,
  bias_correction, betas, eps, weight_decay, grad_averaging, max_grad_norm;
* ``zero_grad(self)``: no ``set_to_none`` argument;
* ``step(self, closure=None)``: ``group["step"]`` is created at 1 or incremented (an int per
  group); state per parameter is ``exp_avg`` and ``exp_avg_sq``; the clip uses
  ``self.defaults["max_grad_norm"]``; the update is written into ``p.grad`` (apex reuses the
  gradient's memory for it).

The arithmetic is the kernel's (stage 1: clipped grad, Adam moments, bias-corrected direction
plus decay in AdamW mode; stage 2: trust ratio ``||p|| / ||update||`` where weight decay != 0 or
``use_nvlamb``, 1 where a norm is 0), one tensor at a time in float32.
"""
from __future__ import annotations

import torch


class FusedLAMB(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self):
        if self.set_grad_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            super().zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        max_norm = self.defaults["max_grad_norm"]
        clip = global_norm / max_norm if global_norm > max_norm else torch.ones(())
        for group in self.param_groups:
            group["step"] = group["step"] + 1 if "step" in group else 1
            beta1, beta2 = group["betas"]
            beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
            bc1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            bc2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = p.grad / clip
                if self.adam_w_mode == 0:
                    g = g + decay * p
                m.mul_(beta1).add_(beta3 * g)
                v.mul_(beta2).add_((1 - beta2) * g * g)
                update = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if self.adam_w_mode == 1:
                    update = update + decay * p
                ratio = group["lr"]
                if self.use_nvlamb or decay != 0.0:
                    p_norm, u_norm = p.norm(), update.norm()
                    if p_norm != 0 and u_norm != 0:
                        ratio = group["lr"] * (p_norm / u_norm)
                p.grad.copy_(update)  # apex writes the update into the gradient's memory
                p.sub_(ratio * update)
        return loss
