"""Builders shared by the converter tests: small ImageNet-like trees of real photos plus every kind
of bad or odd file that occurs in ImageNet or user data, and helpers to run the CLI and to read the
outputs back with the real readers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.photos import photo_crops

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_imagenet.py"
SIZE = (96, 80)  # all images one size, so FFCV's SimpleRGBImageDecoder can read them back unchanged
# Created in this order on purpose: class indices must follow the sorted names, not creation order.
CLASSES = ("n02000002", "n01000001", "n03000003")

# name -> expected skip reason fragment (None: converted)
ODD_FILES = {
    "cmyk.JPEG": None, "gray.JPEG": None, "png_named.JPEG": None, "progressive.JPEG": None,
    "exif_rot6.JPEG": None,
    "truncated.JPEG": "truncated", "empty.JPEG": "empty file", "notes.txt": "not an image",
    "text_named.JPEG": "not an image", "dangling.JPEG": "unreadable",
}


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def write_odd_files(folder: Path, photo: Image.Image) -> None:
    """Every kind of odd input, each as a real file in ``folder``."""
    (folder / "cmyk.JPEG").write_bytes(jpeg_bytes(photo.convert("CMYK")))
    (folder / "gray.JPEG").write_bytes(jpeg_bytes(photo.convert("L")))
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "png_named.JPEG", format="PNG")  # as ImageNet's one PNG-in-a-.JPEG
    (folder / "progressive.JPEG").write_bytes(jpeg_bytes(photo, progressive=True))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"; the reference loader ignores it, so must we
    (folder / "exif_rot6.JPEG").write_bytes(jpeg_bytes(photo, exif=exif.tobytes()))
    whole = jpeg_bytes(photo)
    (folder / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "notes.txt").write_text("labelling notes, not an image\n")
    (folder / "text_named.JPEG").write_text("<html>404 not found</html>\n")
    os.symlink(folder / "no-such-file.JPEG", folder / "dangling.JPEG")
    if os.geteuid() != 0:  # root reads mode-000 files, so this case only means something for users
        p = folder / "no_permission.JPEG"
        p.write_bytes(whole)
        p.chmod(0)


def build_tree(root: Path, per_class: int = 3, val_per_class: int = 2, odd: bool = True, seed: int = 0) -> Path:
    """``root/{train,val}/<synset>/*.JPEG`` of real photo crops; odd files in the first class's train."""
    crops = iter(photo_crops(len(CLASSES) * (per_class + val_per_class) + 1, size=SIZE, seed=seed))
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for k in range(n):
                (folder / f"{c}_{split}_{k}.JPEG").write_bytes(jpeg_bytes(next(crops)))
    if odd:
        write_odd_files(root / "train" / CLASSES[0], next(crops))
    return root


def run_tool(src: Path, out: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOOL), str(src), str(out), "--quiet", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_samples(out: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, jpeg, label) in storage order, read with tarfile (independent of our writer)."""
    samples = []
    for shard in manifest(out)["splits"][split]["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            members = tar.getmembers()
            for jpg, cls in zip(members[::2], members[1::2]):
                assert jpg.name.endswith(".jpg") and cls.name == jpg.name[:-4] + ".cls"
                samples.append((jpg.name[:-4], tar.extractfile(jpg).read(), int(tar.extractfile(cls).read())))
    return samples


def source_for_key(src: Path, split: str, key: str) -> Path:
    """The source file a sample came from: keys are ``<seq>_<file stem>`` and stems are unique here."""
    stem = key.split("_", 1)[1]
    hits = [p for p in (src / split).rglob("*") if p.name.split(".")[0] == stem]
    assert len(hits) == 1, (key, hits)
    return hits[0]


def reference_rgb(path: Path) -> np.ndarray:
    """The reference pipeline's decode: torchvision/timm ImageFolder loading."""
    return np.asarray(Image.open(path).convert("RGB"))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# A q90 re-encode of a photo differs from its source by ~1-2 grey levels on average; a different
# photo differs by tens. Tests also assert the check can fail (against a wrong image).
JPEG_TOL = 3.0
