"""fp16 (V100) divergence is seen: GradScaler skips steps whose gradients overflow, so an occasional
non-finite loss is normal there, but a log window with no finite loss, or a loss scale collapsed below
its floor (every step skipped), is a diverged run and stops it (exit 3), as NaN does in bf16/fp32.

The engine's own step and epoch (``engine.step.train_one_epoch``, the step context ``build_step`` makes for
fp16) with fp16 semantics on the CPU: autocast to float16 and an enabled ``torch.amp.GradScaler("cpu")``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import load_config
from engine.losses import build_loss
from engine.optim import build_optimizer
from engine.schedule import build_schedule
from engine.state import EpochProgress, NonFiniteLossError
from engine.step import MIN_LOSS_SCALE, StepContext, train_one_epoch
from pipelines.base import Batch

STEPS = 40


class _Feed:
    def __init__(self, n: int, fill: float | None = None):
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(n):
            x = torch.rand(8, 3, 16, 16, generator=g)
            if fill is not None:
                x.fill_(fill)
            self.batches.append(Batch(x, torch.randint(0, 10, (8,), generator=g)))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _identity_stage2(batch):
    return batch.images, nn.functional.one_hot(batch.labels, 10).float()


class _InfGrad(torch.autograd.Function):
    """The identity forward; its backward is +inf everywhere: gradients that overflow at every scale."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class _Overflowing(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return _InfGrad.apply(self.inner(x))


def _fp16_context():
    """The engine's step context for fp16 (GradScaler on), around a small conv net: the step code is
    what is tested, and a small model keeps fp16 autocast on the CPU (slow) to a second."""
    cfg = load_config("recipes/a3.toml", ["data.num_classes=10", "train.precision=fp16", "optim.warmup_epochs=0"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    ctx = StepContext(model=model, raw_model=model, optimizer=build_optimizer(model, cfg.optim),
                      loss_fn=build_loss(cfg.loss, 10), lr_at=build_schedule(cfg.optim, cfg.train.epochs, STEPS),
                      scaler=torch.amp.GradScaler("cpu", enabled=True), precision="fp16",
                      device=torch.device("cpu"))
    return cfg, ctx


def _run(ctx, feed, log_every=10):
    prog = EpochProgress()
    return prog, list(train_one_epoch(ctx, feed, _identity_stage2, prog, steps_per_epoch=len(feed.batches),
                                      log_every=log_every, loss_limit=1000.0))


def test_a_window_of_nan_losses_stops_the_run():
    """NaN images: every loss NaN, GradScaler skips every step (the weights stay finite, so no
    checkpoint check would notice). Before: the log point read mean = nan, ``nan > limit`` was
    False, and the run went on; now the first log point stops it."""
    _, ctx = _fp16_context()
    before = [p.detach().clone() for p in ctx.raw_model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"every loss of the 10 micro-batches up to step 10 .* NaN/Inf"):
        _run(ctx, _Feed(STEPS, fill=float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before, ctx.raw_model.parameters())), "steps were not skipped"


def test_a_collapsed_loss_scale_stops_the_run():
    """Finite losses, gradients that overflow at every step: GradScaler halves its scale each time
    (65536 -> below 1e-4 in 30 steps). The log point after it passes the floor stops the run."""
    _, ctx = _fp16_context()
    ctx.model = _Overflowing(ctx.raw_model)
    with pytest.raises(NonFiniteLossError, match="loss scale collapsed") as e:
        _run(ctx, _Feed(STEPS))
    assert e.value.step == 30 and ctx.scaler.get_scale() < MIN_LOSS_SCALE


def test_an_occasional_overflow_is_normal():
    """One window with a non-finite loss among finite ones: the mean leaves it out, the run goes on
    (GradScaler's skip is the remedy), and the skipped micro-batch is not in the mean."""
    _, ctx = _fp16_context()
    feed = _Feed(20)
    feed.batches[3] = Batch(torch.full_like(feed.batches[3].images, float("nan")), feed.batches[3].labels)
    _, records = _run(ctx, feed)
    assert [r["step"] for r in records] == [10, 20]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
