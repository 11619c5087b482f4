"""engine.optim against timm's Lamb (the oracle), param-group rule, builder, exact resume."""
import copy

import pytest
import timm
import torch
import torchvision
from timm.optim import Lamb as TimmLamb
from torch import nn

from common.config import OptimConfig
from engine.optim import Lamb, build_optimizer, param_groups, uses_apex


def _groups_pair(model_a, model_b, wd):
    return param_groups(model_a, wd), param_groups(model_b, wd)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _run_pair(model, ours_kw, timm_kw, steps, grad_fn, wd=0.01, timm_foreach=None, clip_on_host=None):
    """Runs our Lamb and timm's on two copies of ``model`` with identical grads each step."""
    a, b = model, copy.deepcopy(model)
    ga, gb = _groups_pair(a, b, wd)
    ours = Lamb(ga, **ours_kw)
    ours.clip_on_host = clip_on_host  # False: the CUDA path (clip factor kept as a tensor), run on CPU
    ref = TimmLamb(gb, foreach=timm_foreach, **timm_kw)
    pa, pb = list(a.parameters()), list(b.parameters())
    norms = []
    for k in range(steps):
        grads = grad_fn(k, pa)
        norms.append(float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))))
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g, g  # the very same tensor: also checks that neither writes to p.grad
        ours.step()
        ref.step()
    return pa, pb, norms, ours


def _assert_params_close(pa, pb, rtol=1e-5):
    worst = max(_rel_err(p.detach(), q.detach()) for p, q in zip(pa, pb))
    assert worst < rtol, f"worst per-tensor relative error {worst:.3g}"
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-6)


def test_lamb_matches_timm_resnet18_30_steps_with_clipping():
    """30 LAMB steps on a timm ResNet-18 (11.7 M parameters in 62 tensors, decay / no-decay groups);
    grad norms straddle max_grad_norm = 1 so both the clipped and the unclipped path run."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=1000)
    pa = list(model.parameters())
    initial = [p.detach().clone() for p in pa]
    gen = torch.Generator().manual_seed(1)
    bank = [[torch.randn(p.shape, generator=gen) * 2e-4 for p in pa] for _ in range(2)]  # global norm ~1
    scales = [0.3, 3.0, 1.0, 0.6, 8.0]

    grads = [torch.empty_like(p) for p in pa]  # reused buffers: no 50 MB allocation per step

    def grad_fn(k, params):
        # Fixed random directions plus a term that follows the weights, so later grads depend on the trajectory.
        torch._foreach_copy_(grads, bank[k % 2])
        torch._foreach_mul_(grads, scales[k % len(scales)])
        torch._foreach_add_(grads, [p.detach() for p in params], alpha=1e-4)
        return grads

    pa, pb, norms, ours = _run_pair(model, dict(lr=5e-3, weight_decay=0.01), dict(lr=5e-3, weight_decay=0.01),
                                    30, grad_fn)
    assert min(norms) < 1.0 < max(norms)  # the clip path ran in some steps and not in others
    assert all(g["step"] == 30 for g in ours.param_groups)
    _assert_params_close(pa, pb)
    moved = max(_rel_err(p.detach(), q) for p, q in zip(pa, initial))
    assert moved > 1e-3  # the weights did change (a no-op optimizer would fail above anyway)


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.zero = nn.Parameter(torch.zeros(4, 4))  # ||w|| = 0 at first: trust ratio falls back to 1


def _small_grads(k, params):
    gen = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=gen) * (5.0 if k % 3 == 0 else 0.05) for p in params]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(max_grad_norm=None),
    dict(grad_averaging=False),
    dict(always_adapt=True),
    dict(bias_correction=False),
    dict(betas=(0.8, 0.99), eps=1e-8),
])
@pytest.mark.parametrize("wd", [0.05, 0.0])
@pytest.mark.parametrize("chunk,clip_on_host", [(None, None), (1, False), (0, True)])
def test_lamb_matches_timm_single_tensor_options(kw, wd, chunk, clip_on_host):
    torch.manual_seed(0)
    pa, pb, _, _ = _run_pair(_Small(), dict(lr=1e-2, weight_decay=wd, chunk_elems=chunk, **kw),
                             dict(lr=1e-2, weight_decay=wd, **kw), 30, _small_grads, wd=wd, timm_foreach=False,
                             clip_on_host=clip_on_host)
    _assert_params_close(pa, pb)


def test_lamb_detects_a_wrong_clip():
    """The oracle comparison is sensitive: switching the clip off on one side breaks it."""
    torch.manual_seed(0)
    pa, pb, _, _ = _run_pair(_Small(), dict(lr=1e-2, max_grad_norm=None), dict(lr=1e-2), 10, _small_grads)
    assert max(_rel_err(p.detach(), q.detach()) for p, q in zip(pa, pb)) > 1e-3


def test_lamb_state_dict_roundtrip_is_exact():
    torch.manual_seed(0)
    ref_model = _Small()
    model = copy.deepcopy(ref_model)
    ref = Lamb(param_groups(ref_model, 0.05), lr=1e-2)
    for k in range(12):
        for p, g in zip(ref_model.parameters(), _small_grads(k, list(ref_model.parameters()))):
            p.grad = g
        ref.step()

    opt = Lamb(param_groups(model, 0.05), lr=1e-2)
    for k in range(5):
        for p, g in zip(model.parameters(), _small_grads(k, list(model.parameters()))):
            p.grad = g
        opt.step()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    fresh = _Small()
    fresh.load_state_dict(saved[0])
    resumed = Lamb(param_groups(fresh, 0.05), lr=1e-2)
    resumed.load_state_dict(saved[1])
    for k in range(5, 12):
        for p, g in zip(fresh.parameters(), _small_grads(k, list(fresh.parameters()))):
            p.grad = g
        resumed.step()
    for p, q in zip(fresh.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_lamb_rejects_half_params():
    with pytest.raises(TypeError, match="fp32"):
        Lamb([nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


def test_param_groups_torchvision_downsample_bn_gets_no_decay():
    model = torchvision.models.resnet50()
    groups = param_groups(model, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    named = dict(model.named_parameters())
    for name in ("layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias", "bn1.weight", "fc.bias",
                 "layer4.2.bn3.weight"):
        assert id(named[name]) in no_decay, name
    for name in ("conv1.weight", "layer1.0.downsample.0.weight", "fc.weight"):
        assert id(named[name]) in decay, name
    assert len(decay) + len(no_decay) == len(named)


def test_build_optimizer_kinds():
    model = _Small()
    lamb = build_optimizer(model, OptimConfig(name="lamb", lr=5e-3, weight_decay=0.02, max_grad_norm=0.0))
    assert isinstance(lamb, Lamb) and not uses_apex(lamb)  # CPU params: never apex
    assert lamb.max_grad_norm is None
    assert [g["weight_decay"] for g in lamb.param_groups] == [0.02, 0.0]

    sgd = build_optimizer(model, OptimConfig(name="sgd", lr=1.6, momentum=0.9, nesterov=True, weight_decay=4e-5))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [4e-5, 0.0]

    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.9, 0.95], weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError):
        build_optimizer(model, OptimConfig(name="adam"))
