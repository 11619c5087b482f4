"""uint8 -> normalized float (or bf16), channels_last, converted and scaled in one go.

``(x / 255 - mean) / std`` is written as ``x * (1 / (255 std)) + (-mean / std)``: one
conversion copy into the output (allocated in the wanted dtype and memory format), then one
in-place ``addcmul``. On CPU the layout decides the cost, not the arithmetic (measured for
``benchmarks/results/augment_cpu.md``): a per-channel ``[1, 3, 1, 1]`` constant on a
channels_last tensor broadcasts over an innermost dimension of 3, which does not vectorise
(the former ``mul_``/``add_`` pair cost ~5x a plain pass), so the NHWC output is viewed as
rows of ``W * 3`` values with the constants repeated along a row. What remains is the copy
itself, and for a fresh 38 MB float32 batch mostly the kernel's page faults on first touch.

On CUDA the same code is a few bandwidth-bound elementwise kernels. On CPU (numba installed,
channels_last output) one compiled pass (``cpu_kernels.normalize_mix``) reads the uint8 batch
and writes the output once, with mixup/CutMix folded in when the caller passes its draws
(``mix``); the torch path applies those with ``mixup.apply_mix`` afterwards, same result up to
float rounding. ImageNet statistics as timm's ``IMAGENET_DEFAULT_MEAN/STD``.

The per-channel scale and shift are computed once per (mean, std) on the host and kept on each
device (``_scale_shift``): a ``torch.tensor(..., device=cuda)`` per call would be a blocking copy.
"""
from __future__ import annotations

import torch

import functools

from . import cpu_kernels as K
from .buffers import BufferPool
from .mixup import MixParams, apply_mix
from .randaugment import resolve_backend
from .transfer import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32,
              channels_last: bool = True, *, mix: MixParams | None = None, backend: str = "auto",
              pool: BufferPool | None = None) -> torch.Tensor:
    """Normalize a uint8 batch [N, C, H, W]; ``mean``/``std`` on the 0..1 scale. With ``mix``
    (``mixup.draw_mix_params``), the result is also mixed with the flipped batch. With ``pool``,
    the CPU kernel writes into a recycled float32 buffer when one is free (``buffers.py``)."""
    n, c, h, w = x.shape
    scale, shift = _scale_shift(tuple(mean), tuple(std), x.device)
    if channels_last and c == 3 and resolve_backend(backend, x.device) == "cpu-kernels":
        x = x.contiguous(memory_format=torch.channels_last)  # no copy when stage 1 made it so
        buf = pool.empty(x.shape, torch.float32) if pool is not None else None
        out = K.normalize_mix(x, scale, shift, *((mix.lam, mix.cutmix, mix.boxes) if mix is not None else ()), out=buf)
        return out if dtype == torch.float32 else out.to(dtype)
    if mix is not None:
        return apply_mix(normalize(x, mean, std, dtype, channels_last, backend="torch"), mix, inplace=True)
    if dtype != torch.float32:
        # bf16/fp16: do the arithmetic in float32 and round once, not after each step (a
        # type-promoting addcmul straight into bf16 measured slower than this on CPU).
        return normalize(x, mean, std, torch.float32, channels_last).to(dtype)
    if not channels_last:
        out = x.contiguous().float()
        return out.mul_(scale.view(1, c, 1, 1)).add_(shift.view(1, c, 1, 1))
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)
    out.copy_(x)  # from NCHW uint8 as fast as transposing the uint8 batch first (measured)
    rows = out.permute(0, 2, 3, 1).view(n * h, w * c)  # the NHWC memory, one image row per row
    torch.addcmul(shift.repeat(w), rows, scale.repeat(w), out=rows)  # one pass, in place
    return out


@functools.lru_cache(maxsize=16)
def _scale_shift(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 / (255 std)`` and ``-mean / std`` as float32 [C] tensors on ``device``, computed in
    float32 on the host (so every device gets the same values) and copied once. Shared: read only."""
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    return to_device(1.0 / (255.0 * s), device), to_device(-m / s, device)
