"""The verdict on a profile's figures: which of stage 1, stage 2 and the step limits the run, with
their figures, one short line per finding, and advice held back where the repeats it rests on disagree
(a shared or throttled machine). Pure functions of the measurement rows (``workflows.profiling.measure``).
"""
from __future__ import annotations

import statistics
from typing import Any

# Rule thresholds (see diagnose): named so the table's reader and the tests see the same numbers.
DATA_WAIT_LIMIT = 0.20  # e2e blocked on next(batch) more than this: data-bound
BATCH_GAIN = 1.10  # images/s still rising >10% from one batch size to the next: the batch is too small
FAR_BELOW_CEILING = 0.80  # e2e below 80% of stage 2 + the bare step at the same point (stage 1 free)
SPREAD_LIMIT = 1.5  # repeats of one point differing more than this (fastest / slowest window): not a figure to act on


# --------------------------------------------------------------------------- the verdict
def _by_point(rows: list[dict[str, Any]], mode: str, what: str | None = None) -> dict[tuple[int, int], dict]:
    return {(r["batch"], r["res"]): r for r in rows if r["mode"] == mode and (what is None or r["what"] == what)}


def _still_rising(points: dict[tuple[int, int], dict]) -> list[tuple[int, int, int, float]]:
    """(best smaller batch, largest batch, resolution, gain between them) for each resolution where
    images/s still grows more than BATCH_GAIN with batch size; largest gain first."""
    found = []
    for res in sorted({r for _, r in points}):
        curve = sorted((b, points[(b, r)]["images_per_s"]) for b, r in points if r == res)
        if len(curve) < 2:
            continue
        b1, v1 = curve[-1]
        b0, v0 = max(curve[:-1], key=lambda bv: bv[1])  # the best smaller batch, so one slow point is not a trend
        gain = v1 / max(v0, 1e-9)
        if gain > BATCH_GAIN:
            found.append((b0, b1, res, gain))
    return sorted(found, key=lambda f: -f[3])


STAGES = (("stage 1", "data", "stage1"), ("stage 2", "data", "stage2"), ("the step", "model", "bare step"))


def _stage_rows(rows: list[dict[str, Any]]) -> tuple[tuple[int, int], dict[str, dict]] | None:
    """The point the verdict reads and each measured stage's row there: the point where the slowest
    stage is fastest (the best setting measured), among points with the most stages."""
    by_point: dict[tuple[int, int], dict[str, dict]] = {}
    for name, mode, what in STAGES:
        for p, r in _by_point(rows, mode, what).items():
            by_point.setdefault(p, {})[name] = r
    if not by_point:
        return None
    most = max(len(v) for v in by_point.values())
    p = max((p for p, v in by_point.items() if len(v) == most),
            key=lambda p: min(r["images_per_s"] for r in by_point[p].values()))
    return p, by_point[p]


def _in_series(stage2_ips: float, step_ips: float) -> float:
    """images/s of stage 2 and the step one after the other in the training thread."""
    return 1.0 / (1.0 / stage2_ips + 1.0 / step_ips)


def spread(row: dict[str, Any]) -> float:
    """Fastest over slowest window of a point's repeats (1.0 for a single window)."""
    repeats = row.get("images_per_s_repeats") or [row["images_per_s"]]
    return max(repeats) / max(min(repeats), 1e-9)


def _at(p: tuple[int, int]) -> str:
    return f"batch {p[0]}, res {p[1]}"


def _shaky(used: list[dict[str, Any]], effect: float | None = None) -> str | None:
    """Why a finding that rests on the rows ``used`` cannot be trusted, or None: their repeats differ
    more than SPREAD_LIMIT, or the effect it claims (a ratio > 1) is no larger than that disagreement."""
    worst = max(used, key=spread)
    s = spread(worst)
    where = f"{worst['what']} at {_at((worst['batch'], worst['res']))}"
    if s > SPREAD_LIMIT:
        return f"its repeats differ {s:.1f}x ({where})"
    if effect is not None and s > 1.0 and effect <= s:
        return f"the {100 * (effect - 1):.0f}% is within its repeats' {s:.2f}x spread ({where})"
    return None


Finding = tuple[str, str]  # (kind, one short line): bottleneck | figures | advice | held back | note


def diagnose(rows: list[dict[str, Any]], env: dict[str, Any]) -> list[Finding]:
    """Which stage limits training and what to change, derived only from ``rows``: one short line per
    finding, each naming its batch size and resolution. The first is the ``bottleneck``, then the
    ``figures`` it rests on, then ``advice``; advice whose figures are noise is ``held back``.

    The slowest of stage 1 (decoding), stage 2 (batched augmentation) and the bare step is named at
    the point where the slowest stage is fastest. Stage 2 and the step run one after the other in
    the training thread, so together they deliver at most 1 / (1/stage2 + 1/step) images/s; stage 1
    overlaps them (its workers run ahead). An e2e run that waits for data more than
    ``DATA_WAIT_LIMIT`` of its time is data-bound whatever stage 1 alone measured. The advice
    follows the named stage: workers and backend for stage 1, RandAugment and the device for stage
    2, AMP, channels-last, batch size and resolution for the step.

    Noise: each point's figure is the median of its repeats. A finding is held back, with the
    reason, when the repeats of a figure it rests on differ more than ``SPREAD_LIMIT`` (a neighbour's
    job slowed some windows), or when the effect it claims (e.g. +14% images/s from a larger batch) is
    no larger than its repeats' own disagreement; AMP and channels-last advice rests on settings, not
    figures.
    """
    workers = env.get("workers")
    pipeline = env.get("pipeline")
    cuda = env.get("device", "").startswith("cuda")
    model = _by_point(rows, "model")
    e2e = _by_point(rows, "e2e")
    stage2 = _by_point(rows, "data", "stage2")
    out: list[Finding] = []

    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"

    def advise(where: str, claim: str, action: str, used: list[dict[str, Any]], effect: float | None = None) -> None:
        """``where: claim: action``, or held back as ``where: claim; not acted on: why``."""
        why = _shaky(used, effect)
        if why:
            out.append(("held back", f"{where}: {claim}; not acted on: {why}"))
        else:
            out.append(("advice", f"{where}: {claim}: {action}" if claim else f"{where}: {action}"))

    found = _stage_rows(rows)
    point, stages = found if found else (None, {})
    rates = {name: r["images_per_s"] for name, r in stages.items()}
    e2e_row = e2e.get(point) if point else None
    if e2e_row is None and e2e:
        e2e_row = max(e2e.values(), key=lambda r: r["images_per_s"])
        point = point or (e2e_row["batch"], e2e_row["res"])
    if not rates and e2e_row is None:
        return [("bottleneck", "nothing measured")]
    at = _at(point)
    slowest = min(rates, key=rates.get) if rates else None
    if rates:
        figures = ", ".join(f"{name} {fmt(v)} img/s" for name, v in sorted(rates.items(), key=lambda kv: kv[1]))
        if "stage 2" in rates and "the step" in rates:
            figures += f"; stage 2 + step {fmt(_in_series(rates['stage 2'], rates['the step']))}"
        out.append(("figures", f"{at}: {figures}"))
    if e2e_row is not None:
        wait = e2e_row["data_wait_frac"]
        out.append(("figures", f"{_at((e2e_row['batch'], e2e_row['res']))}: e2e {fmt(e2e_row['images_per_s'])} img/s"
                    + (f", waiting for data {100 * wait:.0f}%" if wait is not None else "")))
    waiting = e2e_row is not None and (e2e_row["data_wait_frac"] or 0) > DATA_WAIT_LIMIT
    # the verdict's own evidence: the slowest stage against the next one (or e2e's wait)
    ranked = sorted(stages.values(), key=lambda r: r["images_per_s"])
    order_rows = ranked[:2]
    order_effect = ranked[1]["images_per_s"] / ranked[0]["images_per_s"] if len(ranked) > 1 else None

    if (slowest == "stage 1" and len(rates) > 1) or waiting:
        cpus = env.get("cpus_usable") or env.get("cpu_count") or 0
        if workers is not None and cpus and workers >= cpus:
            more = f"data.workers is already {workers} on {cpus} usable CPUs: more CPUs per GPU"
        else:
            more = f"raise data.workers (now {workers})"
        switch = " or switch data.pipeline to ffcv/dali" if pipeline not in ("ffcv", "dali") else ""
        if pipeline == "dali" and cuda:
            switch = " (DALI decodes on the GPU already: lower train_res or fewer CPU-side transforms)"
        if slowest == "stage 1" and not waiting:
            head = f"data-bound: stage 1 is the slowest at {at}"
        else:
            head = f"data-bound: e2e waits for data more than {100 * DATA_WAIT_LIMIT:.0f}% of the time at " \
                   f"{_at((e2e_row['batch'], e2e_row['res']))}"
        used = [e2e_row] if waiting else order_rows
        advise(at, "", f"{more}{switch}", used, None if waiting else order_effect)
        return [("bottleneck", head), *out]

    if len(rates) == 1 and slowest != "the step" and e2e_row is None:
        r = next(iter(stages.values()))
        per = r["images_per_s_per_worker"]
        return [("bottleneck", f"{slowest} only: {fmt(r['images_per_s'])} img/s at {at}"
                 + (f" ({fmt(per)} per worker, {workers} workers)" if per is not None else "")
                 + "; run mode all to compare the stages")]
    if slowest is None:  # e2e alone, not waiting
        return [("bottleneck", f"e2e {fmt(e2e_row['images_per_s'])} img/s at {at}, waiting for data "
                 f"{100 * (e2e_row['data_wait_frac'] or 0):.0f}%; run mode all to see which stage limits it"), *out]
    if slowest == "stage 2":
        where_s2 = "on the GPU" if cuda else "on the CPU, in the training thread"
        advise(at, f"stage 2 runs {where_s2}", "fewer RandAugment ops (augment.rand_augment n) or a larger "
               "per-device batch" + ("" if cuda else "; a GPU runs it as batched kernels"), order_rows, order_effect)
        return [("bottleneck", f"stage2-bound: stage 2 is the slowest at {at}"), *out]

    out.insert(0, ("bottleneck", f"compute-bound: the step is the slowest at {at}"))
    step_rows = list(model.values())
    if cuda and any(r["precision"] == "fp32" for r in step_rows):
        out.append(("advice", f"{at}: AMP is off: set train.precision=bf16"))
    if cuda and any(not r["channels_last"] for r in step_rows):
        out.append(("advice", f"{at}: channels_last is off: set train.channels_last=true"))
    tips = len(out)
    for b0, b1, res, gain in _still_rising(model):
        advise(f"batch {b0} -> {b1}, res {res}", f"the step's images/s rises {100 * (gain - 1):.0f}%",
               "raise train.per_device_batch_size", [model[(b0, res)], model[(b1, res)]], gain)

    def bound(p: tuple[int, int]) -> tuple[float, str, list[dict]]:
        """What e2e could reach at ``p`` if stage 1 were free: the step, after stage 2 when measured."""
        step = model[p]["images_per_s"]
        if p in stage2:
            return _in_series(stage2[p]["images_per_s"], step), "stage 2 + step", [model[p], stage2[p]]
        return step, "the bare step", [model[p]]

    why = "CPU-side work (decode, copies) delays the GPU" if cuda else "decode workers share the CPU cores with the step"
    for p in sorted(e2e):
        if p not in model:
            continue
        ref, name, used = bound(p)
        e = e2e[p]
        if e["images_per_s"] < FAR_BELOW_CEILING * ref and (e["data_wait_frac"] or 0) <= DATA_WAIT_LIMIT:
            advise(_at(p), f"e2e reaches {100 * e['images_per_s'] / ref:.0f}% of {name}, waiting "
                   f"{100 * (e['data_wait_frac'] or 0):.0f}%", why, [e, *used], ref / e["images_per_s"])
    resolutions = sorted({r for _, r in model})
    if len(resolutions) >= 2 and len(out) == tips:
        b = max(b for b, _ in model)
        lo, hi = model.get((b, resolutions[0])), model.get((b, resolutions[-1]))
        if lo and hi:
            cost = lo["images_per_s"] / hi["images_per_s"]
            advise(f"batch {b}, res {resolutions[0]} -> {resolutions[-1]}", f"{cost:.1f}x the step's time per image",
                   "low-res early epochs (train.progressive) save that", [lo, hi], cost)
    if not any(kind in ("advice", "held back") for kind, _ in out):
        out.append(("advice", f"{at}: nothing cheap to change at these settings"))
    return out


def verdict_lines(findings: list[Finding]) -> list[str]:
    """The findings as the tool prints them: ``kind: text``, one line each."""
    return [f"{kind}: {text}" for kind, text in findings]


def merge_repeats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, what, batch, res): the median images/s (and data wait) of its repeats, in
    first-seen order; ``images_per_s_repeats`` keeps every window. On a shared machine a neighbour's
    job can slow one window many times over; interleaved repeats and the median absorb that."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["what"], r["batch"], r["res"]), []).append(r)
    merged = []
    for group in groups.values():
        ips = sorted(r["images_per_s"] for r in group)
        mid = statistics.median(ips)
        row = dict(min(group, key=lambda r: abs(r["images_per_s"] - mid)))
        row["images_per_s"] = mid
        if row["images_per_s_per_worker"] is not None:
            row["images_per_s_per_worker"] = mid / max(row["workers"], 1)
        waits = [r["data_wait_frac"] for r in group if r["data_wait_frac"] is not None]
        row["data_wait_frac"] = statistics.median(waits) if waits else None
        row["images"] = sum(r["images"] for r in group)
        row["seconds"] = sum(r["seconds"] for r in group)
        row["images_per_s_repeats"] = [r["images_per_s"] for r in group]
        merged.append(row)
    return merged


def add_ceiling_ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_ceiling``: e2e images/s over the bare step at the same point, and stage 1 + stage 2 over
    stage 2 alone (data mode); None where the ceiling was not measured."""
    model = _by_point(rows, "model")
    ceiling = _by_point(rows, "data", "stage2")
    for r in rows:
        ref = {"e2e": model}.get(r["mode"]) or (ceiling if r["what"] == "stage1+stage2" else {})
        c = ref.get((r["batch"], r["res"]))
        r["vs_ceiling"] = r["images_per_s"] / c["images_per_s"] if c else None


def spread_note(rows: list[dict[str, Any]], limit: float | None = None) -> str | None:
    """A note when repeats of a point differ more than ``limit`` (SPREAD_LIMIT) times: the machine is
    shared or throttled; the findings resting on those points are held back."""
    limit = SPREAD_LIMIT if limit is None else limit
    repeated = [r for r in rows if len(r.get("images_per_s_repeats", [])) > 1]
    wide = [r for r in repeated if spread(r) > limit]
    if not wide:
        return None
    worst = max(wide, key=spread)
    return (f"repeats of {len(wide)} of {len(repeated)} points differ more than {limit:g}x (up to "
            f"{spread(worst):.1f}x, {worst['what']} at {_at((worst['batch'], worst['res']))}): other jobs share "
            f"this machine; advice resting on them is held back; rerun with more --repeats, --threads 1 or on "
            f"a quiet machine")


def bottleneck_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measurement the verdict names as the limit: the slowest stage at the verdict's point (see
    :func:`diagnose`), or the e2e row there when e2e waits for data more than DATA_WAIT_LIMIT."""
    e2e = _by_point(rows, "e2e")
    found = _stage_rows(rows)
    if found is None:
        return max(e2e.values(), key=lambda r: r["images_per_s"]) if e2e else None
    point, stages = found
    waiting = e2e.get(point)
    if waiting is not None and (waiting["data_wait_frac"] or 0) > DATA_WAIT_LIMIT:
        return waiting
    return min(stages.values(), key=lambda r: r["images_per_s"])


