"""``train.precision = "auto"``: what each device does best, and nothing a device cannot do.

* CUDA with native bf16 (compute capability 8.0+: A100, H100, H200, L4, RTX 30xx/40xx): ``bf16``
  autocast, no loss scaling (timm's ``--amp-dtype bfloat16``).
* CUDA without it (V100, T4: capability 7.x): ``fp16`` autocast with dynamic loss scaling
  (GradScaler), which is how "ResNet strikes back" itself trained (Wightman et al. 2021, V100s).
* CPU: ``fp32``. CPU autocast exists, but on most CPUs bf16 matmuls are emulated and slower, and a
  silently low-precision CPU run surprises a user comparing it with a GPU run.

An explicit ``bf16`` on a CUDA device without native bf16 is refused (one line): torch would
emulate it, many times slower. An explicit ``bf16``/``fp16`` on CPU is honoured with one warning.
"""
from __future__ import annotations

from typing import Callable

import torch

from common.config import ConfigError


def native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(requested: str, device: torch.device, warn: Callable[[str], None] = print) -> str:
    """The precision to train and evaluate with on ``device`` for ``train.precision=requested``."""
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"train.precision=bf16 but {name} has no native bf16 (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}); use "
                          f"train.precision=auto (fp16 with loss scaling here) or fp16")
    if requested in ("bf16", "fp16") and device.type == "cpu":
        warn(f"warning: train.precision={requested} on CPU: autocast there is slow on most CPUs and differs "
             f"from a GPU run's numerics; train.precision=auto picks fp32 on CPU")
    return requested
