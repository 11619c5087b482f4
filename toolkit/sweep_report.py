"""Sweep results: one row per trial (results.csv), a markdown table sorted by val top-1 with a second
table of seed repeats (mean and std per configuration, as the RSB paper's seed study reports), and a
plot (sweep.png). Reads only what the trials wrote (trial.json, metrics.jsonl), so it can be rerun
at any time, also while Slurm jobs are still running.

Std is the sample standard deviation (n - 1 in the denominator), the usual choice for a few seeds.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from toolkit.sweep import TrialSpec, final_eval, format_value, read_trial

METRICS = ("val_top1", "val_top5", "val_loss")


def collect(trials: list[TrialSpec]) -> list[dict[str, Any]]:
    """One row per planned trial, in plan order; trials never launched have status ``pending``."""
    rows = []
    for t in trials:
        record = read_trial(t.folder) or {}
        status = record.get("status", "pending")
        final = record.get("metrics") if status == "done" else None
        if status == "done" and final is None:  # written by an older tool version: read the run itself
            final = final_eval(Path(t.folder) / "metrics.jsonl")
        row: dict[str, Any] = {"trial": t.name, **{k: v for k, v in t.swept.items()}, "seed": t.seed}
        for m in METRICS:
            row[m] = final.get(m) if final else None
        row.update(epoch=final.get("epoch") if final else None, step=final.get("step") if final else None,
                   wall_s=record.get("wall_s"), status=status,
                   overrides=" ".join(f"{k}={format_value(v)}" for k, v in t.swept.items()),
                   folder=t.folder)
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best val top-1 first; trials without a result last, in plan order."""
    return sorted(rows, key=lambda r: (r["val_top1"] is None, -(r["val_top1"] or 0.0), r["val_loss"] or 0.0))


def group_seeds(rows: list[dict[str, Any]], swept_keys: list[str]) -> list[dict[str, Any]]:
    """Seed repeats of each configuration: n finished seeds, mean and std of val top-1 (and mean top-5)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(format_value(r[k]) for k in swept_keys), []).append(r)
    out = []
    for key, members in groups.items():
        top1 = [r["val_top1"] for r in members if r["val_top1"] is not None]
        top5 = [r["val_top5"] for r in members if r["val_top5"] is not None]
        out.append({**{k: members[0][k] for k in swept_keys}, "n": len(top1), "trials": len(members),
                    "mean_top1": statistics.fmean(top1) if top1 else None,
                    "std_top1": statistics.stdev(top1) if len(top1) > 1 else None,
                    "mean_top5": statistics.fmean(top5) if top5 else None})
    return sorted(out, key=lambda g: (g["mean_top1"] is None, -(g["mean_top1"] or 0.0)))


def write_csv(rows: list[dict[str, Any]], swept_keys: list[str], path: Path) -> None:
    columns = ["trial", *swept_keys, "seed", *METRICS, "epoch", "step", "wall_s", "status", "overrides", "folder"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in sort_rows(rows):
            writer.writerow({c: "" if r.get(c) is None else r[c] for c in columns})


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _value(value: Any) -> str:
    """A swept value exactly as passed to --set (0.0001 stays 0.0001)."""
    return format_value(value).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], swept_keys: list[str], title: str) -> str:
    lines = [f"# {title}", "", f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} trials done.", "",
             "## Trials, best val top-1 first", ""]
    head = [*swept_keys, "seed", "val top-1", "val top-5", "val loss", "epoch", "step", "wall s", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sort_rows(rows):
        cells = [_value(r[k]) for k in swept_keys] + [str(r["seed"]), _cell(r["val_top1"]), _cell(r["val_top5"]),
                                                     _cell(r["val_loss"], 4), _cell(r["epoch"]), _cell(r["step"]),
                                                     _cell(r["wall_s"], 0), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Seed repeats: val top-1 mean and std (n - 1) per configuration", ""]
    head = [*swept_keys, "n", "mean top-1", "std top-1", "mean top-5"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in group_seeds(rows, swept_keys):
        cells = [_value(g[k]) for k in swept_keys] + [f"{g['n']}/{g['trials']}", _cell(g["mean_top1"]),
                                                     _cell(g["std_top1"]), _cell(g["mean_top5"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(rows: list[dict[str, Any]], swept_keys: list[str], path: Path, title: str) -> bool:
    """Val top-1 per configuration with seed error bars (std), every seed as a dot; against the swept
    value when exactly one numeric key is swept (log axis when it spans a factor 10 or more).
    Returns False (and writes nothing) when no trial has a result yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in group_seeds(rows, swept_keys) if g["mean_top1"] is not None]
    if not groups:
        return False
    done = [r for r in rows if r["val_top1"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if len(swept_keys) == 1 and _numeric([g[swept_keys[0]] for g in groups]):
        key = swept_keys[0]
        groups.sort(key=lambda g: g[key])
        xs = [g[key] for g in groups]
        ax.errorbar(xs, [g["mean_top1"] for g in groups], yerr=[g["std_top1"] or 0.0 for g in groups],
                    marker="o", capsize=4, label="mean ± std over seeds")
        ax.scatter([r[key] for r in done], [r["val_top1"] for r in done], s=14, color="0.5", zorder=3,
                   label="one seed")
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.legend(loc="best", fontsize=8)
    else:
        labels = [", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(g[k])}" for k in swept_keys) or "base"
                  for g in groups]
        ys = list(range(len(groups)))[::-1]
        ax.barh(ys, [g["mean_top1"] for g in groups], xerr=[g["std_top1"] or 0.0 for g in groups], capsize=4,
                color="tab:blue", alpha=0.7)
        position = {tuple(format_value(g[k]) for k in swept_keys): y for g, y in zip(groups, ys)}
        ax.scatter([r["val_top1"] for r in done], [position[tuple(format_value(r[k]) for k in swept_keys)]
                                                  for r in done], s=14, color="0.2", zorder=3)
        ax.set_yticks(ys, labels, fontsize=8)
        lo = min(r["val_top1"] for r in done)
        ax.set_xlim(max(0.0, math.floor(lo - 5)), None)
        ax.set_xlabel("val top-1 (%)")
    if len(swept_keys) == 1 and _numeric([g[swept_keys[0]] for g in groups]):
        ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(trials: list[TrialSpec], swept_keys: list[str], out: Path, title: str) -> list[dict[str, Any]]:
    """results.csv, results.md and sweep.png in ``out``; returns the rows, best first."""
    rows = collect(trials)
    write_csv(rows, swept_keys, out / "results.csv")
    (out / "results.md").write_text(markdown(rows, swept_keys, title))
    plot(rows, swept_keys, out / "sweep.png", title)
    return sort_rows(rows)
