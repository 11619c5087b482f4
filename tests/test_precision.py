"""train.precision=auto (engine/precision.py): bf16 where CUDA has it natively, fp16 with loss
scaling on V100-class GPUs (how RSB trained), fp32 on CPU; what a device cannot do is refused in
one line. CUDA devices are stood in for by torch.cuda's capability/name queries."""
from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, load_config
from engine.precision import resolve_precision

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    def make(capability, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return make


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 0), "Tesla V100-SXM2-32GB", "fp16"),
    ((7, 5), "Tesla T4", "fp16"),
    ((8, 0), "NVIDIA A100-SXM4-80GB", "bf16"),
    ((9, 0), "NVIDIA H100 80GB HBM3", "bf16"),
])
def test_auto_picks_what_the_gpu_does_best(gpu, capability, name, expected):
    gpu(capability, name)
    assert resolve_precision("auto", CUDA) == expected


def test_rsb_recipes_default_to_auto_so_a_v100_trains_them(gpu):
    gpu((7, 0), "Tesla V100-SXM2-32GB")
    for recipe in ("recipes/a1.toml", "recipes/a2.toml", "recipes/a3.toml", "recipes/resnetrs50.toml",
                   "recipes/ffcv_rn50_88ep.toml"):
        assert load_config(recipe).train.precision == "auto", recipe
    assert resolve_precision(load_config("recipes/a1.toml").train.precision, CUDA) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_bf16_on_a_gpu_without_it_is_one_line(gpu):
    gpu((7, 0), "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match="V100.*no native bf16.*train.precision=auto") as e:
        resolve_precision("bf16", CUDA)
    assert "\n" not in str(e.value)
    assert resolve_precision("fp16", CUDA) == "fp16"


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_explicit_half_precision_on_cpu_is_kept_with_one_warning(requested):
    said = []
    assert resolve_precision(requested, torch.device("cpu"), warn=said.append) == requested
    assert len(said) == 1 and said[0].startswith("warning:") and "\n" not in said[0]
    said.clear()
    assert resolve_precision("fp32", torch.device("cpu"), warn=said.append) == "fp32" and not said
