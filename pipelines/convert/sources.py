"""Enumerate a source into ordered items: one per source file, with its class index.

Three input kinds, detected from what SRC holds:
- ``folders``  ``SRC/{train,val}/<class>/**`` (also Kaggle's ``SRC/ILSVRC/Data/CLS-LOC``);
- ``flat val`` a ``val`` folder of files plus a label file (see :mod:`labels`);
- ``archives`` ``ILSVRC2012_img_train.tar`` (a tar of per-class tars) and ``ILSVRC2012_img_val.tar``.
  Nothing is extracted: each member is located by its byte range inside the outer file (an inner
  tar is stored uncompressed, so its members are contiguous byte ranges of the outer tar) and
  workers read those ranges directly.

Class indices are the sorted synset (folder) names, as torchvision ``ImageFolder`` and timm
assign them. ``--classes`` re-indexes over the chosen subset so a 10-class subset trains a
10-way head; the manifest records the names in index order.

Every regular file in a class folder is an item, not only ones with image extensions: a
non-image file is then skipped *and reported*, instead of silently ignored. So is a file whose name
holds a line break: the item list (:mod:`pipelines.dataroot`, one line per stored image) could not name it.
"""
from __future__ import annotations

import difflib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .decode import SkipImage
from .labels import LabelFileError, find_label_file, read_val_labels

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


class SourceError(ValueError):
    """The source layout is not one we understand; one-line message."""


class Item(NamedTuple):
    """One source file. ``offset < 0``: the whole of ``file``; else ``size`` bytes at ``offset``."""

    label: int
    name: str  # shown in the manifest (path relative to SRC, archive members as outer.tar/inner.tar/x)
    file: str
    offset: int = -1
    size: int = -1


@dataclass
class SplitSource:
    name: str
    kind: str  # folders | flat | archive
    classes: list[str]
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)  # found before decoding (e.g. no label)


def read_item(item: Item, handles: dict | None = None) -> bytes:
    """The item's bytes; ``handles`` caches open archive files across calls in one worker."""
    try:
        if item.offset < 0:
            with open(item.file, "rb") as f:
                return f.read()
        if handles is None:
            with open(item.file, "rb") as f:
                return os.pread(f.fileno(), item.size, item.offset)
        fd = handles.get(item.file)
        if fd is None:
            fd = handles[item.file] = os.open(item.file, os.O_RDONLY)
        data = os.pread(fd, item.size, item.offset)
        if len(data) != item.size:
            raise OSError(f"archive ends early ({len(data)} of {item.size} bytes)")
        return data
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None


# --------------------------------------------------------------------------- class selection
def select_classes(found: list[str], wanted: list[str] | None) -> list[str]:
    found = sorted(found)
    if not wanted:
        return found
    missing = [c for c in wanted if c not in set(found)]
    if missing:
        guess = difflib.get_close_matches(missing[0], found, n=1)
        hint = f"; did you mean {guess[0]}?" if guess else ""
        raise SourceError(f"--classes: {missing[0]} is not a class in the source{hint}")
    return sorted(set(wanted))


def _files_under(folder: Path) -> list[Path]:
    """Every non-directory entry below ``folder`` (ImageFolder also walks sub-folders), sorted."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        out += [Path(root) / f for f in files]
    return sorted(out)


def _limit(paths: list, limit: int | None) -> list:
    return paths[:limit] if limit else paths


# --------------------------------------------------------------------------- layouts
def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir())


def _folder_split(name: str, split_dir: Path, src: Path, classes: list[str], limit: int | None,
                  strict: bool) -> SplitSource:
    present = set(_class_dirs(split_dir))
    extra = sorted(present - set(classes))
    if strict and extra:
        raise SourceError(f"{split_dir}: class folder {extra[0]} is not among the train classes")
    items = []
    for label, cls in enumerate(classes):
        if cls not in present:
            continue
        for p in _limit(_files_under(split_dir / cls), limit):
            items.append(Item(label, str(p.relative_to(src)), str(p)))
    return SplitSource(name, "folders", classes, items)


def _flat_split(name: str, split_dir: Path, src: Path, classes: list[str], limit: int | None,
                labels: dict[str, str], strict: bool) -> SplitSource:
    index = {c: i for i, c in enumerate(classes)}
    per_class: dict[int, list[Item]] = {}
    skipped = []
    for p in _files_under(split_dir):
        rel = str(p.relative_to(src))
        synset = labels.get(p.name.split(".")[0])
        if synset is None:
            skipped.append({"path": rel, "reason": "no label for this file in the label file"})
        elif synset in index:
            per_class.setdefault(index[synset], []).append(Item(index[synset], rel, str(p)))
        elif strict:
            raise SourceError(f"label file gives {p.name} class {synset}, which is not among the train classes")
    items = [it for label in sorted(per_class) for it in _limit(per_class[label], limit)]
    return SplitSource(name, "flat", classes, items, skipped)


def _tar_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    return sorted((m for m in tar if m.isfile()), key=lambda m: m.name)


def _train_archive_classes(path: Path) -> tuple[list[str], dict[str, tarfile.TarInfo]]:
    with tarfile.open(path, "r:") as outer:
        inner = {Path(m.name).name.split(".")[0]: m for m in _tar_members(outer) if m.name.endswith(".tar")}
    if not inner:
        raise SourceError(f"{path}: expected per-class tars such as n01440764.tar inside")
    return sorted(inner), inner


def _train_archive_split(path: Path, classes: list[str], inner: dict[str, tarfile.TarInfo],
                         limit: int | None) -> SplitSource:
    items = []
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
        for label, cls in enumerate(classes):
            m = inner[cls]
            with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as tar:
                for im in _limit(_tar_members(tar), limit):
                    items.append(Item(label, f"{path.name}/{m.name}/{im.name}", str(path),
                                      m.offset_data + im.offset_data, im.size))
    return SplitSource("train", "archive", classes, items)


def _val_archive_split(path: Path, classes: list[str], limit: int | None, labels: dict[str, str],
                       strict: bool) -> SplitSource:
    index = {c: i for i, c in enumerate(classes)}
    per_class: dict[int, list[Item]] = {}
    skipped = []
    with tarfile.open(path, "r:") as tar:
        for m in _tar_members(tar):
            name = f"{path.name}/{m.name}"
            synset = labels.get(Path(m.name).name.split(".")[0])
            if synset is None:
                skipped.append({"path": name, "reason": "no label for this file in the label file"})
            elif synset in index:
                per_class.setdefault(index[synset], []).append(
                    Item(index[synset], name, str(path), m.offset_data, m.size))
            elif strict:
                raise SourceError(f"label file gives {m.name} class {synset}, which is not among the train classes")
    items = [it for label in sorted(per_class) for it in _limit(per_class[label], limit)]
    return SplitSource("val", "archive", classes, items, skipped)


def discover(src: Path, splits: list[str], wanted_classes: list[str] | None = None,
             limit_per_class: int | None = None, val_labels: Path | None = None,
             meta: Path | None = None) -> dict[str, SplitSource]:
    """Find the requested splits in ``src``; a split that is absent is left out of the result."""
    src = src.resolve()
    if not src.is_dir():
        raise SourceError(f"source folder not found: {src}")
    root = src / "ILSVRC" / "Data" / "CLS-LOC" if (src / "ILSVRC" / "Data" / "CLS-LOC").is_dir() else src
    train_tar, val_tar = src / TRAIN_TAR, src / VAL_TAR
    train_dir, val_dir = root / "train", root / "val"

    # Class list: the train split's when it exists, so both splits index classes identically.
    inner = None
    if train_tar.is_file():
        found, inner = _train_archive_classes(train_tar)
    elif train_dir.is_dir():
        found = _class_dirs(train_dir)
        if not found:
            raise SourceError(f"{train_dir}: no class folders (expected train/<class>/<images>)")
    else:
        found = []
    have_train_classes = bool(found)

    labels = None
    val_flat = val_tar.is_file() or (val_dir.is_dir() and not _class_dirs(val_dir))
    if "val" in splits and val_flat:
        label_path = val_labels or find_label_file([src, src.parent, root])
        if label_path is None:
            raise SourceError(f"{val_tar if val_tar.is_file() else val_dir} has no class folders and no label "
                              "file was found: give --val-labels LOC_val_solution.csv (Kaggle) or "
                              "ILSVRC2012_validation_ground_truth.txt (devkit, with meta.mat beside it or --meta)")
        try:
            labels = read_val_labels(Path(label_path), meta)
        except LabelFileError as e:
            raise SourceError(str(e)) from None
        if not found:
            found = sorted(set(labels.values()))
    elif not found and val_dir.is_dir():
        found = _class_dirs(val_dir)
    if not found:
        raise SourceError(f"{src}: found neither train/ and val/ folders nor {TRAIN_TAR} / {VAL_TAR}")
    classes = select_classes(found, wanted_classes)
    strict = have_train_classes and not wanted_classes

    out = {}
    if "train" in splits:
        if inner is not None:
            out["train"] = _train_archive_split(train_tar, classes, inner, limit_per_class)
        elif train_dir.is_dir():
            out["train"] = _folder_split("train", train_dir, src, classes, limit_per_class, strict=False)
    if "val" in splits:
        if val_tar.is_file():
            out["val"] = _val_archive_split(val_tar, classes, limit_per_class, labels, strict)
        elif val_dir.is_dir() and labels is not None:
            out["val"] = _flat_split("val", val_dir, src, classes, limit_per_class, labels, strict)
        elif val_dir.is_dir():
            out["val"] = _folder_split("val", val_dir, src, classes, limit_per_class, strict)
    if not out:
        raise SourceError(f"{src}: none of the splits {', '.join(splits)} found")
    return {name: _without_line_breaks(s) for name, s in out.items()}


def _without_line_breaks(split: SplitSource) -> SplitSource:
    """Skip (and report) items whose name has a line break: the item list has one line per image."""
    bad = [it for it in split.items if "\n" in it.name]
    if not bad:
        return split
    split.items = [it for it in split.items if "\n" not in it.name]
    split.skipped += [{"path": it.name, "reason": "file name contains a line break (rename it)"} for it in bad]
    return split
