"""tools/gradcam.py: heat-maps differ between two trained checkpoints, agree with Grad-CAM computed
by hand from its definition (Selvaraju et al. 2017), and land in a PNG grid of the promised size and
in a W&B Table; user errors are one line."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workflows.gradcam import LayerError, explain, pick_samples, target_layer
from workflows.load_model import load_model
from pipelines.augment import Stage2
from pipelines.base import Batch

ROOT = Path(__file__).resolve().parents[1]
RES = 64  # resnet_tiny's layer4 is 1x1 at 32 px (a flat map), 2x2 at 64 px; layer3 is 4x4 at 64 px


def final_ckpt(run: Path) -> Path:
    return sorted(run.glob("ckpt-*.pt"))[-1]


def gradcam(*args, env=None) -> subprocess.CompletedProcess:
    """tools/gradcam.py's ``main`` in this process (tests/helpers/cli.py)."""
    from tests.helpers.cli import run_main
    from tools.gradcam import main

    return run_main(main, list(args), env=env)


def hand_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM from its definition: channel weights = spatial mean of d(logit of the predicted
    class)/d(feature map); map = ReLU(sum_k w_k A_k), upsampled bilinearly, scaled to [0, 1]."""
    feats = {}
    hook = layer.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        hook.remove()
    a = feats["a"]
    pred = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), a)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True)).detach()
    lo, hi = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
    cam = F.interpolate((cam - lo) / (hi - lo + 1e-7), size=x.shape[-2:], mode="bilinear", align_corners=False)
    lo, hi = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
    return ((cam - lo) / (hi - lo + 1e-7))[:, 0].numpy(), pred.numpy()


def test_heatmaps_differ_between_checkpoints_and_match_the_definition(tiny_runs, fmnist_tree):
    samples = pick_samples(fmnist_tree, 5, RES, 1.0)
    assert sorted(set(samples.labels)) == samples.labels and len(samples.labels) == 5  # spread over classes
    assert samples.class_names == [f"c{i}" for i in range(10)] and samples.images.shape == (5, 3, RES, RES)
    out = {}
    for name, run in tiny_runs.items():
        model, cfg = load_model(final_ckpt(run))
        target = target_layer(model, cfg.model.arch, res=RES)
        assert target.name == "layer3" and target.module is model.layer3[-1]
        layer = target.module
        exp = explain(model, cfg, samples.images, layer, torch.device("cpu"))
        assert exp.feature_hw == (4, 4) and exp.cams.shape == (5, RES, RES)
        assert exp.cams.min() >= 0 and exp.cams.max() <= 1 + 1e-6
        again = explain(model, cfg, samples.images, layer, torch.device("cpu"))
        np.testing.assert_array_equal(again.cams, exp.cams)  # deterministic
        x, _ = Stage2(cfg.augment, 10, 0.0, train=False, channels_last=cfg.train.channels_last)(
            Batch(samples.images, torch.tensor(samples.labels)))
        ref, ref_pred = hand_gradcam(model, layer, x)
        np.testing.assert_array_equal(exp.pred, ref_pred)
        np.testing.assert_allclose(exp.cams, ref, atol=1e-4)
        with torch.no_grad():
            np.testing.assert_allclose(exp.prob, model(x).softmax(1).max(1).values.numpy(), rtol=1e-5)
        out[name] = exp
    assert np.abs(out["ema"].cams - out["plain"].cams).mean() > 0.05  # two runs (seeds 0/1) look differently


def test_grid_png_and_wandb_table(tiny_runs, tmp_path):
    from PIL import Image

    from tests.helpers.wandb_reader import iter_records, read_offline_run

    png = tmp_path / "grid.png"
    proc = gradcam(final_ckpt(tiny_runs["ema"]), tiny_runs["plain"] / "model.safetensors", "--labels", "ema,plain",
                   "--num-images", "3", "--res", RES, "--crop-pct", "1.0", "--cell-px", "50", "--out", png,
                   "--wandb", "offline", "--wandb-dir", tmp_path / "wb",
                   env={"WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")})
    assert proc.returncode == 0, proc.stderr
    assert "ema: " in proc.stdout and "predictions right" in proc.stdout
    with Image.open(png) as im:
        assert im.size == (3 * 50, 3 * 50)  # 1 image + 2 checkpoint columns, 3 rows
        px = np.asarray(im.convert("RGB")).astype(int)
    ema_cell, plain_cell = px[10:50, 50:100], px[10:50, 100:150]
    assert np.abs(ema_cell - plain_cell).mean() > 1  # the two overlays are not the same picture
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    found = read_offline_run(run_dir, until=lambda f: any("gradcam/_type" in r for r in f["history"]))
    rows = [r for r in found["history"] if "gradcam/_type" in r]
    assert len(rows) == 1 and rows[0]["gradcam/_type"] == "table-file" and rows[0]["gradcam/nrows"] == 3
    table = json.loads((run_dir / "files" / rows[0]["gradcam/path"]).read_text())
    assert table["columns"] == ["image", "true class", "ema Grad-CAM", "ema prediction",
                                "plain Grad-CAM", "plain prediction"]
    assert len(table["data"]) == 3 and all(r[1] in {f"c{i}" for i in range(10)} for r in table["data"])
    # the pictures travel in the run's table artifact: per row the image and one overlay per checkpoint
    (art,) = [r.artifact for r in iter_records(next(run_dir.glob("run-*.wandb")))
              if r.WhichOneof("record_type") == "artifact"]
    entries = [e.path for e in art.manifest.contents]
    assert art.type == "run_table" and "gradcam.table.json" in entries
    assert sum(p.startswith("media/images/") for p in entries) == 3 * 3


def cli(capsys, *args) -> tuple[int, str, str]:
    """tools/gradcam.py's main() in this process (no interpreter start-up): (status, stdout, stderr)."""
    from tools import gradcam as tool

    code = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_default_layer_is_the_deepest_at_least_4x4_and_says_so(tiny_runs, tmp_path, capsys):
    """At the run's 32 px resnet_tiny's layer4 is 1x1 (a flat heat-map): the default is the deepest stage
    whose map is at least 4x4, found from timm's own feature_info (each stage's reduction)."""
    from workflows.gradcam import compare

    ckpt = final_ckpt(tiny_runs["plain"])
    model, cfg = load_model(ckpt)
    for res in (32, 64, 224):
        expected = [f["module"] for f in model.feature_info if f["module"].startswith("layer")
                    and res // f["reduction"] >= 4][-1]
        assert target_layer(model, cfg.model.arch, res=res).name == expected, res
    code, out, err = cli(capsys, ckpt, "--num-images", "3", "--cell-px", "20", "--out", tmp_path / "a.png")
    assert code == 0 and (tmp_path / "a.png").is_file(), err
    assert "Grad-CAM layer: layer2, 4x4 at res 32 (the deepest stage at least 4x4; deeper: layer3 2x2, " \
           "layer4 1x1" in out, out
    assert "flat" not in err
    result = compare([str(ckpt)], num_images=3, warn=pytest.fail)
    assert all(cam.std() > 0.05 for cam in result["columns"][0][1].cams)  # every heat-map points somewhere


def test_flat_map_is_flagged(tiny_runs, tmp_path, capsys):
    code, out, err = cli(capsys, final_ckpt(tiny_runs["plain"]), "--num-images", "1", "--cell-px", "20",
                         "--layer", "layer4", "--out", tmp_path / "a.png")
    assert code == 0 and "1x1 at res 32" in err and (tmp_path / "a.png").is_file()
    assert "Grad-CAM layer: layer4, as --layer says" in out


def test_target_layer_choice():
    with pytest.raises(LayerError, match="--layer"):
        target_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "tiny_cnn", res=32)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert target_layer(model, "tiny_cnn", "0").module is model[0]


@pytest.mark.parametrize("args, message", [
    (("missing.pt",), "not found"),
    (("{ckpt}", "--layer", "layer9"), "has no module 'layer9'"),
    (("{ckpt}", "{ckpt}", "--labels", "one"), "one per checkpoint"),
    (("{ckpt}", "--data", "{tmp}/nowhere"), "no class-folder tree"),
])
def test_user_errors_are_one_line(tiny_runs, tmp_path, capsys, args, message):
    ckpt = final_ckpt(tiny_runs["plain"])
    code, _, err = cli(capsys, *(a.format(ckpt=ckpt, tmp=tmp_path) for a in args), "--out", tmp_path / "x.png")
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err
