"""The converted item list: ``OUT/items/<split>.tsv``, one line per stored image, in storage order.

Why: FFCV and DALI read the converted files, so they see exactly the items the converter stored
(a ``--classes`` subset, ``--limit-per-class``, minus skipped files). The reference pipeline reads
the *source* files; this list tells it which ones, with which label, so every backend trains on the
same images. The order is the storage order (the order of labels in the beton and across the DALI
shards), so the list also documents which source file each stored sample came from.

Format: one ``<path relative to SRC><TAB><label>`` line per image, UTF-8 with ``surrogateescape``
(undecodable bytes of a Linux file name survive the round trip). The label is split off at the
*last* tab, so a name may contain tabs; a name with a line break cannot be listed, and
:mod:`sources` skips such files with a reason. Written once, atomically
(:func:`pipelines.convert.state.write_atomic`), and referenced from the manifest's split entry
(``items``: file, images, bytes, sha256).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ITEMS_DIR = "items"
ENCODING = ("utf-8", "surrogateescape")


def items_path(out: Path, split: str) -> Path:
    return out / ITEMS_DIR / f"{split}.tsv"


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
