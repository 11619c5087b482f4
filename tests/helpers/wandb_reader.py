"""Reads a W&B offline run file (``run-<id>.wandb``) back, for tests.

wandb 0.31 ships no Python reader for its transaction log. The file is a LevelDB-style log: a 7-byte
header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type FULL/FIRST/MIDDLE/LAST); the joined chunks are serialized ``wandb.proto``
``Record`` messages. Only the protobuf schema comes from wandb itself.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block tail too short for a header: padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def read_offline_run(run_dir: Path, until=None, timeout_s: float = 30.0) -> dict:
    """{"config": nested dict, "history": [row dicts], "artifacts": [{"type", "name", "metadata"}]}.

    ``until(found)``: read again (every 0.2 s, up to ``timeout_s``) until it holds. wandb-core, a
    process of its own that outlives the run, writes the file: seen once in a CI-like run, a
    process that had called ``run.finish()`` and exited left its last history row to be written
    after the test had read the file."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = _read_offline_run(run_dir)
        except Exception:  # a record being written at the file's end
            if time.monotonic() > deadline:
                raise
            found = None
        if found is not None and (until is None or until(found) or time.monotonic() > deadline):
            return found
        time.sleep(0.2)


def _read_offline_run(run_dir: Path) -> dict:
    (path,) = Path(run_dir).glob("run-*.wandb")
    config, history, artifacts = {}, [], []
    for r in iter_records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("config", "run"):
            items = r.config.update if kind == "config" else r.run.config.update
            for item in items:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    config[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
        elif kind == "artifact":
            artifacts.append({"type": r.artifact.type, "name": r.artifact.name,
                              "metadata": json.loads(r.artifact.metadata or "{}")})
    config = {k: (v.get("value", v) if isinstance(v, dict) and set(v) <= {"value", "desc"} else v)
              for k, v in config.items()}
    return {"config": config, "history": history, "artifacts": artifacts}
