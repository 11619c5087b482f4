"""Optimizers: LAMB (multi-tensor), SGD with momentum, AdamW; weight-decay parameter groups.

LAMB is from You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes" (arXiv:1904.00962), in the NVLAMB form used by apex ``FusedLAMB`` and timm's ``Lamb``
(timm/optim/lamb.py), the optimizer of "ResNet strikes back" (Wightman et al. 2021). Behaviour
matches timm's ``Lamb`` with its defaults, which the tests check to 1e-5 over 100 ResNet-50 steps:

- the global L2 norm of all gradients (every group) is clipped to ``max_grad_norm`` (1.0) inside
  the optimizer, without changing ``p.grad``;
- Adam moments with grad averaging (``m = b1 m + (1 - b1) g``) and bias correction;
- the weight decay is added to the Adam direction (not to the gradient, not to the weights);
- the layer-wise trust ratio ``||w|| / ||update||`` (1 where either norm is 0) is applied only in
  groups with weight decay != 0 unless ``always_adapt``: norms and biases take plain Adam steps.

Why our own: on CPU timm's ``Lamb`` runs one parameter at a time and allocates full-size
temporaries per op. This version runs each op over a list of tensors (``torch._foreach_*``), in
chunks of whole parameters small enough that the dozen passes of an update stay in the CPU cache
(timm chunks by the GPU's L2 for the same reason), folds bias correction and (on CPU) the clip
factor into scalars; on CUDA the clip factor stays on the device (no host sync). On CUDA with apex
importable, apex ``FusedLAMB`` (multi-tensor kernels) is used instead.

apex's ``FusedLAMB`` (NVIDIA/apex ``apex/optimizers/fused_lamb.py``) differs from torch optimizers
in ways the engine must respect: ``zero_grad(self)`` takes no ``set_to_none`` argument (the engine
clears grads with :func:`clear_grads`, which works for every optimizer), its ``step`` overwrites
``p.grad`` with the update (nothing reads grads after the step), and its param groups carry
``max_grad_norm`` but not ``always_adapt``. Its state (per-parameter ``exp_avg``/``exp_avg_sq``,
an integer ``step`` per group) means the same as ours, so a checkpoint written with either loads
into the other: :class:`Lamb` fills the keys apex does not store (``__setstate__``), and apex reads
only keys both write.

Weight decay groups follow the rule ``param.ndim <= 1`` -> no decay (every norm weight and every
bias), never a name test: ``'bn' in name`` misses torchvision's ``downsample.1`` BatchNorm.

Parameters must be float32 (AMP keeps fp32 master weights; fp16/bf16 are only for activations):
the squared gradients of the second moment and the norms would overflow or lose the update in
half precision. Grads are therefore fp32 too; non-finite fp16 grads are caught by GradScaler,
which skips ``step()``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from common.config import OptimConfig

# Elements per chunk of whole parameters on CPU: p, g, m, v and two temporaries of ~1 MiB each
# stay in L2/L3 between the passes of one update. Measured on a 2-core EPYC (benchmarks/bench_optim.py).
CPU_CHUNK_ELEMS = 1 << 18


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay for tensors with ndim >= 2 (conv/linear weights), none for
    ndim <= 1 (norm weights and biases, whatever the module is called). Frozen params are left
    out; an empty group is dropped."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _apex_fused_lamb():
    """apex's FusedLAMB class when apex is installed (optional, CUDA only), else None."""
    try:
        from apex.optimizers import FusedLAMB  # type: ignore[import-not-found]
    except Exception:  # ImportError, or an apex built against another torch/CUDA
        return None
    return FusedLAMB


def uses_apex(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "FusedLAMB"


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """Drop every gradient (``set_to_none``), for any optimizer: apex's ``FusedLAMB.zero_grad``
    takes no arguments, so ``optimizer.zero_grad(set_to_none=True)`` raises ``TypeError`` there."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _all_on_cuda(groups: list[dict[str, Any]]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over :func:`param_groups` of ``model``.

    - ``lamb``: apex ``FusedLAMB`` when apex imports and every param is on CUDA, else :class:`Lamb`.
      ``max_grad_norm = 0`` turns the internal clip off.
    - ``sgd``: torch SGD, momentum, optional Nesterov, L2 weight decay (ResNet-RS, ffcv-imagenet).
    - ``adamw``: torch AdamW (decoupled weight decay).
    SGD/AdamW use torch's fused kernels on CUDA and the foreach implementation elsewhere.
    """
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = _all_on_cuda(groups)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    impl = {"fused": True} if on_cuda else {"foreach": True}
    if cfg.name == "lamb":
        fused_lamb = _apex_fused_lamb() if on_cuda else None
        if fused_lamb is not None:
            # adam_w_mode=True adds the decay to the Adam direction (as timm and LAMB do);
            # use_nvlamb=False skips the trust ratio where weight decay is 0, as timm does.
            return fused_lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                              bias_correction=True, grad_averaging=True, adam_w_mode=True, use_nvlamb=False,
                              max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **impl)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl)
    raise ValueError(f"optim.name = {cfg.name!r} is not one of lamb, sgd, adamw")


def _chunks(params: list[Tensor], budget: int) -> Iterable[list[int]]:
    """Indices of consecutive whole params with at most ``budget`` elements per chunk (a larger
    param is a chunk of its own). ``budget <= 0``: one chunk."""
    if budget <= 0:
        yield list(range(len(params)))
        return
    chunk, size = [], 0
    for i, p in enumerate(params):
        if chunk and size + p.numel() > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += p.numel()
    if chunk:
        yield chunk


class Lamb(torch.optim.Optimizer):
    """LAMB with timm ``Lamb`` semantics (see the module docstring), multi-tensor.

    Args:
        params: parameters or groups (use :func:`param_groups` for the no-decay rule).
        lr: learning rate; the schedule sets ``group['lr']`` every step.
        betas: decay of the first and second moments.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: added to the update as ``weight_decay * w`` before the trust ratio.
        max_grad_norm: global gradient-norm clip applied inside ``step`` (None = off).
        grad_averaging: ``m = b1 m + (1 - b1) g`` when True, ``m = b1 m + g`` when False.
        bias_correction: Adam bias correction of both moments.
        always_adapt: apply the trust ratio in weight-decay-free groups too (timm default False).
        chunk_elems: elements per cache-sized chunk; None = CPU default on CPU, one chunk on CUDA.
        clip_on_host: read the global clip factor on the host (True: cheaper on CPU, a host sync
            on CUDA) or keep it a device tensor (False); None = on the host only for CPU params.
    """

    # Group keys apex's FusedLAMB does not store, with the values its behaviour corresponds to
    # (adam_w_mode=True, use_nvlamb=False), filled in when loading its state.
    _GROUP_DEFAULTS = {"always_adapt": False, "grad_averaging": True, "bias_correction": True, "step": 0}

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float | None = 1.0, grad_averaging: bool = True,
                 bias_correction: bool = True, always_adapt: bool = False, chunk_elems: int | None = None,
                 clip_on_host: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"Lamb: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, grad_averaging=grad_averaging,
                        bias_correction=bias_correction, always_adapt=always_adapt, step=0)
        super().__init__(params, defaults)
        # Global, not per group: the clip factor is computed over the grads of every group (timm, apex).
        self.max_grad_norm = max_grad_norm
        self.chunk_elems = chunk_elems
        self.clip_on_host = clip_on_host
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise TypeError(f"Lamb keeps fp32 weights and moments; got a {p.dtype} parameter of shape "
                                    f"{tuple(p.shape)} (use AMP autocast, not model.half())")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by ``load_state_dict``: groups saved by apex's FusedLAMB lack our keys."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            group["betas"] = tuple(group["betas"])

    def _clip_divisor(self) -> Tensor | None:
        """max(1, ||all grads|| / max_grad_norm) as a 0-dim device tensor (no host sync), or None."""
        if not self.max_grad_norm:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (total / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor: Tensor | float | None = self._clip_divisor()
        host = self.clip_on_host if self.clip_on_host is not None else divisor is not None and divisor.is_cpu
        if divisor is not None and host:
            # On CPU reading the clip factor costs nothing: it is folded into the moment updates
            # (no pass over the grads; none at all when nothing is clipped). On CUDA it stays a
            # device tensor that the grads are divided by, to avoid a host sync per step.
            divisor = float(divisor)
        for group in self.param_groups:
            group["step"] += 1  # per group, also when it has no grads this step (as timm)
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params, divisor)
        return loss

    def _update_group(self, group: dict[str, Any], params: list[Tensor], divisor: Tensor | float | None) -> None:
        beta1, beta2 = group["betas"]
        step = group["step"]
        bc1 = 1.0 - beta1 ** step if group["bias_correction"] else 1.0
        bc2 = 1.0 - beta2 ** step if group["bias_correction"] else 1.0
        # m_hat / (sqrt(v_hat) + eps) == scale * m / (sqrt(v) + eps * sqrt(bc2)): the bias
        # corrections become two scalars instead of two passes over every tensor.
        scale = math.sqrt(bc2) / bc1
        eps = group["eps"] * math.sqrt(bc2)
        lr, wd = group["lr"], group["weight_decay"]
        adapt = wd != 0 or group["always_adapt"]
        m_weight = 1.0 - beta1 if group["grad_averaging"] else 1.0

        grads = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            grads.append(p.grad)
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        clip_on_device = isinstance(divisor, Tensor)
        inv_clip = 1.0 / divisor if isinstance(divisor, float) else 1.0
        budget = self.chunk_elems
        if budget is None:
            budget = CPU_CHUNK_ELEMS if params[0].device.type == "cpu" else 0
        for idx in _chunks(params, budget):
            p_c = [params[i] for i in idx]
            g_c = [grads[i] for i in idx]
            m_c = [exp_avgs[i] for i in idx]
            v_c = [exp_avg_sqs[i] for i in idx]
            if clip_on_device:
                g_c = torch._foreach_div(g_c, divisor)  # a copy: p.grad stays as autograd left it
            if group["grad_averaging"] and inv_clip == 1.0:
                torch._foreach_lerp_(m_c, g_c, m_weight)
            else:
                torch._foreach_mul_(m_c, beta1)
                torch._foreach_add_(m_c, g_c, alpha=m_weight * inv_clip)
            torch._foreach_mul_(v_c, beta2)
            torch._foreach_addcmul_(v_c, g_c, g_c, value=(1.0 - beta2) * inv_clip * inv_clip)
            denom = torch._foreach_sqrt(v_c)
            torch._foreach_add_(denom, eps)
            update = torch._foreach_div(m_c, denom)
            if wd != 0:
                torch._foreach_add_(update, p_c, alpha=wd / scale)  # decay inside the (unscaled) update
            if adapt:
                w_norm = torch.stack(torch._foreach_norm(p_c))
                u_norm = torch.stack(torch._foreach_norm(update)) * scale
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                torch._foreach_addcmul_(p_c, update, list((trust * (-lr * scale)).unbind(0)))
            else:
                torch._foreach_add_(p_c, update, alpha=-lr * scale)
