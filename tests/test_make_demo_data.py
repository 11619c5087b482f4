"""tools/make_demo_data.py writes an ImageNet-style tree of real Fashion-MNIST JPEGs whose sorted
folder names follow the labels, at the requested size, and the converter reads it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.convert.demo_data import CLASS_DIRS, FMNIST_DIR, load_split

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")


def test_demo_tree_layout_pixels_and_labels(tmp_path):
    out = tmp_path / "src"
    proc = subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(out), "--size", "48",
                           "--train-per-class", "4", "--val-per-class", "2", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "40 train + 20 val images, 48x48" in proc.stdout
    for split, prefix, n in (("train", "train", 4), ("val", "t10k", 2)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == list(CLASS_DIRS) and [int(f.split("_")[0]) for f in folders] == list(range(10))
        images, labels = load_split(FMNIST_DIR, prefix)
        for c, name in enumerate(CLASS_DIRS):
            files = sorted((out / split / name).iterdir())
            assert len(files) == n
            for f in files:
                img = Image.open(f)
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)
                i = int(f.stem.split("_")[1])  # file name carries the Fashion-MNIST index
                assert labels[i] == c
                small = np.asarray(img.convert("L").resize((28, 28), Image.Resampling.BOX), np.int16)
                assert np.abs(small - images[i]).mean() < 12  # the real item, not another one
                other = images[(i + 1) % len(images)]
                assert np.abs(small - other).mean() > np.abs(small - images[i]).mean()
    assert not list(out.glob(".tmp-*"))


def test_demo_tree_converts(tmp_path):
    from pipelines.convert.demo_data import make_demo_tree

    make_demo_tree(tmp_path / "src", size=40, train_per_class=3, val_per_class=1, workers=1)
    proc = subprocess.run([sys.executable, "tools/convert_imagenet.py", str(tmp_path / "src"), str(tmp_path / "out"),
                           "--workers", "1", "--quiet", "--formats", "dali"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 30 images, 10 classes, 0 skipped" in proc.stdout


def test_bad_options_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", str(tmp_path), "--size", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
