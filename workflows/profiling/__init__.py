"""The throughput profiler behind ``tools/profile_throughput.py``: :func:`profile` measures every
(batch size, resolution) point (``measure``), reads the figures (``verdict``) and returns the report
that ``report.write_profile`` writes (profile.json, profile.png) and ``report.format_table`` prints.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.config import load_config, to_dict
from pipelines.build import check_data_root

from . import measure, report, verdict
from .measure import (PROFILE_MODES, ProfileError, apply_toggles, environment, measure_data, measure_stage2,
                      measure_step, parse_int_list, resolve_device)
from .verdict import add_ceiling_ratios, diagnose, merge_repeats, spread_note

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["ProfileError", "PROFILE_MODES", "default_out", "measure", "profile", "report", "verdict"]


def default_out(recipe: str | Path) -> Path:
    """runs/profile-<recipe name> under the repository root."""
    return ROOT / "runs" / f"profile-{Path(recipe).stem}"


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def profile(recipe: str | Path, mode: str, *, overrides: list[str] = (), batch_sizes: str | None = None,
            resolutions: str | None = None, steps: int = 20, warmup: int = 5, repeats: int = 1,
            threads: int | None = None, device: str | None = None, amp: bool | None = None,
            channels_last: bool | None = None, compile: bool | None = None, out: Path | None = None,
            progress: Callable[[str], None] = _to_stderr) -> dict[str, Any]:
    """Measure every (batch size, resolution) point of ``mode`` (one of :data:`PROFILE_MODES`) for
    ``recipe`` with ``overrides``; returns the report that :func:`write_profile` writes, with the
    folder it goes to under ``"out"`` (created here, before measuring). ``batch_sizes`` and
    ``resolutions`` are comma lists (default: the recipe's per-device batch and train resolution);
    the toggles are :func:`apply_toggles`'. Each point is measured ``repeats`` times, interleaved,
    and the median kept. ``progress`` gets one line before each measurement. Raises ProfileError,
    ConfigError, DataError, MissingBackendError with a one-line message."""
    if mode not in PROFILE_MODES:
        raise ProfileError(f"unknown mode {mode!r}; choose one of {', '.join(PROFILE_MODES)}")
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ProfileError("--steps and --repeats must be >= 1, --warmup >= 0")
    dev = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ProfileError("--threads must be >= 1")
        torch.set_num_threads(threads)
    overrides = list(overrides)
    cfg = load_config(recipe, overrides)
    cfg = apply_toggles(cfg, amp=amp, channels_last=channels_last, compile=compile, device=dev)
    t = cfg.train
    batches = parse_int_list(batch_sizes, "--batch-sizes") if batch_sizes else [t.per_device_batch_size
                                                                                 or t.global_batch_size]
    res_list = parse_int_list(resolutions, "--resolutions") if resolutions else [t.train_res]
    modes = ("data", "model", "e2e") if mode == "all" else (mode,)
    if cfg.data.pipeline != "synthetic" and modes != ("model",):
        check_data_root(cfg.data)  # before any progress line, so the error is the only output
    if "e2e" in modes and "model" not in modes:
        modes = ("model", *modes)  # e2e is read against the bare step at the same point
    out = Path(out) if out else default_out(recipe)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    started = time.perf_counter()
    for repeat in range(repeats):
        for res in res_list:
            for batch in batches:
                kw = dict(steps=steps, warmup=warmup, device=dev)
                progress(f"measuring stage 2: batch {batch}, res {res}, round {repeat + 1}/{repeats}")
                rows.append(measure_stage2(cfg, batch, res, **kw))  # every mode's verdict reads it
                for m in modes:
                    progress(f"measuring {m}: batch {batch}, res {res}, round {repeat + 1}/{repeats}")
                    if m == "data":
                        rows += measure_data(cfg, batch, res, **kw)
                    else:
                        rows.append(measure_step(cfg, batch, res, synthetic=m == "model", **kw))
    rows = merge_repeats(rows)
    add_ceiling_ratios(rows)
    env = environment(dev, cfg)
    findings = diagnose(rows, env)
    title = f"{Path(recipe).name} on {env['device_name']} ({env['device']}), {cfg.data.pipeline}, " \
            f"{cfg.data.workers} workers, {t.precision}, {env['torch_threads']} torch threads"
    return {"recipe": str(recipe), "overrides": overrides, "mode": mode,
            "settings": {"batch_sizes": batches, "resolutions": res_list, "steps": steps,
                         "warmup": warmup, "repeats": repeats, "precision": t.precision,
                         "channels_last": t.channels_last,
                         "compile": t.compile},
            "environment": env, "measurements": rows, "findings": findings, "bottleneck": findings[0][1],
            "note": spread_note(rows),
            "seconds_total": time.perf_counter() - started, "config": to_dict(cfg), "out": str(out),
            "title": title}


