"""The converted data root's format: what the converter writes and every reader trusts.

One module that both sides import (the converter in ``pipelines/convert`` writes with it; the
readers, ``pipelines/reference.py`` and the FFCV/DALI stage 1 through ``pipelines/_stage1_common.py``,
read with it), so the format has one home and a reader never imports the converter.

``manifest.json`` (:func:`load_manifest`):

  Top level: ``version`` (tool version), ``format`` (this file's schema), ``source`` (absolute SRC),
  ``formats``, ``settings``, ``exif_orientation``. Per split (``splits.<name>``): ``images`` written,
  ``classes`` (names in index order), ``class_counts``, ``labels_sha256`` (of the label sequence in
  storage order, the same order in the beton and across the shards), ``skipped`` (``{path, reason}``),
  ``source_kind`` (``folders``, ``flat`` or ``archive``), ``jpeg_passed_through`` / ``jpeg_reencoded``
  (stored JPEGs that are the source file's own bytes / encoded from its pixels: CMYK, grey, PNG,
  rotated, or over the size cap), ``items`` (the stored item list,
  ``items/<split>.tsv``: ``file``, ``images``, ``bytes``, ``sha256``; one ``<path relative to source><TAB><label>``
  line per stored image in storage order, see below; absent in ``format`` 1 manifests),
  ``ffcv`` (file, bytes, sha256, page size) and ``shards`` (DALI tar ``path`` + ``index``, images, bytes,
  sha256).
  Paths of outputs are relative to OUT, so a converted folder can be moved; item paths are relative to
  ``source`` (the reference pipeline reads the source files they name).

``items/<split>.tsv`` (:func:`encode_items`, :func:`decode_items`): the converted item list.

  Why: FFCV and DALI read the converted files, so they see exactly the items the converter stored
  (a ``--classes`` subset, ``--limit-per-class``, minus skipped files). The reference pipeline reads
  the *source* files; this list tells it which ones, with which label, so every backend trains on the
  same images. The order is the storage order (the order of labels in the beton and across the DALI
  shards), so the list also documents which source file each stored sample came from.

  Format: one ``<path relative to SRC><TAB><label>`` line per image, UTF-8 with ``surrogateescape``
  (undecodable bytes of a Linux file name survive the round trip). The label is split off at the
  *last* tab, so a name may contain tabs; a name with a line break cannot be listed, and
  :mod:`pipelines.convert.sources` skips such files with a reason. Written once, atomically
  (:func:`pipelines.convert.state.write_atomic`), and referenced from the manifest's split entry
  (``items``: file, images, bytes, sha256).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines.base import DataError

SCHEMA = 2  # manifest.json's ``format``; 2: per-split ``items``
ITEMS_DIR = "items"
ENCODING = ("utf-8", "surrogateescape")


def manifest_path(out: Path) -> Path:
    return Path(out) / "manifest.json"


def load_manifest(root: Path, hint: str) -> dict | None:
    """``root/manifest.json`` parsed; None when there is none; :class:`DataError` (ending with
    ``hint``, what to run) when it cannot be read."""
    path = manifest_path(root)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); {hint}") from None


def items_path(out: Path, split: str) -> Path:
    return Path(out) / ITEMS_DIR / f"{split}.tsv"


def encode_items(names: list[str], labels: list[int]) -> bytes:
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} names but {len(labels)} labels")
    bad = next((n for n in names if "\n" in n), None)
    if bad is not None:  # sources.py skips these; reaching here is a bug
        raise ValueError(f"item name with a line break: {bad!r}")
    return "".join(f"{n}\t{lab}\n" for n, lab in zip(names, labels)).encode(*ENCODING)


def decode_items(data: bytes) -> tuple[list[str], list[int]]:
    """(names, labels); ValueError (one line) on a malformed line."""
    names, labels = [], []
    lines = data.decode(*ENCODING).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        name, tab, label = line.rpartition("\t")
        if not tab or not name or not label.isdigit():
            raise ValueError(f"line {i} is not '<path>\\t<label>'")
        names.append(name)
        labels.append(int(label))
    return names, labels


def items_info(out: Path, path: Path, data: bytes, count: int) -> dict:
    """The manifest's ``items`` record for a written list."""
    return {"file": str(path.relative_to(out)), "images": count, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
