"""``--verify``: re-read every output and check it against ``manifest.json``.

Checks per split: file sizes and SHA-256 (any flipped byte), that every sample decodes (PIL, the
same library the reference loader uses) to the size its metadata claims, that labels are in range
and their sequence matches the manifest's digest and per-class counts, that each DALI shard has
exactly one ``.jpg`` and one ``.cls`` per key and that its index file describes the tar, and that
the FFCV beton and the DALI shards hold the same label sequence, and that the item list
(``items/<split>.tsv``, what the reference pipeline reads) is intact and lists that same label
sequence. Decoding runs in ``workers`` processes, one shard or beton slice per task.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from common.fileio import sha256_file

from .dali_out import read_index
from .ffcv_out import MODE_JPG, MODE_RAW, read_beton
from pipelines.dataroot import decode_items, manifest_path
from .manifest import label_digest
from .state import read_json

SLICE = 2048  # beton samples per verify task


def _decodes(data: bytes, width: int | None = None, height: int | None = None) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # libjpeg's "premature end" warnings mean damage here
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as e:
        return f"does not decode ({type(e).__name__}: {e})"
    if img.mode != "RGB":
        return f"decodes as {img.mode}, not RGB"
    if width is not None and img.size != (width, height):
        return f"decodes to {img.size[0]}x{img.size[1]}, metadata says {width}x{height}"
    return None


def _check_file(out: Path, rel: str, size: int, sha: str) -> list[str]:
    path = out / rel
    if not path.is_file():
        return [f"{rel}: missing"]
    if path.stat().st_size != size:
        return [f"{rel}: {path.stat().st_size} bytes, manifest says {size}"]
    if sha256_file(path) != sha:
        return [f"{rel}: content differs from the manifest's sha256 (damaged or replaced)"]
    return []


def _shard_task(args) -> tuple[list[str], list[int]]:
    out, shard, num_classes = args
    rel, problems, labels = shard["path"], [], []
    problems += _check_file(out, rel, shard["bytes"], shard["sha256"])
    if problems and problems[0].endswith("missing"):
        return problems, labels
    try:
        with tarfile.open(out / rel) as tar:
            members = [m for m in tar if m.isfile()]
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                key, _, ext = m.name.partition(".")
                groups.setdefault(key, {})[ext] = m
            for key, parts in groups.items():
                if set(parts) != {"jpg", "cls"}:
                    problems.append(f"{rel}: sample {key} has components {sorted(parts)}, expected cls, jpg")
                    continue
                try:
                    label = int(tar.extractfile(parts["cls"]).read())
                except ValueError:
                    problems.append(f"{rel}: {key}.cls is not an integer")
                    continue
                if not 0 <= label < num_classes:
                    problems.append(f"{rel}: {key}.cls = {label} outside 0..{num_classes - 1}")
                labels.append(label)
                why = _decodes(tar.extractfile(parts["jpg"]).read())
                if why:
                    problems.append(f"{rel}: {key}.jpg {why}")
            expected = [[(ext, m.offset_data, m.size, m.name) for ext, m in parts.items()] for parts in groups.values()]
    except (tarfile.TarError, OSError) as e:
        return problems + [f"{rel}: not a readable tar ({e})"], labels
    if len(groups) != shard["images"]:
        problems.append(f"{rel}: {len(groups)} samples, manifest says {shard['images']}")
    try:
        if read_index(out / shard["index"]) != expected:
            problems.append(f"{shard['index']}: does not match {rel} (offsets, sizes or names differ)")
    except (OSError, ValueError, IndexError) as e:
        problems.append(f"{shard['index']}: unreadable index ({e})")
    return problems, labels


def _beton_task(args) -> list[str]:
    path, rel, start, stop = args
    meta, alloc, page = read_beton(path)
    problems = []
    with open(path, "rb") as f:
        for i in range(start, stop):
            m, a = meta[i], alloc[i]
            img = m["f0"]
            w, h, ptr, size = int(img["width"]), int(img["height"]), int(a["ptr"]), int(a["size"])
            if ptr != int(img["data_ptr"]) or (ptr % page) + size > page:
                problems.append(f"{rel}: sample {i} has an inconsistent or page-crossing pointer")
                continue
            f.seek(ptr)
            data = f.read(size)
            if int(img["mode"]) == MODE_RAW:
                if size != w * h * 3 or len(data) != size:
                    problems.append(f"{rel}: sample {i} raw payload is {len(data)} bytes, expected {w * h * 3}")
            elif int(img["mode"]) == MODE_JPG:
                why = _decodes(data, w, h)
                if why:
                    problems.append(f"{rel}: sample {i} {why}")
            else:
                problems.append(f"{rel}: sample {i} has unknown image mode {int(img['mode'])}")
    return problems


def _check_labels(name: str, what: str, labels, entry: dict) -> list[str]:
    labels = np.asarray(labels, dtype=np.int64)
    problems = []
    if len(labels) != entry["images"]:
        problems.append(f"{name} {what}: {len(labels)} images, manifest says {entry['images']}")
    if len(labels) and (labels.min() < 0 or labels.max() >= entry["num_classes"]):
        problems.append(f"{name} {what}: labels outside 0..{entry['num_classes'] - 1}")
    elif np.bincount(labels, minlength=entry["num_classes"]).tolist() != entry["class_counts"]:
        problems.append(f"{name} {what}: images per class differ from the manifest")
    if label_digest(labels) != entry["labels_sha256"]:
        problems.append(f"{name} {what}: label sequence differs from the manifest")
    return problems


def _check_items(out: Path, name: str, entry: dict) -> list[str]:
    """The item list: file intact, one line per stored image, labels the stored label sequence."""
    info = entry["items"]
    problems = _check_file(out, info["file"], info["bytes"], info["sha256"])
    if problems:
        return problems
    try:
        _, labels = decode_items((out / info["file"]).read_bytes())
    except (OSError, ValueError) as e:
        return [f"{info['file']}: unreadable item list ({e})"]
    return _check_labels(name, "items", labels, entry)


def verify(out: Path, workers: int = 1) -> list[str]:
    """All problems found (empty list: the outputs match the manifest)."""
    out = Path(out).resolve()
    manifest = read_json(manifest_path(out))
    if manifest is None:
        return [f"{manifest_path(out)}: missing or unreadable (the conversion has not finished)"]
    problems: list[str] = []
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(max(1, workers)) as pool:
        for name, entry in manifest["splits"].items():
            if "items" in entry:
                problems += _check_items(out, name, entry)
            beton_labels = None
            if "ffcv" in entry:
                b = entry["ffcv"]
                file_problems = _check_file(out, b["file"], b["bytes"], b["sha256"])
                problems += file_problems
                if not (file_problems and file_problems[0].endswith("missing")):
                    try:
                        meta, _, _ = read_beton(out / b["file"])
                        beton_labels = meta["f1"].astype(np.int64)
                        problems += _check_labels(name, "ffcv", beton_labels, entry)
                        tasks = [(out / b["file"], b["file"], s, min(s + SLICE, len(meta)))
                                 for s in range(0, len(meta), SLICE)]
                        for p in pool.imap(_beton_task, tasks):
                            problems += p
                    except (ValueError, OSError) as e:
                        problems.append(f"{b['file']}: not a readable beton ({e})")
            if "shards" in entry:
                labels: list[int] = []
                tasks = [(out, shard, entry["num_classes"]) for shard in entry["shards"]]
                for p, shard_labels in pool.imap(_shard_task, tasks):
                    problems += p
                    labels += shard_labels
                problems += _check_labels(name, "dali", labels, entry)
                if beton_labels is not None and beton_labels.tolist() != labels:
                    problems.append(f"{name}: FFCV and DALI outputs hold different label sequences")
    return problems
