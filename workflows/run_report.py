"""A finished run read back from its folder: the few figures a person checks first, and a picture.

``summarize`` reads ``OUT/metrics.jsonl`` (engine/logging.py writes it) and gives the final val
top-1, the training images/s and data-wait over all epochs (each epoch's totals weighted by its
time, evaluation excluded), the wall time and the run folder; ``format_summary`` prints them as a
short block; ``plot_metrics`` draws train loss, learning rate and val top-1 against the run's wall
time into one PNG (``metrics.png``). Used by ``make demo`` (tools/demo.py); works on any run folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl``; a line cut by kill -9 is skipped."""
    records = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def summarize(out: Path, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Final val top-1/top-5, images/s and data-wait over the epochs' training time, wall time."""
    records = read_metrics(out) if records is None else records
    evals = [r for r in records if "val_top1" in r]
    epochs = [r for r in records if "epoch_time_s" in r]
    train_s = sum(r["epoch_time_s"] for r in epochs)
    images = sum(r["epoch_images_per_s"] * r["epoch_time_s"] for r in epochs)
    waited = sum(r["epoch_data_wait_frac"] * r["epoch_time_s"] for r in epochs)
    return {"val_top1": evals[-1]["val_top1"] if evals else None,
            "val_top5": evals[-1]["val_top5"] if evals else None,
            "epochs": len(epochs), "train_s": train_s,
            "images_per_s": images / train_s if train_s else None,
            "data_wait_frac": waited / train_s if train_s else None,
            "wall_s": records[-1]["elapsed_s"] if records else 0.0, "out": str(out)}


def format_summary(s: dict[str, Any], *, pipeline: str, device: str, png: Path | None) -> str:
    """Five lines a person reads at a glance."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"

    lines = [f"val top-1      {pct(s['val_top1'])}   (top-5 {pct(s['val_top5'])})",
             f"throughput     {s['images_per_s']:,.0f} img/s training ({pipeline} on {device}), "
             f"data-wait {100 * s['data_wait_frac']:.0f}%" if s["images_per_s"] else "throughput     -",
             f"wall time      {minutes(s['wall_s'])} for {s['epochs']} epoch{'' if s['epochs'] == 1 else 's'} "
             f"({minutes(s['train_s'])} training, the rest evaluation and checkpoints)",
             f"run folder     {s['out']}"]
    if png is not None:
        lines.append(f"curves         {png}")
    width = max(len(line) for line in lines)
    return "\n".join(["=" * width, *lines, "=" * width])


def minutes(seconds: float) -> str:
    """``3 min 05 s``, or ``42 s`` under a minute."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def plot_metrics(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss, learning rate and val top-1 against wall time (minutes), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = ((axes[0], train, "train_loss", "train loss"), (axes[1], train, "lr", "learning rate"),
              (axes[2], evals, "val_top1", "val top-1 (%)"))
    for ax, recs, key, label in panels:
        ax.plot([r["elapsed_s"] / 60 for r in recs], [r[key] for r in recs], marker="o" if recs is evals else None,
                markersize=4)
        ax.set_xlabel("wall time (min)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for r in records:  # epoch boundaries, where each epoch's training ended
        if "epoch_time_s" in r:
            for ax in axes:
                ax.axvline(r["elapsed_s"] / 60, color="grey", lw=0.6, ls=":")
    if evals:
        last = evals[-1]
        axes[2].annotate(f"{last['val_top1']:.2f}", (last["elapsed_s"] / 60, last["val_top1"]),
                         textcoords="offset points", xytext=(-30, -14), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
