"""DALI shards: webdataset tars of ``<key>.jpg`` + ``<key>.cls`` (label as ASCII digits), each with
the index file that ``fn.readers.webdataset(index_paths=...)`` needs for random access and sharding.

Tars are plain ustar with fixed owner and mtime, so the same input gives byte-identical shards
(a resumed run reproduces exactly what an uninterrupted one writes). The index is made by DALI's
own ``wds2idx`` tool when the DALI wheel provides it (the module ships at top level); otherwise
by :func:`index_text`, which writes the same v1.2 text format from the offsets we wrote.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

INDEX_VERSION = "v1.2"


def member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Streams ``(key, jpeg, label)`` samples into a tar, so a worker never holds a shard in memory."""

    def __init__(self, path: Path):
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.members: list[tuple[str, str, int, int]] = []  # (key, ext, data offset, size)

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        for ext, data in (("jpg", jpeg), ("cls", str(label).encode())):
            header_at = self.tar.offset  # a ustar member is one 512-byte header block, then its data
            self.tar.addfile(member_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
            self.members.append((key, ext, header_at + tarfile.BLOCKSIZE, len(data)))

    def close(self) -> list[tuple[str, str, int, int]]:
        self.tar.close()
        return self.members


def write_shard(path: Path, samples) -> list[tuple[str, str, int, int]]:
    """Write ``(key, jpeg, label)`` samples; returns ``(key, ext, data_offset, size)`` per member."""
    writer = ShardWriter(path)
    for key, jpeg, label in samples:
        writer.add(key, jpeg, label)
    return writer.close()


def index_text(members: list[tuple[str, str, int, int]]) -> str:
    """DALI's webdataset index: a ``v1.2 <samples>`` line, then per sample its components as
    ``<ext> <data offset> <size> <member name>`` triples-plus-name on one line."""
    samples: list[list[str]] = []
    last = None
    for key, ext, offset, size in members:
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(f"{ext} {offset} {size} {key}.{ext}")
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def write_index(tar_path: Path, idx_path: Path, members: list[tuple[str, str, int, int]]) -> str:
    """Index ``tar_path`` into ``idx_path``; returns which tool made it (``wds2idx`` or ``builtin``)."""
    try:
        from wds2idx import IndexCreator
    except ImportError:
        idx_path.write_text(index_text(members))
        return "builtin"
    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()
    return "wds2idx"


def read_index(path: Path) -> list[list[tuple[str, int, int, str]]]:
    """Parse an index file into per-sample component lists (used by --verify)."""
    lines = path.read_text().splitlines()
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != len(lines) - 1:
        raise ValueError(f"bad index header {lines[0]!r}")
    out = []
    for line in lines[1:]:
        f = line.split()
        if len(f) % 4:
            raise ValueError(f"bad index line {line!r}")
        out.append([(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3]) for i in range(0, len(f), 4)])
    return out
