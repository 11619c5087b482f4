"""Run logging: console progress, ``OUT/metrics.jsonl``, and Weights & Biases.

metrics.jsonl has one JSON object per log point (train: epoch, step, batch (the optimizer step within
the epoch), lr, train_loss, images_per_s, data_wait_frac, and on the epoch's last record its totals
``epoch_time_s``, ``epoch_images_per_s``, ``epoch_data_wait_frac``; eval: val_top1, val_top5,
val_loss; every record: ``time``, Unix seconds, and ``elapsed_s``, the run's wall time so far over all
its resumes) so tools (sweeps, plots) read runs without W&B.

The console (stderr) shows a tqdm bar per epoch when stderr is a terminal, and one plain line per
log point otherwise (CI logs, files, ``2>&1 | tee``), numbered by the step within the epoch as timm
numbers ``batch_idx``; each epoch ends with one line of its totals either way.
W&B gets the resolved config, the same metrics, and each epoch's checkpoint as a versioned model
artifact; ``offline`` writes under ``OUT/wandb`` (sync later with ``wandb sync``), ``online`` needs
``WANDB_API_KEY`` or a prior ``wandb login``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.config import LogConfig


class RunLogger:
    """Only rank 0 writes; other ranks get a logger whose methods do nothing."""

    def __init__(self, cfg: LogConfig, out: Path, config_dict: dict[str, Any], *, enabled: bool, run_id: str):
        self.cfg, self.out, self.enabled = cfg, Path(out), enabled
        self.wandb = None
        self._metrics = None
        self.records = 0  # records in metrics.jsonl (a checkpoint stores it: see truncate)
        self.start_clock(0.0)
        self._bar = None  # the epoch's tqdm bar, on a terminal only
        self._tty = sys.stderr.isatty()
        self._show_progress = cfg.progress  # log.progress: the bar or the per-log-point lines
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.out / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb != "off":
            self.wandb = start_wandb(cfg, self.out, config_dict, run_id)

    def truncate(self, records: int, step: int) -> None:
        """Keep what a resumed checkpoint had seen: its first ``records`` records (``records`` < 0:
        a checkpoint that did not count them, then the records of steps up to ``step``). A resumed
        run logs the rest again, so each log point keeps one record; the file is replaced
        atomically. A line cut by kill -9 is dropped."""
        if self._metrics is None:
            return
        from common.fileio import commit

        path = self.out / "metrics.jsonl"
        self._metrics.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if (len(kept) < records) if records >= 0 else (record.get("step", 0) <= step):
                kept.append(line)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        commit(tmp, path)
        self.records = len(kept)
        self._metrics = open(path, "a", buffering=1)

    @property
    def tty(self) -> bool:
        """stderr is a terminal: progress is a bar there, lines elsewhere."""
        return self._tty

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)  # above the bar, which stays at the bottom
        else:
            print(msg, file=sys.stderr, flush=True)

    def epoch_start(self, epoch: int, steps: int, done: int, res: int) -> None:
        """An epoch of ``steps`` optimizer steps begins (``done`` of them already, after a resume)."""
        if not self.enabled:
            return
        if done == 0:
            self.info(f"epoch {epoch}: train res {res}, {steps} steps")
        if self._show_progress and self._tty:
            from tqdm import tqdm

            self.end_progress()
            self._bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="step", file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def progress(self, rec: dict[str, Any], steps: int) -> None:
        """A train record on the console: the bar (or a plain line) at a log point, and the epoch's
        totals on its last record."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = rec["batch"]
            self._bar.set_postfix_str(_figures(rec), refresh=True)  # one redraw for both
        elif self._show_progress:
            self.info(format_progress(rec, steps))
        if "epoch_time_s" in rec:
            self.end_progress()
            self.info(format_epoch(rec))

    def start_clock(self, elapsed_before: float) -> None:
        """Count ``elapsed_s`` from now on top of ``elapsed_before`` (a resumed checkpoint's)."""
        self._clock, self._elapsed_before = time.monotonic(), elapsed_before

    def elapsed(self) -> float:
        """The run's wall time so far: this process's since :meth:`start_clock`, plus the earlier ones'."""
        return self._elapsed_before + time.monotonic() - self._clock

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3), "elapsed_s": round(self.elapsed(), 3)}
        self._metrics.write(json.dumps(record) + "\n")
        self.records += 1
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def artifact(self, path: Path, epoch: int, metadata: dict[str, Any]) -> None:
        if self.wandb is None:
            return
        import wandb

        art = wandb.Artifact(name=f"model-{self.wandb.id}", type="model", metadata={"epoch": epoch, **metadata})
        art.add_file(str(path), name="checkpoint.pt")
        self.wandb.log_artifact(art, aliases=["latest", f"epoch-{epoch}"])

    def end_progress(self) -> None:
        """The epoch's training is over (done, stopped or evaluated next): the bar goes."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.end_progress()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(cfg: LogConfig, out: Path, config_dict: dict[str, Any], run_id: str):
    """A W&B run for ``cfg`` in ``out``, as the engine starts one (also used by tools, e.g. Grad-CAM). Exits
    with a one-line SystemExit message when wandb is missing or ``online`` has no login."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: log.wandb is set but wandb is not installed; pip install -e '.[wandb]' "
                         "or set log.wandb=off") from None
    if cfg.wandb == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_login()):
        raise SystemExit("error: log.wandb=online needs WANDB_API_KEY (or `wandb login`); "
                         "use log.wandb=offline to log locally and `wandb sync` later")
    os.environ.setdefault("WANDB_SILENT", "true")
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.project, name=cfg.run_name or out.name, id=run_id, resume="allow",
                      dir=str(out), mode=cfg.wandb, config=config_dict)


def _has_netrc_login() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def say_once(msg: str, rank: int, world_size: int) -> None:
    """An error line that every rank finds alike (config, data, NaN): rank 0 prints it to stderr. Any
    other rank waits a few seconds before its caller exits: torchrun's agent SIGTERMs the whole group
    as soon as one rank exits non-zero, so a silent rank that got there first would kill rank 0 before
    its line is out (CI saw zero lines). Rank 0's own exit ends the group, so the wait costs nothing."""
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)
    elif world_size > 1:
        time.sleep(5)


def _figures(rec: dict[str, Any]) -> str:
    return (f"loss {rec['train_loss']:.4f} lr {rec['lr']:.3g} {rec['images_per_s']:.0f} img/s "
            f"data-wait {100 * rec['data_wait_frac']:.0f}%")


def format_progress(rec: dict[str, Any], steps: int) -> str:
    """One log point as a plain line: ``epoch 2 [50/234] loss ...``, the step counted within the epoch."""
    return f"epoch {rec['epoch']} [{rec['batch']}/{steps}] {_figures(rec)}"


def format_epoch(rec: dict[str, Any]) -> str:
    """An epoch's totals, from its last train record."""
    return (f"epoch {rec['epoch']}: trained in {rec['epoch_time_s']:.1f} s, {rec['epoch_images_per_s']:.0f} img/s, "
            f"data-wait {100 * rec['epoch_data_wait_frac']:.0f}%")
