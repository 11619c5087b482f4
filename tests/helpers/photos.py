"""Real photographs for tests, from scikit-image's bundled sample data (installed by the dev
extra; nothing is downloaded). Read from the package folder without importing skimage, which
is slow to import and not needed for this."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

# Colour photographs of real scenes (not drawings or microscopy), in a fixed order.
PHOTO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
               "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "color.png", "grass.png", "gravel.png",
               "ihc.png")


def photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: run `make test` (it installs the dev extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photo(name: str) -> Image.Image:
    return Image.open(photo_dir() / name).convert("RGB")


def photo_crops(n: int, size: tuple[int, int] = (400, 350), seed: int = 0) -> list[Image.Image]:
    """``n`` RGB crops of ``size`` (w, h) cut from the photos, ImageNet-like in size and content.
    Photos smaller than ``size`` are upscaled first. Deterministic for a given seed."""
    import random

    rng = random.Random(seed)
    photos = [load_photo(f) for f in PHOTO_FILES]
    out = []
    w, h = size
    for i in range(n):
        img = photos[i % len(photos)]
        scale = max(w / img.width, h / img.height, 1.0) * rng.uniform(1.0, 1.6)
        if scale != 1.0:
            img = img.resize((round(img.width * scale) + 1, round(img.height * scale) + 1), Image.BICUBIC)
        x = rng.randint(0, img.width - w)
        y = rng.randint(0, img.height - h)
        out.append(img.crop((x, y, x + w, y + h)))
    return out
