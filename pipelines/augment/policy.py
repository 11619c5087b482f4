"""RandAugment policies from timm's config strings, e.g. ``rand-m7-mstd0.5-inc1``.

RandAugment (Cubuk et al. 2020, https://arxiv.org/abs/1909.13719) applies ``n`` ops drawn
uniformly (with replacement) from a fixed list, all at one global magnitude ``m``. The string
grammar and the op lists follow timm ``timm/data/auto_augment.py::rand_augment_transform``:

==========  ========================================================================
``m``       magnitude on a 0..10 scale (default 10)
``n``       ops per image (default 2)
``p``       probability each chosen op is applied (default 0.5)
``mstd``    std of Gaussian noise added to the magnitude per op call; > 100 means
            uniform in [0, m] (timm's "inf")
``mmax``    upper clip for the noisy magnitude (default 10)
``inc``     1 = the "increasing" op variants, whose strength grows with magnitude
==========  ========================================================================

The fill colour and translate range follow timm's ``create_transform``: fill is the ImageNet
mean in 0..255, translation is relative, up to 45 % of the image side at magnitude 10.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from common.config import TRAIN_INTERPOLATIONS

LEVEL_DENOM = 10.0  # magnitudes are on a 0..10 scale

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), timm's img_mean hparam


@dataclass(frozen=True)
class RandAugmentPolicy:
    ops: tuple[str, ...] = OPS
    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # float('inf') = uniform in [0, magnitude]
    magnitude_max: float = LEVEL_DENOM
    # Geometric ops' resampling. timm's train.py default ('--train-interpolation random')
    # picks bilinear or bicubic at random per op call; a fixed one can be chosen.
    interpolation: str = "random"
    fill: tuple[int, int, int] = IMAGENET_FILL
    translate_pct: float = 0.45

    def scaled(self, scale: float) -> "RandAugmentPolicy":
        """The same policy at ``scale`` times the magnitude (progressive regularization)."""
        return dataclasses.replace(self, magnitude=self.magnitude * scale)


def parse_rand_augment(config: str, *, interpolation: str = "random") -> RandAugmentPolicy:
    """Parse a timm RandAugment string. Unknown sections raise ``ValueError`` (timm asserts)."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
    if interpolation not in TRAIN_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {TRAIN_INTERPOLATIONS}, got {interpolation!r}")
    kw: dict = {"interpolation": interpolation}
    increasing = False
    for part in parts[1:]:
        if part.startswith("t"):
            # Weighted / 3-Augment op sets exist in timm but no ResNet recipe uses them.
            raise ValueError(f"RandAugment transform set {part!r} is not supported (only the default set)")
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if m is None:
            continue  # timm ignores sections without a numeric value
        key, val = m.groups()
        if key == "mstd":
            std = float(val)
            kw["magnitude_std"] = float("inf") if std > 100 else std
        elif key == "mmax":
            kw["magnitude_max"] = float(int(val))
        elif key == "inc":
            increasing = bool(int(val))
        elif key == "m":
            kw["magnitude"] = float(int(val))
        elif key == "n":
            kw["num_layers"] = int(val)
        elif key == "p":
            kw["prob"] = float(val)
        else:
            raise ValueError(f"unknown RandAugment config section {part!r} in {config!r}")
    return RandAugmentPolicy(ops=OPS_INCREASING if increasing else OPS, **kw)
