"""A trained model back from a run's files, for the tools (evaluate, Grad-CAM).

Two inputs are accepted:

* a training checkpoint ``ckpt-*.pt`` (``engine.checkpoint.load``, ``weights_only=True``): the
  resolved config is inside; the weights are the EMA weights when the run kept an EMA, since
  those are what the engine evaluates and exports;
* a ``*.safetensors`` export (``best`` / ``model``): weights only, plus string metadata that holds
  the resolved config as JSON (exports written before that was added only name arch and
  num_classes: then ``recipe`` must give the rest of the model section).

The model comes back in eval mode, in channels_last memory when the run trained that way, so that
evaluating it runs the very kernels the engine ran (that is what makes ``tools/evaluate.py``
reproduce the engine's top-1 exactly).

A recipe's ``data.root`` is usually relative (``data/imagenet``): relative to the folder the run was
started in, which checkpoints and exports record (``workdir``). :func:`run_data_root` resolves it
there (else here), so a tool started from another folder reads the run's own data, or says which
paths it tried.
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint as ckpt
from common.config import Config, ConfigError, config_from_dict, load_config
from models.factory import create_model
from pipelines.base import DataError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(ValueError):
    """The file is missing or not a checkpoint/export of this project; one-line message."""


def _not_a_checkpoint(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot be a ``kind`` ("pt" or "safetensors") file at all, judged by its first bytes:
    a text file or another format is named as such rather than as a damaged checkpoint; None when
    the start fits (a file cut short is then found by the reader)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "it is empty"
    if kind == "pt" and head.startswith(ZIP_MAGIC):
        return None
    if kind == "safetensors" and len(head) > 8 and head[8:9] == b"{":  # u64 header length, then its JSON
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"it is a text file (it starts {first!r})"
    what = "a zip archive (torch.save)" if kind == "pt" else "a safetensors file"
    return f"it is not {what}"


def load_config_and_state(path: str | Path,
                          recipe: str | None = None) -> tuple[Config, dict[str, torch.Tensor], str | None]:
    """(the run's config, the weights to evaluate, the folder the run was started in when recorded).
    With ``recipe`` the config is that recipe's, whose paths are relative to this folder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass a ckpt-*.pt or *.safetensors file from a run folder")
    kind = "safetensors" if path.suffix == ".safetensors" else "pt"
    why = _not_a_checkpoint(path, kind)
    if why:
        raise CheckpointError(f"{path} is not a checkpoint: {why}; pass a ckpt-*.pt or *.safetensors file "
                              "from a run folder")
    if kind == "safetensors":
        return _from_safetensors(path, recipe)
    try:
        state = ckpt.load(path)
    except ckpt.UnreadableCheckpoint as e:  # truncated, changed, not a torch file, pickled code refused
        raise CheckpointError(f"cannot use {path} as a checkpoint: {e}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by engine.run (no model/config inside)")
    cfg = config_from_dict(state["config"]) if recipe is None else load_config(recipe)
    weights = state["ema"] if state.get("ema") else state["model"]
    return cfg, weights, state.get("workdir") if recipe is None else None


def _from_safetensors(path: Path, recipe: str | None) -> tuple[Config, dict[str, torch.Tensor], str | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except Exception as e:  # safetensors' own error types for truncated or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} as safetensors ({first})") from None
    if recipe is not None:
        cfg = load_config(recipe)
    elif "config" in meta:
        cfg = config_from_dict(json.loads(meta["config"]))
    elif "arch" in meta:
        print(f"note: {path} carries no run config (an export from before it was stored); the rest of the settings "
              "are defaults (e.g. train.precision=auto): pass --recipe RECIPE.toml for the run's own", file=sys.stderr)
        cfg = Config()
        cfg = replace(cfg, model=replace(cfg.model, arch=meta["arch"]),
                      data=replace(cfg.data, num_classes=int(meta.get("num_classes", cfg.data.num_classes))),
                      eval=replace(cfg.eval, res=int(meta.get("eval_res", cfg.eval.res)),
                                   crop_pct=float(meta.get("crop_pct", cfg.eval.crop_pct))))
    else:
        raise CheckpointError(f"{path} carries no config metadata; pass --recipe RECIPE.toml for its model settings")
    return cfg, weights, meta.get("workdir") if recipe is None else None


def run_data_root(root: str, workdir: str | None) -> str:
    """The run's ``data.root`` as a path to read here: as it is when absolute; a relative one against
    the run's recorded working folder, else against the current folder (checkpoints from before the
    working folder was recorded). Raises DataError naming every path tried."""
    path = Path(root)
    if path.is_absolute():
        tried = [path]
    else:
        tried = list(dict.fromkeys(([Path(workdir) / path] if workdir else []) + [Path.cwd() / path]))
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    places = " or ".join(str(p) for p in tried)
    if path.is_absolute():
        where = ""
    elif workdir:
        where = " (against the run's working folder, then the current one)"
    else:
        where = " (against the current folder: no working folder recorded)"
    raise DataError(f"data.root {root} not found: tried {places}{where}; pass --data with the converted val data")


def build_model(cfg: Config, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    model = create_model(cfg.model, cfg.data.num_classes)
    own = model.state_dict()
    for key, value in weights.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(f"weights do not fit model.arch={cfg.model.arch} with {cfg.data.num_classes} classes: "
                                  f"{key} is {list(value.shape)} in the file, {list(own[key].shape)} in the model; "
                                  f"pass the recipe the run used with --recipe (or none: the file's own config)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit model.arch={cfg.model.arch} with {cfg.data.num_classes} classes "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                              f"{(missing or unexpected)[0]}); pass the recipe the run used with --recipe")
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def load_model(path: str | Path, device: torch.device | str = "cpu", recipe: str | None = None,
               data: str | None = None) -> tuple[nn.Module, Config]:
    """(model in eval mode on ``device``, the run's resolved config with ``data.root`` set to ``data``,
    else to the run's own data found by :func:`run_data_root`). Raises CheckpointError, ConfigError or
    DataError with a one-line message."""
    cfg, weights, workdir = load_config_and_state(path, recipe)
    model = build_model(cfg, weights, torch.device(device))  # first: weights that do not fit say so
    root = data or run_data_root(cfg.data.root, workdir)
    return model, replace(cfg, data=replace(cfg.data, root=root))


__all__ = ["CheckpointError", "ConfigError", "load_config_and_state", "run_data_root", "build_model", "load_model"]
