"""The engine with apex's FusedLAMB (picked on CUDA when apex imports), through a stand-in that has
apex's exact signatures and state layout (tests/helpers/apex_standin.py): a training step runs, and a
checkpoint's optimizer state moves between FusedLAMB and our Lamb in both directions."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import engine.optim as optim
from common.config import OptimConfig, load_config
from engine.optim import Lamb, build_optimizer, uses_apex
from tests.helpers.apex_standin import FusedLAMB

CFG = OptimConfig(name="lamb", lr=5e-3, weight_decay=0.01, max_grad_norm=1.0)


@pytest.fixture
def with_apex(monkeypatch):
    """build_optimizer as on a CUDA machine with apex installed."""
    monkeypatch.setattr(optim, "_apex_fused_lamb", lambda: FusedLAMB)
    monkeypatch.setattr(optim, "_all_on_cuda", lambda groups: True)


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 3, 8, 8, generator=g) * 3
        y = torch.randint(0, 5, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        optim.clear_grads(opt)


def _roundtrip(state):
    """Through torch.save / weights_only load, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_the_engine_steps_with_apex_fused_lamb(with_apex):
    """The engine's own step: apex's ``zero_grad`` takes no ``set_to_none`` (TypeError before)."""
    from tests.helpers.steps import Feed, device_batches, step_context
    from engine.state import EpochProgress
    from engine.step import train_one_epoch

    cfg = load_config("recipes/a1.toml", ["model.arch=resnet_tiny", "data.num_classes=10", "train.precision=fp32"])
    ctx, stage2 = step_context(cfg, 2)
    assert uses_apex(ctx.optimizer) and isinstance(ctx.optimizer, FusedLAMB)
    before = [p.detach().clone() for p in ctx.raw_model.parameters()]
    records = list(train_one_epoch(ctx, Feed(device_batches(2, 8, 32)), stage2, EpochProgress(), steps_per_epoch=2,
                                   log_every=1))
    assert [r["step"] for r in records] == [1, 2]
    assert all(p.grad is None for p in ctx.raw_model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, ctx.raw_model.parameters()))


def test_build_optimizer_gives_apex_the_recipes_lamb(with_apex):
    """apex's arguments as build_optimizer sets them mean what our Lamb (timm's semantics) does."""
    a, b = _model(), _model()
    apex_opt = build_optimizer(a, CFG)
    ours = Lamb(optim.param_groups(b, CFG.weight_decay), lr=CFG.lr, weight_decay=CFG.weight_decay,
                       max_grad_norm=CFG.max_grad_norm)
    assert isinstance(apex_opt, FusedLAMB)
    _steps(a, apex_opt, 5, seed=1)
    _steps(b, ours, 5, seed=1)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("writer,reader", [("apex", "ours"), ("ours", "apex")])
def test_a_checkpoint_resumes_across_fused_lamb_and_lamb(with_apex, monkeypatch, writer, reader):
    """3 steps with the writer, its state through a checkpoint into the reader, 2 more steps:
    the same weights as 5 steps with the writer alone (KeyError 'always_adapt' before, apex ->
    ours). Resuming where apex is absent (or newly present) is what a user moving between a
    container and a plain install does."""
    def make(kind, model):
        if kind == "ours":
            monkeypatch.setattr(optim, "_apex_fused_lamb", lambda: None)
        else:
            monkeypatch.setattr(optim, "_apex_fused_lamb", lambda: FusedLAMB)
        opt = build_optimizer(model, CFG)
        assert uses_apex(opt) == (kind == "apex")
        return opt

    model = _model()
    opt = make(writer, model)
    _steps(model, opt, 3, seed=2)
    state = _roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    reference = copy.deepcopy(model)
    ref_opt = make(writer, reference)
    ref_opt.load_state_dict(_roundtrip(opt.state_dict()))
    _steps(reference, ref_opt, 2, seed=3)

    resumed = _model(seed=9)
    resumed.load_state_dict(state["model"])
    new_opt = make(reader, resumed)
    new_opt.load_state_dict(state["optimizer"])
    _steps(resumed, new_opt, 2, seed=3)
    assert all(g["step"] == 5 for g in new_opt.param_groups)
    for p, q in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
