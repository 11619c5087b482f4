"""Progressive resolution schedules against the formulas in their sources."""
import numpy as np

from common.config import ProgressiveConfig, load_config
from engine.progressive import regularization_scale, resolution_for_epoch


def ffcv_res(epoch, start_ramp, end_ramp, min_res=160, max_res=192):
    # ffcv-imagenet's get_resolution, written out from its description
    r = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(r[0] / 32)) * 32


def test_linear_matches_ffcv_formula_for_every_epoch():
    cfg = load_config("recipes/ffcv_rn50_88ep.toml")
    p = cfg.train.progressive
    got = [resolution_for_epoch(p, e, cfg.train.epochs, cfg.train.train_res) for e in range(cfg.train.epochs)]
    assert got == [ffcv_res(e, 65, 76) for e in range(88)]
    assert got[0] == 160 and got[-1] == 192 and got.index(192) == 71  # the switch lands inside the ramp


def test_stages_grow_resolution_and_regularization():
    p = ProgressiveConfig(kind="stages", start_res=128, end_res=224, num_stages=4, round_to=32, scale_regularization=True)
    res = [resolution_for_epoch(p, e, 100, 224) for e in range(100)]
    assert sorted(set(res)) == [128, 160, 192, 224] and res == sorted(res)
    assert [res[0], res[25], res[50], res[99]] == [128, 160, 192, 224]
    scales = [regularization_scale(p, e, 100) for e in (0, 25, 50, 99)]
    assert scales == [0.25, 0.5, 0.75, 1.0]


def test_none_uses_train_res():
    assert resolution_for_epoch(ProgressiveConfig(), 5, 10, 176) == 176
    assert regularization_scale(ProgressiveConfig(), 5, 10) == 1.0
