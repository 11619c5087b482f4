"""Demo data: Debian's Fashion-MNIST (IDX files) as an ImageNet-style class-folder tree of JPEGs.

The 28x28 grayscale items are upscaled (bicubic) to ``size`` px RGB so random-resized-crop has
pixels to crop from, and written as ``<out>/{train,val}/<k>_<name>/<index>.jpg``; the single-digit
prefix makes the sorted folder names (the converter's class order) equal the Fashion-MNIST labels.
Train is Fashion-MNIST's 60k train set, val its 10k test set. Writes go to a temporary folder
that is renamed into place (``val`` last), so a present ``val/`` means a complete tree.
"""
from __future__ import annotations

import gzip
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_DIRS = ("0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat",
              "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot")
SPLITS = (("train", "train"), ("val", "t10k"))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(fmnist: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            if (fmnist / name).is_file():
                return fmnist / name
        raise FileNotFoundError(f"{fmnist / (prefix + '-' + kind + '-ubyte.gz')} not found "
                                "(apt-get install dataset-fashion-mnist)")
    return read_idx(find("images-idx3")), read_idx(find("labels-idx1"))


def _write_batch(args) -> int:
    images, paths, size, quality = args
    for img, path in zip(images, paths):
        Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(
            path, format="JPEG", quality=quality)
    return len(paths)


def make_demo_tree(out: Path, fmnist: Path = FMNIST_DIR, size: int = 64, train_per_class: int = 0,
                   val_per_class: int = 0, quality: int = 90, workers: int = 0) -> dict[str, int]:
    """Write the tree; ``*_per_class`` 0 = all. Returns images written per split."""
    out = Path(out)
    tmp = out / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs, counts = [], {}
    for split, prefix in SPLITS:
        images, labels = load_split(fmnist, prefix)
        limit = train_per_class if split == "train" else val_per_class
        counts[split] = 0
        for c, name in enumerate(CLASS_DIRS):
            idx = np.flatnonzero(labels == c)[: limit or None]
            folder = tmp / split / name
            folder.mkdir(parents=True)
            paths = [folder / f"{split}_{i:05d}.jpg" for i in idx]
            for s in range(0, len(idx), 500):
                jobs.append((images[idx[s:s + 500]], paths[s:s + 500], size, quality))
            counts[split] += len(idx)
    workers = workers or os.cpu_count() or 1
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_batch, jobs):
            pass
    for split, _ in SPLITS:  # val last: its presence marks a complete tree
        shutil.rmtree(out / split, ignore_errors=True)
        os.replace(tmp / split, out / split)
    tmp.rmdir()
    return counts
