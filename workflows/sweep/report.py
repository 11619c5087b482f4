"""Sweep results: one row per trial (results.csv), a markdown table sorted by val top-1 with a second
table of seed repeats (mean and std per configuration, as the RSB paper's seed study reports; left
out when every configuration ran one seed), and a plot (sweep.png). Reads only what the trials
wrote (trial.json, metrics.jsonl), so it can be rerun at any time, also while Slurm jobs are still
running.

Std over seeds is the sample standard deviation (n - 1 in the denominator), the usual choice for a
few seeds.

Sampling noise: a top-1 measured on n val images is a binomial proportion, whose standard error is
sigma = sqrt(p (1 - p) / n) (600 images at 10%: 1.2 points). Two trials evaluated on the same n
images are told apart only when their gap exceeds 2 sqrt(sigma_1^2 + sigma_2^2) (a two-sided test
at about 95%, treating the two as independent, which errs on the cautious side for one shared val
set); the table marks the trials within that of the best as "~ best". ``epochs`` is what each trial
trained: whole epochs, plus the fraction of a last epoch that ``max_steps`` cut short.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from workflows.sweep.plan import TrialSpec, format_value
from workflows.sweep.run import final_eval, read_trial

METRICS = ("val_top1", "val_top5", "val_loss")
NOISE_Z = 2.0  # gaps within NOISE_Z standard errors of the difference are sampling noise


def top1_sigma(top1: float, n: int) -> float:
    """Standard error, in points, of a top-1 (percent) measured on ``n`` images (binomial)."""
    p = min(max(top1 / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def within_noise(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when the top-1 gap of trials ``a`` and ``b`` is within NOISE_Z standard errors of the difference."""
    if not a.get("val_images") or not b.get("val_images"):
        return False
    sigma = math.hypot(top1_sigma(a["val_top1"], a["val_images"]), top1_sigma(b["val_top1"], b["val_images"]))
    return abs(a["val_top1"] - b["val_top1"]) <= NOISE_Z * sigma


def epochs_trained(metrics_path: Path, final: dict[str, Any]) -> float | None:
    """Epochs the run trained up to its final eval: ``final["epoch"] + 1`` when that epoch ran to its end
    (metrics.jsonl holds its epoch-total record), else its steps over the steps per epoch (every train
    record carries ``steps_per_epoch``; older runs: read from a whole epoch's record); None when
    neither tells the steps per epoch."""
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    epoch = final["epoch"]
    totals = [r for r in records if "epoch_time_s" in r]
    if any(r["epoch"] == epoch for r in totals):
        return float(epoch + 1)
    per_epoch = next((r["steps_per_epoch"] for r in reversed(records) if r.get("steps_per_epoch")), None)
    if per_epoch is None and totals:  # a run logged before records carried steps_per_epoch
        per_epoch = totals[-1]["batch"]  # a whole epoch's last record: batch = steps per epoch
    return final["step"] / per_epoch if per_epoch else None


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
        if status == "pruned":  # stopped by the study at this epoch: its last evaluation is its figure
            row.update(pruned_at_epoch=record.get("pruned_at_epoch"))
        row.update(epochs=epochs_trained(Path(t.folder) / "metrics.jsonl", final) if final else None,
                   epoch=final.get("epoch") if final else None,
                   val_images=final.get("val_images") if final else None,
                   step=final.get("step") if final else None,
                   wall_s=record.get("wall_s"), status=status,
                   overrides=" ".join(f"{k}={format_value(v)}" for k, v in t.swept.items()),
                   folder=t.folder)
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best val top-1 first; trials without a result last, in plan order. Each row with a result gets
    ``top1_2sigma`` (its sampling noise, NOISE_Z standard errors) and ``vs_best`` (its gap to the best,
    0 for the best) and ``within_noise`` (that gap is sampling noise)."""
    rows = sorted(rows, key=lambda r: (r["val_top1"] is None, -(r["val_top1"] or 0.0), r["val_loss"] or 0.0))
    best = rows[0] if rows and rows[0]["val_top1"] is not None else None
    for r in rows:
        measured = r["val_top1"] is not None and bool(r.get("val_images"))
        r["top1_2sigma"] = NOISE_Z * top1_sigma(r["val_top1"], r["val_images"]) if measured else None
        r["vs_best"] = r["val_top1"] - best["val_top1"] if measured and best else None
        r["within_noise"] = within_noise(r, best) if measured and best and r is not best else None
    return rows


def noise_note(rows: list[dict[str, Any]]) -> str:
    """How the table's noise marks are computed, with the figures of this sweep."""
    done = [r for r in rows if r["val_top1"] is not None and r.get("val_images")]
    if not done:
        return ""
    n = sorted({r["val_images"] for r in done})
    spread = sorted(r["top1_2sigma"] for r in done)
    alike = sum(bool(r["within_noise"]) for r in done)
    return (f"Sampling noise: val top-1 is measured on {', '.join(map(str, n))} val images, a binomial proportion "
            f"with standard error sigma = sqrt(p (1 - p) / n); \"± 2σ\" is {spread[0]:.1f} to {spread[-1]:.1f} points "
            f"here. \"~ best\" marks a trial whose gap to the best is within 2 sqrt(sigma_best² + sigma²) "
            f"({alike} of {len(done) - 1} trials): on this val set those cannot be told apart from the best.")


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
    columns = ["trial", *swept_keys, "seed", *METRICS, "top1_2sigma", "within_noise", "val_images", "epochs", "step",
               "wall_s", "status", "pruned_at_epoch", "overrides", "folder"]
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


def _epochs(value: float | None, r: dict[str, Any]) -> str:
    if value is None:  # cut by max_steps before any whole epoch told the steps per epoch
        return f"< {r['epoch'] + 1}" if r.get("epoch") is not None else "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _vs_best(r: dict[str, Any]) -> str:
    if r["vs_best"] is None:
        return "-"
    if r["within_noise"] is None:
        return "best"
    return ("~ best " if r["within_noise"] else "") + f"{r['vs_best']:+.2f}"


def markdown(rows: list[dict[str, Any]], swept_keys: list[str], title: str) -> str:
    rows = sort_rows(rows)
    lines = [f"# {title}", "", f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} trials done.", "",
             "## Trials, best val top-1 first", ""]
    note = noise_note(rows)
    lines += [note, ""] if note else []
    head = [*swept_keys, "seed", "val top-1", "± 2σ", "vs best", "val top-5", "val loss", "epochs", "step", "wall s",
            "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_value(r[k]) for k in swept_keys] + [str(r["seed"]), _cell(r["val_top1"]), _cell(r["top1_2sigma"], 1),
                                                     _vs_best(r), _cell(r["val_top5"]), _cell(r["val_loss"], 4),
                                                     _epochs(r["epochs"], r), _cell(r["step"]), _cell(r["wall_s"], 0),
                                                     r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    groups = group_seeds(rows, swept_keys)
    if all(g["trials"] <= 1 for g in groups):
        return "\n".join(lines + ["", "One seed per configuration: no seed repeats to summarise."]) + "\n"
    lines += ["", "## Seed repeats: val top-1 mean and std (n - 1) per configuration", ""]
    head = [*swept_keys, "n", "mean top-1", "std top-1", "mean top-5"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [_value(g[k]) for k in swept_keys] + [f"{g['n']}/{g['trials']}", _cell(g["mean_top1"]),
                                                     _cell(g["std_top1"]), _cell(g["mean_top5"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _value_ticks(fig, ax, values: list[Any]) -> None:
    """x ticks at the swept values, labelled as --set writes them (0.004, not 4x10^-3), no minor
    ticks; when labels would touch, every second (third, ...) value is labelled instead."""
    from matplotlib.ticker import NullLocator

    values = sorted(set(values))
    ax.xaxis.set_minor_locator(NullLocator())
    for every in range(1, len(values) + 1):
        shown = values[::every]
        ax.set_xticks(shown, [format_value(v) for v in shown])
        fig.canvas.draw()
        boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
        if all(a.x1 + 4 <= b.x0 for a, b in zip(boxes, boxes[1:])):  # 4 px apart at least
            return


def figure(rows: list[dict[str, Any]], swept_keys: list[str], title: str):
    """The sweep.png figure (see :func:`plot`), or None when no trial has a result yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in group_seeds(rows, swept_keys) if g["mean_top1"] is not None]
    if not groups:
        return None
    done = sort_rows([r for r in rows if r["val_top1"] is not None])
    noise = {tuple(format_value(r[k]) for k in swept_keys): r["top1_2sigma"] or 0.0 for r in done}
    seeds = any(g["n"] > 1 for g in groups)

    def err(g: dict[str, Any]) -> float:  # std over seeds, or one seed's sampling noise (± 2 sigma)
        return (g["std_top1"] or 0.0) if seeds else noise[tuple(format_value(g[k]) for k in swept_keys)]

    what = "mean ± std over seeds" if seeds else "val top-1 ± 2σ sampling noise (binomial)"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if len(swept_keys) == 1 and _numeric([g[swept_keys[0]] for g in groups]):
        key = swept_keys[0]
        groups.sort(key=lambda g: g[key])
        xs = [g[key] for g in groups]
        ax.errorbar(xs, [g["mean_top1"] for g in groups], yerr=[err(g) for g in groups],
                    marker="o", capsize=4, label=what)
        if seeds:
            ax.scatter([r[key] for r in done], [r["val_top1"] for r in done], s=14, color="0.5", zorder=3,
                       label="one seed")
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("val top-1 (%)")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        _value_ticks(fig, ax, xs)
    else:
        labels = [", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(g[k])}" for k in swept_keys) or "base"
                  for g in groups]
        ys = list(range(len(groups)))[::-1]
        ax.barh(ys, [g["mean_top1"] for g in groups], xerr=[err(g) for g in groups], capsize=4,
                color="tab:blue", alpha=0.7, label=what)
        position = {tuple(format_value(g[k]) for k in swept_keys): y for g, y in zip(groups, ys)}
        ax.scatter([r["val_top1"] for r in done], [position[tuple(format_value(r[k]) for k in swept_keys)]
                                                  for r in done], s=14, color="0.2", zorder=3)
        ax.set_yticks(ys, labels, fontsize=8)
        lo = min(r["val_top1"] for r in done)
        ax.set_xlim(max(0.0, math.floor(lo - 5)), None)
        ax.set_xlabel("val top-1 (%)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(rows: list[dict[str, Any]], swept_keys: list[str], path: Path, title: str) -> bool:
    """Val top-1 per configuration: with several seeds the mean with std error bars and every seed as a
    dot, with one seed each trial with its sampling noise (± 2 sigma, binomial on the val set size);
    against the swept value when exactly one numeric key is swept (log axis when it spans a factor 10
    or more, ticks at the swept values). Returns False (and writes nothing) when no trial has a
    result yet."""
    fig = figure(rows, swept_keys, title)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(trials: list[TrialSpec], swept_keys: list[str], out: Path, title: str,
                 adaptive: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """results.csv, results.md and sweep.png in ``out``; returns the rows, best first. ``adaptive``
    (an adaptive sweep, tools/sweep.py's ``_adaptive``): also every trial's state and curve
    (curves.png), the compute used and saved, and the best trial as a command."""
    rows = collect(trials)
    write_csv(rows, swept_keys, out / "results.csv")
    text = markdown(rows, swept_keys, title)
    if adaptive is not None:
        curves = {t.folder: eval_curve(Path(t.folder) / "metrics.jsonl") for t in trials}
        text += adaptive_section(rows, curves, adaptive)
        plot_curves(rows, curves, swept_keys, out / "curves.png", title)
    (out / "results.md").write_text(text)
    plot(rows, swept_keys, out / "sweep.png", title)
    return sort_rows(rows)


def eval_curve(metrics_path: Path) -> list[tuple[int, float]]:
    """(epoch, val top-1) of every evaluation a run logged, the newest record per epoch."""
    try:
        lines = metrics_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    by_epoch: dict[int, float] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_top1" in rec:
            by_epoch[int(rec["epoch"])] = float(rec["val_top1"])
    return sorted(by_epoch.items())


def _state(row: dict[str, Any], curve: list[tuple[int, float]]) -> str:
    if row["status"] == "pruned":
        return f"pruned after epoch {row.get('pruned_at_epoch')}"
    if row["status"] == "done":
        return "complete"
    if row["status"] in ("running", "interrupted", "queued"):
        return f"{row['status']} ({len(curve)} epoch(s) evaluated)"
    return row["status"]


def adaptive_section(rows: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
                     info: dict[str, Any]) -> str:
    """Every trial's state, the compute used and saved, and the best trial's command (markdown)."""
    budget = info["epochs"]
    used = 0.0
    lines = ["", f"## Trials in the study ({info['sampler']} sampler, {info['pruner']} pruning)", "",
             "| trial | state | epochs trained | last val top-1 | why |", "|---|---|---|---|---|"]
    for r in rows:
        curve = curves.get(r["folder"], [])
        trained = r["epochs"] if r["status"] == "done" and r["epochs"] else len(curve)
        used += trained or 0
        last = f"{curve[-1][1]:.2f}" if curve else "-"
        why = ""
        if r["status"] == "failed":
            why = str((read_trial(r["folder"]) or {}).get("error") or "").replace("|", "\\|")[:160]
        lines.append(f"| {r['trial']} | {_state(r, curve)} | {trained or 0:g} | {last} | {why} |")
    full = info["full_trials"] * budget
    lines += ["", f"Compute: {used:g} trial-epochs of the {full:g} that {info['full_trials']} trials of {budget} "
                  f"epochs would take ({used / full:.0%}; {full - used:g} saved)." if full else ""]
    done = [r for r in sort_rows(rows) if r["val_top1"] is not None]
    if done:
        from workflows.sweep.study import best_command

        best = done[0]
        record = read_trial(best["folder"]) or {}
        lines += ["", f"Best complete trial: {best['trial']} (val top-1 {best['val_top1']:.2f}); to train it:", "",
                  "```bash", best_command({"swept": record.get("swept", {}), "seed": best["seed"]}, info["base"],
                                          info["fixed"]), "```"]
    lines += ["", "Curves of every trial (val top-1 after each epoch; pruned trials end in a cross): curves.png.", ""]
    return "\n".join(lines)


def plot_curves(rows: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]], swept_keys: list[str],
                path: Path, title: str) -> bool:
    """val top-1 against the epochs trained (the engine's 0-based epoch + 1), one line per trial; a pruned
    trial's line is dashed and ends in a cross at the epochs it trained."""
    drawn = [(r, curves.get(r["folder"], [])) for r in rows if curves.get(r["folder"])]
    if not drawn:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r, curve in drawn:
        xs, ys = [e + 1 for e, _ in curve], [v for _, v in curve]
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={format_value(r[k])}" for k in swept_keys) + f" s{r['seed']}"
        pruned = r["status"] == "pruned"
        line, = ax.plot(xs, ys, linestyle="--" if pruned else "-", marker="o", markersize=3, alpha=0.8,
                        label=label + (" (pruned)" if pruned else ""))
        if pruned:
            ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
    ax.set_xlabel("epochs trained")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
