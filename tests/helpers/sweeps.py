"""The tiny trial recipe the sweep tests share (tests/test_sweep.py, tests/test_sweep_adaptive.py)."""
from __future__ import annotations

import json

# resnet_tiny through the reference pipeline; 2 optimizer steps of 32 images and an eval of the
# 160 val images: each trial is a real engine run that costs little more than its imports. Residual
# branches start non-zero (zero_init_last off) so two steps already separate the trials' top-1.
FIXED = {"model.arch": "resnet_tiny", "model.zero_init_last": False, "data.pipeline": "reference", "data.num_classes": 10, "data.workers": 0,
         "train.global_batch_size": 32, "train.train_res": 32, "train.precision": "fp32", "train.log_every": 1,
         "eval.res": 32, "eval.crop_pct": 1.0, "eval.batch_size": 160, "optim.warmup_epochs": 0.0,
         "augment.rand_augment": "", "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0,
         "checkpoint.every_minutes": 0.0, "log.wandb": "off"}


def toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()
