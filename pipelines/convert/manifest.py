"""Writing ``manifest.json``. Its format (every key) and its reading are documented in one place,
:mod:`pipelines.dataroot`, which the readers and this converter both import."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from pipelines.dataroot import SCHEMA

from . import TOOL_VERSION

EXIF_POLICY = "ignored, as PIL Image.open(p).convert('RGB') (the reference loader) ignores it"


def split_paths(out: Path, split: str, chunk: int) -> dict[str, Path]:
    stem = f"shard-{chunk:05d}"
    parts = out / "ffcv" / ".parts" / split
    return {"tar": out / "dali" / split / f"{stem}.tar", "idx": out / "dali" / split / f"{stem}.idx",
            "part": parts / f"part-{chunk:05d}.bin", "part_meta": parts / f"part-{chunk:05d}.npy"}


def label_digest(labels) -> str:
    return hashlib.sha256(np.asarray(labels, dtype="<i8").tobytes()).hexdigest()


def build_manifest(src: Path, settings: dict, formats: list[str], splits: dict) -> dict:
    """``splits``: name -> (SplitSource, chunk records in order, beton info or None, items info)."""
    out = {"version": TOOL_VERSION, "format": SCHEMA, "source": str(src), "formats": formats,
           "settings": settings, "exif_orientation": EXIF_POLICY,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": {}}
    for name, (source, records, beton, items) in splits.items():
        labels = [lab for r in records for lab in r["labels"]]
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(source.classes))
        entry = {"images": len(labels), "classes": source.classes, "num_classes": len(source.classes),
                 "class_counts": counts.tolist(), "labels_sha256": label_digest(labels),
                 "source_kind": source.kind,
                 "skipped": source.skipped + [s for r in records for s in r["skipped"]], "items": items,
                 "jpeg_passed_through": sum(r.get("jpeg_passed_through", 0) for r in records),
                 "jpeg_reencoded": sum(r.get("jpeg_reencoded", 0) for r in records)}
        if beton is not None:
            entry["ffcv"] = beton
        if "dali" in formats:
            entry["shards"] = [r["shard"] for r in records if r["shard"]]
        out["splits"][name] = entry
    return out
