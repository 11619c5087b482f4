"""Moving stage 2's small host-side values to the batch's device without making the host wait.

Stage 2 draws its per-sample choices on the host (a CPU generator, so a seed gives the same
augmentations on CPU and CUDA) and sends small tensors of arguments to the device. On CUDA a
plain ``t.to(device)`` of a host tensor is a ``cudaMemcpy`` followed by ``cudaStreamSynchronize``
(torch's ``memcpy_and_sync``): the host stops until the GPU has finished everything queued so far,
so it can no longer prepare the next step while this one runs. ``to_device`` copies from pinned
memory with ``non_blocking=True`` instead (torch's caching host allocator keeps the pinned block
alive until the copy has run, so the host tensor may be dropped at once). Constants that never
change (normalization statistics, fill colours) are made once per device by ``constant``.

``torch.tensor(values, device=cuda)`` is a blocking copy too; use ``constant`` for fixed values.
"""
from __future__ import annotations

import functools

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: a pinned, non-blocking copy from the host to CUDA (no host sync); ``t``
    itself when it is already there."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def constant(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A read-only constant tensor of ``values`` on ``device``, made once per (values, dtype,
    device) and shared: never modify it in place."""
    return _constant(tuple(values), dtype, torch.device(device))
