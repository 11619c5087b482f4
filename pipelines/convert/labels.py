"""Validation labels for ImageNet's flat val folder (50,000 files, no class sub-folders).

Two published forms, both mapped to synset ids (``n01440764``) keyed by image stem:
- Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` where the prediction string is
  ``<synset> x0 y0 x1 y1 ...`` (boxes); every box of an image has the same synset, take the first.
- the ILSVRC2012 devkit: ``ILSVRC2012_validation_ground_truth.txt`` has one ILSVRC2012_ID per line
  for ``ILSVRC2012_val_00000001`` onwards, and ``meta.mat`` maps those ids to synsets (only its
  leaf entries, ``num_children == 0``, are the 1000 classes). The devkit may also be given as the
  original ``ILSVRC2012_devkit_t12.tar.gz``; its two files are read from it in memory.
"""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path


class LabelFileError(ValueError):
    """A label file that is missing pieces or does not parse; one-line message."""


def read_kaggle_csv(text: str, origin: str = "LOC_val_solution.csv") -> dict[str, str]:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise LabelFileError(f"{origin}: expected a header 'ImageId,PredictionString'")
    out = {}
    for n, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise LabelFileError(f"{origin}:{n}: expected 'ImageId,<synset> <box>...', got {','.join(row)!r}")
        out[row[0].strip()] = row[1].split()[0]
    return out


def read_meta_mat(data: bytes, origin: str = "meta.mat") -> dict[int, str]:
    """ILSVRC2012_ID -> synset for the leaf synsets of the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise LabelFileError(f"reading {origin} needs scipy (pip install scipy), "
                             "or give Kaggle's LOC_val_solution.csv instead") from None
    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as e:  # scipy raises many kinds for a non-MAT file
        raise LabelFileError(f"{origin}: not a devkit meta.mat ({type(e).__name__}: {e})") from None


def read_devkit(ground_truth: str, meta: dict[int, str], origin: str) -> dict[str, str]:
    out = {}
    for n, line in enumerate(ground_truth.split(), start=1):
        try:
            out[f"ILSVRC2012_val_{n:08d}"] = meta[int(line)]
        except (ValueError, KeyError):
            raise LabelFileError(f"{origin}:{n}: {line!r} is not an ILSVRC2012_ID listed in meta.mat") from None
    return out


def _read_devkit_tar(path: Path) -> dict[str, str]:
    gt = meta = None
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                gt = tar.extractfile(m).read().decode()
            elif m.name.endswith("data/meta.mat"):
                meta = tar.extractfile(m).read()
    if gt is None or meta is None:
        raise LabelFileError(f"{path}: no data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt inside")
    return read_devkit(gt, read_meta_mat(meta, f"{path.name}:meta.mat"), f"{path.name}:ground_truth")


def find_label_file(roots: list[Path]) -> Path | None:
    """The first label source found in ``roots`` (the user's SRC and its layout folders)."""
    names = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt",
             "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
             "data/ILSVRC2012_validation_ground_truth.txt", "ILSVRC2012_devkit_t12.tar.gz")
    for root in roots:
        for name in names:
            if (root / name).is_file():
                return root / name
    return None


def read_val_labels(path: Path, meta: Path | None = None) -> dict[str, str]:
    """Image stem -> synset from any of the supported label files."""
    try:
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _read_devkit_tar(path)
        if path.suffix == ".csv":
            return read_kaggle_csv(path.read_text(), path.name)
        meta = meta or path.parent / "meta.mat"
        if not meta.is_file():
            raise LabelFileError(f"{path.name} needs the devkit's meta.mat beside it (or give --meta)")
        return read_devkit(path.read_text(), read_meta_mat(meta.read_bytes(), str(meta)), path.name)
    except (OSError, UnicodeDecodeError, tarfile.TarError) as e:
        raise LabelFileError(f"cannot read label file {path}: {e}") from None
