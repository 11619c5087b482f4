"""Batched RandAugment: every image of a uint8 batch gets its own ops and magnitudes.

Semantics are timm's ``RandAugment``/``AugmentOp`` (``timm/data/auto_augment.py``), after
Cubuk et al. 2020 (https://arxiv.org/abs/1909.13719): for each of ``n`` layers an op is drawn
uniformly with replacement; it runs with probability ``p``; its magnitude is ``m`` plus
Gaussian noise ``mstd`` (or uniform in [0, m]), clipped to [0, mmax]; signed ops (rotate,
shear, translate, the "increasing" enhancements) flip sign with probability 1/2.

Batched: the per-sample choices are drawn first (``sample_params``), on a CPU generator, as
small [layers, N] tensors. The pixel work then loops over *ops*, never images: each op runs
once on the subset of samples that drew it. Translate and shear move pixels along one axis
only, so they are resampled as rows (``ops.shift_resample``: a few gathered taps with PIL's
bilinear/bicubic weights); Rotate uses one ``grid_sample`` per interpolation mode. Because
the choices live on the host, the subset sizes are known without a device sync, and a given
seed gives the same choices on CPU and CUDA. The number of kernels a call launches depends on
the op list and the layers, not on the batch size (``tests/test_host_syncs.py`` counts them).

Two backends run the pixel work. ``torch`` (CUDA, or anywhere) is the code described above.
``cpu-kernels`` (the default for CPU batches when numba is installed) runs each layer as one
parallel loop of compiled uint8 ops, in place on the channels_last batch (``cpu_kernels.py``);
the op arguments, the tables of the table ops and Rotate's matrix come from the same ``ops.py``
functions, and the resampling kernels mirror ``ops.py``'s arithmetic, so both backends give the
same pixels up to float rounding in the resampling ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_kernels as K
from . import ops as O
from .policy import LEVEL_DENOM, RandAugmentPolicy
from .transfer import to_device


@dataclass
class RandAugmentParams:
    """Per-layer, per-sample choices; all CPU tensors of shape [num_layers, N]."""

    op: torch.Tensor  # int64 index into policy.ops
    apply: torch.Tensor  # bool, the op's probability test passed
    magnitude: torch.Tensor  # float64, after noise and clipping
    sign: torch.Tensor  # float64, +1 / -1 for signed ops
    bicubic: torch.Tensor  # bool, geometric ops resample bicubic (else bilinear)


def sample_params(n: int, policy: RandAugmentPolicy, generator: torch.Generator) -> RandAugmentParams:
    shape = (policy.num_layers, n)
    g = generator
    op = torch.randint(len(policy.ops), shape, generator=g)
    apply = torch.rand(shape, generator=g, dtype=torch.float64) <= policy.prob
    m = torch.full(shape, float(policy.magnitude), dtype=torch.float64)
    if policy.magnitude_std == float("inf"):
        m = torch.rand(shape, generator=g, dtype=torch.float64) * policy.magnitude
    elif policy.magnitude_std > 0:
        m = m + policy.magnitude_std * torch.randn(shape, generator=g, dtype=torch.float64)
    m = m.clamp(0.0, policy.magnitude_max or LEVEL_DENOM)
    sign = torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0).double()
    if policy.interpolation == "random":
        bicubic = torch.rand(shape, generator=g) < 0.5
    else:
        bicubic = torch.full(shape, policy.interpolation == "bicubic")
    return RandAugmentParams(op, apply, m, sign, bicubic)


def op_argument(name: str, m: torch.Tensor, sign: torch.Tensor, h: int, w: int,
                policy: RandAugmentPolicy) -> torch.Tensor:
    """The op argument timm's ``LEVEL_TO_ARG`` gives for magnitudes ``m`` (float64 [k]).
    Geometric ops get their [k, 2, 3] PIL affine matrix."""
    level = m / LEVEL_DENOM
    base = name.replace("Increasing", "")
    increasing = name.endswith("Increasing")
    if name == "Rotate":
        return O.rotate_matrix(level * 30.0 * sign, h, w)
    if name in ("ShearX", "ShearY"):
        return O.shear_matrix(level * 0.3 * sign, name[-1].lower())
    if name == "TranslateXRel":
        return O.translate_matrix(level * policy.translate_pct * sign * w, "x")
    if name == "TranslateYRel":
        return O.translate_matrix(level * policy.translate_pct * sign * h, "y")
    if base == "Posterize":
        bits = torch.floor(level * 4)
        return 4 - bits if increasing else bits
    if base == "Solarize":
        thresh = torch.floor(level * 256).clamp(max=256)
        return 256 - thresh if increasing else thresh
    if name == "SolarizeAdd":
        return torch.floor(level * 110).clamp(max=128)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        if increasing:  # 1.0 is "no change"; move away from it either way
            return (1.0 + sign * level * 0.9).clamp(min=0.1)
        return level * 1.8 + 0.1
    return m  # AutoContrast, Equalize, Invert take no argument


BACKENDS = ("auto", "torch", "cpu-kernels")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> the compiled CPU loops for CPU tensors when numba is there, else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"augmentation backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cpu-kernels" if device.type == "cpu" and K.AVAILABLE else "torch"
    if backend == "cpu-kernels" and (device.type != "cpu" or not K.AVAILABLE):
        raise ValueError("the cpu-kernels augmentation backend needs a CPU batch and numba (pip install numba)")
    return backend


def apply_params(x: torch.Tensor, params: RandAugmentParams, policy: RandAugmentPolicy,
                 backend: str = "auto", pool=None) -> torch.Tensor:
    """Apply drawn choices to uint8 ``x`` [N, 3, H, W]; returns a new tensor, NCHW-contiguous
    from the torch backend and channels_last from the cpu-kernels backend.

    Contiguous because gathering and scattering whole images is then a memcpy per image
    (``index_put`` into channels_last memory was the slowest step on CPU); ``normalize`` makes
    the channels_last output from it."""
    if resolve_backend(backend, x.device) == "cpu-kernels":
        return _apply_with_cpu_kernels(x, params, policy, pool)
    out = x.contiguous() if not x.is_contiguous() else x.clone()
    h, w = x.shape[-2:]
    for layer in range(params.op.shape[0]):
        chosen = torch.where(params.apply[layer], params.op[layer], -1)
        geo_idx, geo_mat, geo_cubic = [], [], []
        for k, name in enumerate(policy.ops):
            sel = (chosen == k).nonzero().flatten()  # CPU tensor: no device sync
            if sel.numel() == 0:
                continue
            arg = op_argument(name, params.magnitude[layer, sel], params.sign[layer, sel], h, w, policy)
            if name in O.SHIFT_OPS:  # translate / shear: 1-D resampling, PIL's own kernels
                axis, shift = O.row_shifts(arg, h, w)
                cubic = params.bicubic[layer, sel]
                for mode, pick in (("bilinear", ~cubic), ("bicubic", cubic)):
                    if pick.any():
                        _apply_to(out, sel[pick], lambda s, sh=shift[pick], m=mode: O.shift_along(
                            s, sh, axis, policy.fill, m))
                continue
            if name in O.GEOMETRIC_OPS:
                geo_idx.append(sel)
                geo_mat.append(arg)
                geo_cubic.append(params.bicubic[layer, sel])
                continue
            _apply_to(out, sel, lambda s, fn=O.POINT_OPS[name], a=arg: fn(s, a))
        if geo_idx:
            idx, mat, cubic = torch.cat(geo_idx), torch.cat(geo_mat), torch.cat(geo_cubic)
            for mode, pick in (("bilinear", ~cubic), ("bicubic", cubic)):
                if pick.any():
                    _apply_to(out, idx[pick], lambda s, mt=mat[pick], m=mode: O.affine(s, mt, policy.fill, m))
    return out


def _apply_with_cpu_kernels(x: torch.Tensor, params: RandAugmentParams, policy: RandAugmentPolicy,
                            pool=None) -> torch.Tensor:
    """The same ops, each in place on its samples of a channels_last copy, a layer at a time.

    Each op's arguments and tables are computed once for its samples in all layers
    (``cpu_kernels.OpPlan``); the tables that depend on the image (Contrast, Equalize,
    AutoContrast) are built per layer from statistics of the image as the previous layer left
    it; then one parallel kernel runs the whole layer."""
    out = K.copy_into(x, pool.empty(x.shape, torch.uint8) if pool is not None
                      else torch.empty_like(x, memory_format=torch.channels_last))
    layers, n = params.op.shape
    h, w = x.shape[-2:]
    plan = K.OpPlan(K.nhwc(out), layers, policy.fill)
    chosen = torch.where(params.apply, params.op, -1).flatten()  # row = layer * n + sample
    order = torch.argsort(chosen, stable=True)  # rows grouped by op
    counts = torch.bincount(chosen + 1, minlength=len(policy.ops) + 1).tolist()
    magnitude, sign, bicubic = params.magnitude.flatten(), params.sign.flatten(), params.bicubic.flatten()
    from_image = []  # (name, rows, argument): tables built per layer from image statistics
    start = counts[0]  # counts[0]: the rows whose op did not fire
    for k, name in enumerate(policy.ops):
        rows, start = order[start:start + counts[k + 1]], start + counts[k + 1]
        if not rows.numel():
            continue
        arg = op_argument(name, magnitude[rows], sign[rows], h, w, policy)
        r = rows.numpy()
        if name in O.VALUE_OPS:
            plan.lut(r, O.value_lut(O.POINT_OPS[name], arg, len(r)))
        elif name.startswith("Contrast") or name in ("Equalize", "AutoContrast"):
            from_image.append((name, r, arg))
        elif name.startswith("Color"):
            plan.color(r, arg)
        elif name.startswith("Sharpness"):
            plan.sharpness(r, arg)
        elif name in O.SHIFT_OPS:  # translate / shear along x or y: 1-D resampling of lines
            plan.shift(r, arg, "x" if name in ("ShearX", "TranslateXRel") else "y", bicubic[rows])
        elif name == "Rotate":
            plan.affine(r, arg, bicubic[rows])
        else:
            raise AssertionError(f"no CPU kernel for {name}")
    for layer in range(layers):
        for name, r, arg in from_image:
            here = (r >= layer * n) & (r < (layer + 1) * n)
            if not here.any():
                continue
            rows, images = r[here], r[here] - layer * n
            if name.startswith("Contrast"):
                level = O.contrast_level(torch.from_numpy(plan.grey_sums(images)), h * w)
                plan.lut(rows, O.contrast_lut(level, arg[torch.from_numpy(here)]))
            elif name == "Equalize":
                plan.lut(rows, O.equalize_lut(torch.from_numpy(plan.histograms(images))))
            else:  # AutoContrast
                plan.lut(rows, O.autocontrast_lut(*O.occupied_range(torch.from_numpy(plan.histograms(images)))))
        plan.run_layer(layer)
    return out


def _apply_to(out: torch.Tensor, sel: torch.Tensor, op) -> None:
    """``out[sel] = op(out[sel])`` for the samples ``sel`` (a CPU index tensor): one gather, the
    op, one ``index_copy_``, whatever the number of samples (on a GPU each is one kernel launch).
    The index list goes over as a pinned non-blocking copy (no host sync)."""
    sel_d = to_device(sel, out.device)
    out.index_copy_(0, sel_d, op(out.index_select(0, sel_d)))


def rand_augment_batch(x: torch.Tensor, policy: RandAugmentPolicy, generator: torch.Generator,
                       backend: str = "auto", pool=None) -> torch.Tensor:
    """RandAugment on a uint8 batch [N, 3, H, W] (any device); ``generator`` is a CPU generator.
    ``pool`` (a ``buffers.BufferPool``) lets the CPU kernels write into a recycled buffer."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    return apply_params(x, sample_params(x.shape[0], policy, generator), policy, backend, pool)
