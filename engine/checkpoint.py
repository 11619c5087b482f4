"""Checkpoints that survive kill -9: atomic writes, ``weights_only=True`` loads, auto-resume.

A checkpoint is written to a temporary file in the same folder, fsync'd, then renamed over its
final name (rename is atomic on POSIX), and the folder is fsync'd so the rename itself is durable.
A half-written file therefore never carries a checkpoint name. ``--resume auto`` takes the newest
checkpoint that loads; a damaged one is reported and skipped.

Everything stored is tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)``
reads it: no pickled code runs when a user loads a checkpoint from someone else.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.fileio import commit, replace_durably

CKPT_RE = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


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
    """Checkpoints in ``folder``, oldest first by global step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_good(folder: Path, log=print) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path)
        except Exception as e:  # damaged or foreign file: say so and try the next older one
            log(f"checkpoint {path.name} is unreadable ({type(e).__name__}); trying an older one")
    return None


def prune(folder: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(folder)
    for path in ckpts[: max(0, len(ckpts) - keep_last)]:
        path.unlink(missing_ok=True)


def export_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Weights only, for sharing: safetensors holds no code and loads without pickle."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    commit(tmp, Path(path))
