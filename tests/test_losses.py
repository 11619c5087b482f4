"""engine.losses against timm's losses (the oracle) on random logits, index and soft targets."""
import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy as TimmBCE
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from common.config import LossConfig
from engine.losses import build_loss

C = 37


def _data(seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, generator=gen) * 3
    labels = torch.randint(0, C, (n,), generator=gen)
    return logits, labels


def _mixed(labels, smoothing, lam):
    """Soft targets the way stage 2 / timm Mixup builds them (smoothing included, then mixed)."""
    return mixup_target(labels, C, lam=lam, smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("thresh", [0.0, 0.2])
def test_bce_index_labels_match_timm(smoothing, thresh):
    logits, labels = _data()
    ours = build_loss(LossConfig(name="bce", label_smoothing=smoothing, bce_target_thresh=thresh), C)
    ref = TimmBCE(smoothing=smoothing, target_threshold=thresh or None)
    torch.testing.assert_close(ours(logits, labels), ref(logits, labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("thresh", [0.0, 0.2])
@pytest.mark.parametrize("lam", [1.0, 0.7, 0.21, 0.5])
def test_bce_soft_targets_match_timm(smoothing, thresh, lam):
    logits, labels = _data(1)
    target = _mixed(labels, smoothing, lam)
    ours = build_loss(LossConfig(name="bce", label_smoothing=smoothing, bce_target_thresh=thresh), C)
    ref = TimmBCE(smoothing=smoothing, target_threshold=thresh or None)  # dense targets: timm does not smooth
    torch.testing.assert_close(ours(logits, target), ref(logits, target), rtol=1e-6, atol=0)


def test_bce_smoothing_not_applied_twice_to_soft_targets():
    logits, labels = _data(2)
    target = _mixed(labels, 0.1, 0.6)  # already smoothed upstream
    with_s = build_loss(LossConfig(name="bce", label_smoothing=0.1), C)(logits, target)
    without = build_loss(LossConfig(name="bce", label_smoothing=0.0), C)(logits, target)
    assert torch.equal(with_s, without)
    # ...while index labels are smoothed by the loss itself
    assert not torch.equal(build_loss(LossConfig(name="bce", label_smoothing=0.1), C)(logits, labels),
                           build_loss(LossConfig(name="bce", label_smoothing=0.0), C)(logits, labels))


def test_a1_bce_threshold_makes_smoothing_a_noop_for_index_labels():
    logits, labels = _data(3)
    a1 = build_loss(LossConfig(name="bce", label_smoothing=0.1, bce_target_thresh=0.2), C)
    hard = build_loss(LossConfig(name="bce", label_smoothing=0.0, bce_target_thresh=0.0), C)
    torch.testing.assert_close(a1(logits, labels), hard(logits, labels))
    # with mixup, lam = 0.21 > 0.2 but 0.21 * 0.9001 + 0.79 * 1e-4 < 0.2: the first label is dropped
    target = _mixed(labels, 0.1, 0.21)
    hard_second = torch.nn.functional.one_hot(labels.flip(0), C).float()
    torch.testing.assert_close(a1(logits, target), hard(logits, hard_second))


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_ce_index_labels_match_timm_label_smoothing(smoothing):
    logits, labels = _data(4)
    ours = build_loss(LossConfig(name="ce", label_smoothing=smoothing), C)
    torch.testing.assert_close(ours(logits, labels), LabelSmoothingCrossEntropy(smoothing)(logits, labels),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("lam", [1.0, 0.65])
def test_ce_soft_targets_match_timm(smoothing, lam):
    logits, labels = _data(5)
    target = _mixed(labels, smoothing, lam)
    ours = build_loss(LossConfig(name="ce", label_smoothing=smoothing), C)  # smoothing already in target
    torch.testing.assert_close(ours(logits, target), SoftTargetCrossEntropy()(logits, target), rtol=1e-6, atol=0)
    if smoothing:  # the same as index labels with the loss doing the smoothing (lam = 1)
        if lam == 1.0:
            torch.testing.assert_close(ours(logits, target), ours(logits, labels), rtol=1e-6, atol=1e-7)


def test_low_precision_logits_and_checks():
    logits, labels = _data(6)
    loss = build_loss(LossConfig(name="bce", bce_target_thresh=0.2), C)
    out = loss(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(logits.bfloat16().float(), labels))
    with pytest.raises(ValueError, match="classes"):
        loss(logits[:, :10], labels)
    with pytest.raises(ValueError):
        build_loss(LossConfig(name="ce", bce_target_thresh=0.2), C)
    with pytest.raises(ValueError):
        build_loss(LossConfig(name="focal"), C)
