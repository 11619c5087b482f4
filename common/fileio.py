"""Durable file replacement and file digests, shared by the checkpoint writer and the converter.

A file is written under a temporary name in its final folder, its data fsync'd, then renamed over
the final name: rename is atomic on POSIX, so a final name never holds a half-written file, even
after ``kill -9`` or a power cut. The folder is fsync'd afterwards, because the rename lives in
the directory entry and is not durable until the directory is flushed.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK = 1 << 22  # read 4 MiB at a time: a checkpoint or a .beton is hashed without loading it


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, final: Path) -> None:
    """Rename the already-fsync'd ``tmp`` to ``final`` and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, since
    4.7); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_from_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have (0666 less the umask): for files a
    library creates private (0600), which the user shares."""
    os.chmod(path, 0o666 & ~umask())


def commit(tmp: Path, final: Path) -> None:
    """fsync the data of a closed temporary file, then :func:`replace_durably` it to ``final``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    replace_durably(tmp, final)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (checkpoint records, the converter's manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
