"""Each backend's batch reaches the step with only the copies we mean: a count, not a time.

A stage-1 batch handed out in another memory layout than stage 2 expects (NCHW instead of
channels_last), or a stage 2 that copies its input "to be safe", costs a whole-batch copy per step:
at 224 px and batch 256 that is 38 MB of uint8 (150 MB as float) per step, invisible in any test
that checks values. Counted at torch's dispatcher (every aten op, also those inside ``.contiguous()``
or ``.to()``) from the moment the pipeline is asked for a batch until stage 2 returns the step's
input: the ops that copy a whole batch (``clone``, ``copy_``, ``_to_copy``, ``contiguous``).

What is meant, per stage-2 backend (``pipelines/augment``):

* ``cpu-kernels`` (CPU training): none through torch; the compiled loops write RandAugment's result
  and the normalized batch into pooled buffers.
* ``torch`` (CUDA training, run here on CPU): two; RandAugment's output (a ``clone`` whose groups of
  images are then overwritten in place) and normalization's uint8 -> float conversion (``copy_``).

Stage 1's own work (decoding into FFCV's or DALI's buffers, the reference's collate in its worker
processes) happens before the batch exists and is not counted; the batch it hands out must not be
copied again in the training process.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common.config import load_config
from pipelines.build import build_stage2, build_train_pipeline

aten = torch.ops.aten
COPIES = {aten.clone.default, aten.copy_.default, aten._to_copy.default, aten.contiguous.default}
MEANT = {"cpu-kernels": 0, "torch": 2}
BATCH, RES = 32, 32


class WholeBatchCopies(TorchDispatchMode):
    """Counts the copy ops whose result holds at least ``numel`` elements (a whole batch)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COPIES and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.seen.append(str(func))
        return out


@pytest.mark.ffcv
@pytest.mark.dali
@pytest.mark.parametrize("backend", ["reference", "ffcv", "dali"])
def test_a_batch_reaches_the_step_with_only_the_copies_we_mean(fmnist_converted, backend):
    cfg = load_config("recipes/a3.toml", [f"data.root={fmnist_converted}", f"data.pipeline={backend}",
                                          "data.num_classes=10", "data.workers=2"])
    pipe = build_train_pipeline(cfg.data, cfg.augment, res=RES, batch_size=BATCH, rank=0, world_size=1,
                                device=torch.device("cpu"), seed=0)
    pipe.set_epoch(0, RES)
    batches = iter(pipe)
    next(batches)  # start-up (workers, FFCV's compile) and the pools' first buffers are not per step
    found = {}
    for stage2_backend in MEANT:
        stage2 = build_stage2(cfg.data, cfg.augment, train=True)  # the recipe's RandAugment and mixup/CutMix
        stage2.backend = stage2_backend
        stage2(next(batches))  # its buffers exist from now on, as after a training run's first step
        with WholeBatchCopies(BATCH * 3 * RES * RES) as count:
            batch = next(batches)
            images, _ = stage2(batch)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        assert images.is_contiguous(memory_format=torch.channels_last) and images.dtype == torch.float32
        found[stage2_backend] = count.seen
    del batches, pipe
    assert {k: len(v) for k, v in found.items()} == MEANT, found
