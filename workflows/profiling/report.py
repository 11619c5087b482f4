"""A profile shown: the table the tool prints, profile.png (images/s against batch size, the
bottleneck ringed) and profile.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .measure import MODES
from .verdict import bottleneck_row

# --------------------------------------------------------------------------- table
COLUMNS = (("mode", 6), ("what", 17), ("pipeline", 10), ("batch", 6), ("res", 5), ("img/s", 10),
           ("img/s/wkr", 10), ("of step", 8), ("of stage2", 10), ("wait", 6), ("prec", 5), ("ch_last", 8),
           ("compile", 8))
# the two ratios to a ceiling are different quantities, so each has its own column and this legend
LEGEND = ("of step: e2e images/s / the bare step's at the same batch and resolution (1.00: data is free); "
          "of stage2: stage 1 + stage 2 images/s / stage 2's alone (1.00: stage 1 is free)")


def _ratio(r: dict[str, Any], kind: str) -> str | None:
    wanted = r["mode"] == "e2e" if kind == "step" else r["what"] == "stage1+stage2"
    return f"{r['vs_ceiling']:.2f}" if wanted and r.get("vs_ceiling") is not None else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table, one line per measurement, and the legend of its two ratio columns."""
    def cell(r: dict[str, Any], name: str) -> str:
        v = {"mode": r["mode"], "what": r["what"], "pipeline": r["pipeline"], "batch": r["batch"], "res": r["res"],
             "img/s": r["images_per_s"], "img/s/wkr": r["images_per_s_per_worker"],
             "of step": _ratio(r, "step"), "of stage2": _ratio(r, "stage2"),
             "wait": None if r["data_wait_frac"] is None else f"{100 * r['data_wait_frac']:.0f}%",
             "prec": r["precision"] if r["mode"] != "data" else None,
             "ch_last": ("on" if r["channels_last"] else "off") if r["mode"] != "data" else None,
             "compile": ("on" if r["compile"] else "off") if r["mode"] != "data" else None}[name]
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
        return str(v)

    head = " ".join(name.ljust(w) if i < 3 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(cell(r, name).ljust(w) if i < 3 else cell(r, name).rjust(w)
                              for i, (name, w) in enumerate(COLUMNS)))
    if any(r.get("vs_ceiling") is not None for r in rows):
        lines.append(LEGEND)
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot
def figure(rows: list[dict[str, Any]], title: str = "", verdict: str = ""):
    """images/s vs per-device batch size: one panel per mode, one line per (what, resolution); the
    bottleneck (:func:`bottleneck_row`) ringed in red on its panel, whose title says so; legends under
    the panels, clear of the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    limit = bottleneck_row(rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["mode"] == mode:
                series.setdefault((r["what"], r["res"]), []).append((r["batch"], r["images_per_s"]))
        for (what, res), pts in sorted(series.items()):
            pts.sort()
            style = "--" if what == "stage2" else "-"
            ax.plot([b for b, _ in pts], [v for _, v in pts], style, marker="o", label=f"{what} @{res}px")
        batches = sorted({r["batch"] for r in rows if r["mode"] == mode})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("per-device batch size")
        ax.set_ylabel("images/s")
        ax.set_title(mode)
        values = [r["images_per_s"] for r in rows if r["mode"] == mode]
        if max(values) > 20 * min(values):  # e.g. stage 2 on a GPU far above real decoding
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=1.12 * max(values))  # room above the highest point for the ring
        if limit is not None and limit["mode"] == mode:
            ax.plot([limit["batch"]], [limit["images_per_s"]], "o", ms=16, mfc="none", mec="tab:red", mew=2.2,
                    gid="bottleneck", label=f"bottleneck: {limit['what']} @{limit['res']}px", zorder=5, clip_on=False)
            ax.set_title(f"{mode}: the bottleneck", color="tab:red")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    heading = "\n".join(t for t in (title, verdict) if t)
    if heading:
        fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    return fig


def plot(rows: list[dict[str, Any]], path, title: str = "", verdict: str = "") -> None:
    """:func:`figure` written to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(rows, title, verdict)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile(report: dict[str, Any]) -> tuple[Path, Path]:
    """OUT/profile.json (the report: every figure, the findings and the environment) and OUT/profile.png
    (images/s vs batch size, the bottleneck marked); returns their paths."""
    out = Path(report["out"])
    saved = {k: v for k, v in report.items() if k not in ("out", "title")}
    (out / "profile.json").write_text(json.dumps(saved, indent=1) + "\n")
    plot(report["measurements"], out / "profile.png", report["title"], f"bottleneck: {report['bottleneck']}")
    return out / "profile.json", out / "profile.png"
