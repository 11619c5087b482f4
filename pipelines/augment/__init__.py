"""Stage 2: batched augmentation on torch tensors, on the batch's device (see stage2.py)."""
from .erasing import random_erasing
from .mixup import MixParams, apply_mix, draw_mix_params, mix_targets, mixup_cutmix, sample_mix_params, smooth_one_hot
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from .policy import RandAugmentPolicy, parse_rand_augment
from .randaugment import RandAugmentParams, apply_params, rand_augment_batch, sample_params
from .stage2 import Stage2

__all__ = ["Stage2", "RandAugmentPolicy", "parse_rand_augment", "rand_augment_batch", "sample_params",
           "apply_params", "RandAugmentParams", "normalize", "IMAGENET_MEAN", "IMAGENET_STD", "mixup_cutmix",
           "sample_mix_params", "draw_mix_params", "apply_mix", "mix_targets", "smooth_one_hot", "MixParams", "random_erasing"]
