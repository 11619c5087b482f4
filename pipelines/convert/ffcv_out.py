"""FFCV output: per-chunk *part* files written by workers, assembled into one ``.beton``.

Why not FFCV's ``DatasetWriter``: it takes decoded pixels and JPEG-encodes them itself, so the
JPEG already made for the DALI shards would be encoded a second time (double the dominant cost,
and a different lossy generation in each format); and its shared-page writer cannot resume after
a kill. Instead workers store each sample's payload (the shared JPEG, or raw RGB in ``raw`` /
``proportion`` mode) in a part file, and once every chunk of a split is committed the parent packs
the parts into a beton in chunk order: the same sample order as the DALI shards.

The beton layout is FFCV 1.0's (file format version 2), written to the letter so ``ffcv.Loader``
reads it: header | field descriptors | per-sample metadata | data pages | allocation table.
A sample never crosses a page boundary, pages are aligned to absolute file offsets (FFCV's
process-cache reader maps ``ptr >> log2(page_size)`` to a page), and fields are
``image`` (RGBImageField, type id 2) and ``label`` (IntField, type id 1). The dtypes are
spelled out here because importing ``ffcv`` costs ~10 s; a test checks them against ffcv's.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
MIN_PAGE_SIZE = 1 << 23  # 8 MiB, the default page of FFCV's writer
MODE_JPG, MODE_RAW = 0, 1
TYPE_INT, TYPE_RGB_IMAGE = 1, 2

HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
SAMPLE_META = np.dtype([("", IMAGE_META), ("", "<i8")], align=True)  # fields f0 (image), f1 (label)
FIELDS = (("image", TYPE_RGB_IMAGE), ("label", TYPE_INT))

# What a part's sidecar stores per sample (payload bytes are concatenated in the .bin).
PART_META = np.dtype([("label", "<i8"), ("mode", "<u1"), ("width", "<u2"), ("height", "<u2"),
                      ("offset", "<u8"), ("size", "<u8")])


class PartWriter:
    """Appends payloads to ``<bin>`` and keeps their metadata for ``<bin>.npy`` (the sidecar)."""

    def __init__(self, bin_path: Path):
        self.f = open(bin_path, "wb")
        self.rows: list[tuple] = []
        self.pos = 0

    def add(self, label: int, mode: int, width: int, height: int, payload: bytes) -> None:
        self.f.write(payload)
        self.rows.append((label, mode, width, height, self.pos, len(payload)))
        self.pos += len(payload)

    def close(self, meta_path: Path) -> None:
        self.f.close()
        buf = io.BytesIO()
        np.save(buf, np.array(self.rows, dtype=PART_META))
        # np.save into a real file writes with fwrite and reports a full disk as
        # "OSError: N requested and M written" without an errno; a Python write raises ENOSPC.
        with open(meta_path, "wb") as f:
            f.write(buf.getbuffer())


def _page_size_for(largest: int) -> int:
    size = MIN_PAGE_SIZE
    while size < largest:
        size *= 2
    if size >= 1 << 32:
        raise ValueError(f"a sample of {largest} bytes does not fit an FFCV page (max 4 GiB)")
    return size


def _align(n: int, page: int) -> int:
    return -(-n // page) * page


def write_beton(path: Path, parts: list[tuple[Path, Path]]) -> dict:
    """Pack ``(bin, meta)`` parts, in order, into the beton at ``path``; returns its stats."""
    metas = [np.load(m) for _, m in parts]
    allmeta = np.concatenate(metas) if metas else np.zeros(0, PART_META)
    n = len(allmeta)
    page = _page_size_for(int(allmeta["size"].max()) if n else 0)

    header = np.zeros(1, HEADER)
    header["version"], header["num_fields"], header["page_size"], header["num_samples"] = (
        FORMAT_VERSION, len(FIELDS), page, n)
    desc = np.zeros(len(FIELDS), FIELD_DESC)
    for i, (name, type_id) in enumerate(FIELDS):
        desc[i]["type_id"] = type_id
        desc[i]["name"][: len(name)] = np.frombuffer(name.encode("ascii"), "<u1")
    meta = np.zeros(n, SAMPLE_META)
    meta["f0"]["mode"], meta["f0"]["width"], meta["f0"]["height"] = allmeta["mode"], allmeta["width"], allmeta["height"]
    meta["f1"] = allmeta["label"]
    alloc = np.zeros(n, ALLOC)
    alloc["sample_id"] = np.arange(n)
    alloc["size"] = allmeta["size"]

    data_start = _align(HEADER.itemsize + desc.nbytes + meta.nbytes, page)
    with open(path, "wb") as out:
        out.seek(data_start)
        pos, i = data_start, 0
        for (bin_path, _), pmeta in zip(parts, metas):
            with open(bin_path, "rb") as src:
                for row in pmeta:
                    size = int(row["size"])
                    if (pos % page) + size > page:  # would cross a page: start the next one
                        pos = _align(pos, page)
                        out.seek(pos)
                    src.seek(int(row["offset"]))
                    out.write(src.read(size))
                    meta["f0"]["data_ptr"][i] = pos
                    alloc["ptr"][i] = pos
                    pos += size
                    i += 1
        alloc_ptr = _align(pos, 8)
        out.seek(alloc_ptr)
        out.write(alloc.tobytes())
        header["alloc_table_ptr"] = alloc_ptr
        out.seek(0)
        out.write(header.tobytes())
        out.write(desc.tobytes())
        out.write(meta.tobytes())
    return {"images": n, "page_size": page, "labels": allmeta["label"].astype(np.int64)}


def read_beton(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(metadata, allocation table sorted by sample id, page size) of a beton, for --verify."""
    header = np.fromfile(path, HEADER, count=1)[0]
    if int(header["version"]) != FORMAT_VERSION or int(header["num_fields"]) != len(FIELDS):
        raise ValueError(f"not an FFCV v{FORMAT_VERSION} image+label beton")
    desc = np.fromfile(path, FIELD_DESC, count=len(FIELDS), offset=HEADER.itemsize)
    if [int(t) for t in desc["type_id"]] != [t for _, t in FIELDS]:
        raise ValueError("fields are not (RGBImageField, IntField)")
    n = int(header["num_samples"])
    meta = np.fromfile(path, SAMPLE_META, count=n, offset=HEADER.itemsize + desc.nbytes)
    alloc = np.fromfile(path, ALLOC, offset=int(header["alloc_table_ptr"]))
    alloc = alloc[np.argsort(alloc["sample_id"], kind="stable")]
    if len(meta) != n or len(alloc) != n or not np.array_equal(alloc["sample_id"], np.arange(n)):
        raise ValueError("metadata or allocation table is incomplete")
    return meta, alloc, int(header["page_size"])


