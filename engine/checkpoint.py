"""Checkpoints that survive kill -9, a full disk, flipped bytes and a diverging run.

Writing: ``atomic_save`` streams ``torch.save`` into a temporary file in the same folder while
hashing it (sha256), fsyncs it, writes the record ``<checkpoint>.json`` (digest, size, epoch,
step, tag, ``confirmed``) the same way, then renames the checkpoint over its final name and fsyncs
the folder (rename is atomic on POSIX). A final name therefore never holds a half-written file,
and every checkpoint has its record beside it. A full disk raises :class:`DiskFullError` naming
the folder and the bytes needed; the temporary file is removed and earlier checkpoints are
untouched. Temporary files left by a killed writer are removed at the next start
(``clean_stale_temps``).

Reading: ``load`` checks size and digest against the record before unpickling (a file changed
after it was written, e.g. 4 KiB of garbage in the middle, is refused), then loads with
``weights_only=True``: only tensors, numbers, strings and containers are rebuilt, no pickled code
runs. Every failure is an :class:`UnreadableCheckpoint` with a one-line reason.

Trust: a checkpoint is written only when its weights and optimizer state are finite (the engine
checks before saving) and is ``confirmed`` once a later loss check (the next log point, or the
evaluation of those weights) has passed. When a run stops on a NaN/Inf or diverging loss, the
checkpoints not yet confirmed are set aside (``reject``: renamed ``*.pt.rejected``), so
``--resume auto`` (``newest_usable``) continues from the last good one. ``prune`` keeps the newest
``keep_last`` end-of-epoch checkpoints, as many of the others (mid-epoch, interrupted) and the
newest confirmed one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.fileio import chmod_from_umask, commit, fsync_dir, replace_durably, sha256_file

CKPT_RE = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")
TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")  # ".<final name>.tmp-<pid>", as this module and fileio write them


class UnreadableCheckpoint(Exception):
    """A checkpoint that cannot be used; the message is one line saying why."""


class DiskFullError(OSError):
    """No space left for a file the run must write; the message names the folder and the bytes."""

    def __str__(self) -> str:
        return str(self.strerror)


def record_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".json")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class _HashingWriter:
    """A file wrapper that hashes and counts what ``torch.save`` writes through it. It keeps the
    OSError of a failed write: torch.save reports it as an unrelated RuntimeError."""

    def __init__(self, f):
        self.f, self.sha, self.bytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def disk_full(folder: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(folder).free if Path(folder).exists() else 0
    return DiskFullError(errno.ENOSPC, f"no space left on the device of {folder}: about {needed / 2**20:,.0f} MiB "
                         f"needed, {free / 2**20:,.0f} MiB free; free space there or use another --out")


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``obj`` to ``path`` and its record beside it (see the module doc); returns the record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        record = {"file": path.name, "sha256": writer.sha.hexdigest(), "bytes": writer.bytes,
                  "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "confirmed": False, **(meta or {})}
        _write_json(record_path(path), record)
        replace_durably(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        if is_disk_full(cause):
            raise disk_full(path.parent, state_bytes(obj)) from None
        raise
    return record


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC (or a quota), also when a library reports it in its own exception type."""
    if isinstance(e, DiskFullError):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "os error 28" in str(e)


def _write_via_temp(path: Path, write: Callable[[Path], None], needed: int) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then commit it over ``path``; on any failure
    the temporary file goes, and a full disk (also as a library's own error type) is
    :class:`DiskFullError` with ``needed`` bytes."""
    tmp = _temp_name(path)
    try:
        write(tmp)
        commit(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(path.parent, needed) from None
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_via_temp(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"), 4096)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record beside ``path``; None when there is none (a checkpoint from before records)."""
    rec = record_path(path)
    if not rec.is_file():
        return None
    try:
        return json.loads(rec.read_text())
    except (OSError, ValueError) as e:
        raise UnreadableCheckpoint(f"its record {rec.name} is unreadable ({type(e).__name__})") from None


def verify(path: Path, record: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Check ``path`` against its record (size, then sha256), or against ``record`` when given (another
    rank's reading of it: then every rank loads the same bytes); raises UnreadableCheckpoint."""
    path = Path(path)
    if record is None:
        record = read_record(path)
    if record is None:
        return None
    size = path.stat().st_size
    if size != record.get("bytes"):
        raise UnreadableCheckpoint(f"{size:,} bytes where {record.get('bytes'):,} were written (truncated or replaced)")
    if sha256_file(path) != record.get("sha256"):
        raise UnreadableCheckpoint("checksum mismatch: the file changed after it was written (disk or copy error)")
    return record


def load(path: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint's contents, verified against its record (or ``record``: :func:`verify`) and
    loaded with ``weights_only=True``."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UnreadableCheckpoint("no such file")
        verify(path, record)
    except OSError as e:  # EIO, ESTALE: the file system failed this reader
        raise UnreadableCheckpoint(f"it cannot be read here ({e.strerror or type(e).__name__})") from None
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint("not a complete checkpoint: torch.save writes a zip archive and this file does "
                                   "not end like one (truncated, or another kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnreadableCheckpoint("it holds objects other than tensors and plain data; refused, since "
                                   "loading it could run code (only files written by engine.run are accepted)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(f"not a complete checkpoint written by torch.save ({first})") from None


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every RNG the training step touches, in weights_only-safe types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- files in a run folder
def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest first by global step (rejected ones are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


class NoUsableCheckpoint(Exception):
    """Checkpoints exist but none can be used; the message lists them with the reasons."""


def newest_usable(folder: Path, log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies and loads, with its contents; None when the folder holds
    no checkpoint; :class:`NoUsableCheckpoint` when it holds some and none can be used (a silent
    fresh start would overwrite the run's exports and prune its own new checkpoints)."""
    failures = []
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load(path)
        except UnreadableCheckpoint as e:
            failures.append(f"{path.name}: {e}")
            log(f"checkpoint {path.name} is unusable ({e}); trying an older one")
            continue
        return path, state
    if failures:
        raise NoUsableCheckpoint(f"{folder} holds {len(failures)} checkpoint(s) and none can be used: "
                                 + "; ".join(failures))
    return None


def confirm(path: Path) -> None:
    """Mark ``path`` as confirmed by a passed loss check (its record's ``confirmed``)."""
    record = read_record(path) or {"file": Path(path).name}
    if not record.get("confirmed"):
        _write_json(record_path(path), {**record, "confirmed": True})


def last_confirmed(folder: Path) -> Path | None:
    for path in reversed(list_checkpoints(folder)):
        try:
            if (read_record(path) or {}).get("confirmed"):
                return path
        except UnreadableCheckpoint:
            continue
    return None


def reject(folder: Path) -> list[Path]:
    """Set aside every checkpoint newer than the last confirmed one (``*.pt.rejected``, record
    too): written since the last passed loss check, so they may hold the diverging weights."""
    keep = last_confirmed(folder)
    keep_step = -1 if keep is None else int(CKPT_RE.match(keep.name).group(2))
    moved = []
    for path in list_checkpoints(folder):
        if int(CKPT_RE.match(path.name).group(2)) > keep_step:
            os.replace(path, path.with_name(path.name + ".rejected"))
            if record_path(path).exists():
                os.replace(record_path(path), path.with_name(path.name + ".rejected.json"))
            moved.append(path)
    if moved:
        fsync_dir(Path(folder))
    return moved


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` end-of-epoch checkpoints (tag ``epoch`` in their record; one
    without a record counts as one), the newest ``keep_last`` of the others (mid-epoch, interrupted:
    the resume points between epochs) and the newest confirmed checkpoint; remove the rest. Mid-epoch
    checkpoints every few minutes therefore never push the last epochs out, as
    ``checkpoint.keep_last`` promises (timm's ``--checkpoint-hist`` counts epochs too)."""
    ckpts = list_checkpoints(folder)
    epochs, others = [], []
    for path in ckpts:
        try:
            tag = (read_record(path) or {}).get("tag", "epoch")
        except UnreadableCheckpoint:
            tag = "epoch"
        (epochs if tag == "epoch" else others).append(path)
    keep = set(epochs[len(epochs) - keep_last:] + others[len(others) - keep_last:]) if keep_last > 0 else set()
    confirmed = last_confirmed(folder)
    if confirmed is not None:
        keep.add(confirmed)
    for path in ckpts:
        if path not in keep:
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)


def clean_stale_temps(folder: Path) -> tuple[int, int]:
    """Remove temporary files (``.<name>.tmp-<pid>``) whose writer is no longer running; returns
    (files, bytes). A killed save leaves one as large as a checkpoint."""
    folder = Path(folder)
    count = size = 0
    if not folder.is_dir():
        return 0, 0
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            size += p.stat().st_size
            p.unlink(missing_ok=True)
            count += 1
    return count, size


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a temp of ours from before a restart of this pid cannot be in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Weights only, for sharing: safetensors holds no code and loads without pickle."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        chmod_from_umask(tmp)  # safetensors creates its file 0600; an export is for sharing

    # safetensors reports ENOSPC as its own SafetensorError: _write_via_temp recognizes it too
    _write_via_temp(Path(path), write, state_bytes(tensors))
