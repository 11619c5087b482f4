"""Small real-image class-folder trees from Debian's Fashion-MNIST (dataset-fashion-mnist)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_fmnist_tree(out: Path, per_class_train: int, per_class_val: int, size: int = 32, classes: int = 10) -> Path:
    """An ImageFolder tree of RGB JPEGs: out/{train,val}/c<k>/<i>.jpg (real Fashion-MNIST pixels)."""
    if not FMNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (make test installs it as root)")
    for split, prefix, per_class in (("train", "train", per_class_train), ("val", "t10k", per_class_val)):
        images = read_idx(f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz")
        for c in range(classes):
            folder = out / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                img = Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC)
                img.save(folder / f"{j:05d}.jpg", quality=90)
    return out
