"""engine.schedule against timm's schedulers stepped per update (the oracle) and ffcv's formula."""
import math

import numpy as np
import pytest
import torch
from timm.scheduler import create_scheduler_v2

from common.config import OptimConfig
from engine.schedule import apply_lr, build_schedule, total_steps


def _timm_lrs(cfg: OptimConfig, epochs: int, spe: int, sched: str = "cosine") -> list[float]:
    """lr used by each update in timm's train.py: set at creation, then step_update(n) after update n."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler, n_epochs = create_scheduler_v2(
        opt, sched=sched, num_epochs=epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False, updates_per_epoch=spe)
    lrs = []
    for t in range(n_epochs * spe):
        if t:
            scheduler.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


RECIPES = {
    # name: (OptimConfig, epochs); steps per epoch kept small so the test is fast
    "a1": (OptimConfig(lr=5e-3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6), 600),
    "a1_cooldown10": (OptimConfig(lr=5e-3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6, cooldown_epochs=10), 600),
    "a3": (OptimConfig(lr=8e-3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6), 100),
    "resnet_rs": (OptimConfig(name="sgd", lr=1.6, warmup_epochs=5, warmup_lr=0.0, min_lr=0.0), 350),
    "demo_fractional_warmup": (OptimConfig(lr=8e-3, warmup_epochs=0.5, warmup_lr=1e-4, min_lr=1e-5), 3),
    "no_warmup": (OptimConfig(lr=8e-3, warmup_epochs=0, min_lr=1e-6), 20),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cosine_matches_timm_per_step(name):
    cfg, epochs = RECIPES[name]
    spe = 7
    ours = build_schedule(cfg, epochs, spe)
    ref = _timm_lrs(cfg, epochs, spe)
    assert len(ref) == total_steps(cfg, epochs, spe)
    got = [ours(t) for t in range(len(ref))]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)


def test_constant_matches_timm_per_step():
    cfg = OptimConfig(lr=8e-3, warmup_epochs=2, warmup_lr=1e-4, schedule="constant")
    ours = build_schedule(cfg, 10, 5)
    ref = _timm_lrs(cfg, 10, 5, sched="constant")
    np.testing.assert_allclose([ours(t) for t in range(len(ref))], ref, rtol=1e-12)


def test_resnet_rs_warmup_from_zero_to_zero():
    cfg, epochs = RECIPES["resnet_rs"]
    spe = 10
    lr_at = build_schedule(cfg, epochs, spe)
    lrs = [lr_at(t) for t in range(epochs * spe)]
    assert lrs[0] == 0.0
    warm = 5 * spe
    assert all(b > a for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # rising through warmup
    assert max(lrs) == pytest.approx(1.6, rel=1e-3)
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then non-increasing
    assert 0.0 < lrs[-1] < 1e-5


def test_timm_warmup_quirk_peak_not_reached():
    """timm's warmup stops one step short and the cosine starts at t = W, not 0 (documented)."""
    cfg = OptimConfig(lr=5e-3, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6)
    lr_at = build_schedule(cfg, 600, 100)
    w = 500
    assert lr_at(w - 1) == pytest.approx(1e-4 + (w - 1) * (5e-3 - 1e-4) / w)
    assert lr_at(w) == pytest.approx(1e-6 + 0.5 * (5e-3 - 1e-6) * (1 + math.cos(math.pi * w / 60000)))
    assert max(lr_at(t) for t in range(60000)) < 5e-3


def _ffcv_lrs(lr, epochs, peak, spe):
    """ffcv-imagenet train_imagenet.py: per-epoch interp, interpolated across the epoch's iterations."""
    def epoch_lr(e):
        return np.interp([e], [0, peak, epochs], [1e-4 * lr, lr, 0])[0]
    out = []
    for e in range(epochs):
        out += list(np.interp(np.arange(spe), [0, spe], [epoch_lr(e), epoch_lr(e + 1)]))
    return out


@pytest.mark.parametrize("epochs,peak", [(16, 2), (88, 2), (5, 0.5)])
def test_step_free_linear_matches_ffcv(epochs, peak):
    spe = 9
    cfg = OptimConfig(name="sgd", lr=1.7, warmup_lr=1.7e-4, schedule="step_free_linear", peak_epoch=peak, min_lr=0.0)
    lr_at = build_schedule(cfg, epochs, spe)
    ref = _ffcv_lrs(1.7, epochs, peak, spe)
    np.testing.assert_allclose([lr_at(t) for t in range(epochs * spe)], ref, rtol=1e-9, atol=1e-12)


def test_cooldown_holds_min_lr_and_errors():
    cfg = OptimConfig(lr=1.0, warmup_epochs=1, warmup_lr=0.1, min_lr=0.01, cooldown_epochs=2)
    lr_at = build_schedule(cfg, 10, 4)
    assert total_steps(cfg, 10, 4) == 48
    assert [lr_at(t) for t in range(40, 48)] == [0.01] * 8
    with pytest.raises(ValueError):
        build_schedule(OptimConfig(schedule="step_free_linear", peak_epoch=20), 10, 4)
    with pytest.raises(ValueError):
        build_schedule(OptimConfig(schedule="poly"), 10, 4)


def test_apply_lr_sets_every_group():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}], lr=1.0)
    apply_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
