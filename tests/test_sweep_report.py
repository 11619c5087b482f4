"""The sweep report read as a newcomer reads it: differences within the val set's sampling noise are
marked (binomial standard error, checked against a seeded simulation), the epochs each trial trained
are shown (1 for a one-epoch run, whose last record says epoch 0), no seed table for one seed, x tick
labels that do not overlap; and the shipped demo sweep on a fresh clone says to run `make demo`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from workflows.sweep.plan import TrialSpec
from workflows.sweep.report import figure, markdown, sort_rows, top1_sigma, write_report

ROOT = Path(__file__).resolve().parents[1]


def fake_trial(out: Path, lr: float, seed: int, top1: float, *, n: int = 600, steps: int = 20,
               cut: tuple[int, int] | None = None, legacy: bool = False) -> TrialSpec:
    """A finished trial as the engine and tools/sweep.py leave it: metrics.jsonl (train records every 5
    steps with the steps per epoch, each whole epoch's total record, the final eval) and trial.json.
    One whole epoch of ``steps`` steps, or with ``cut = (epoch, batch)`` whole epochs up to ``epoch``
    and then ``batch`` steps of it (max_steps ended it; no total record for that epoch). ``legacy``: an
    older engine's records, without ``steps_per_epoch``."""
    name = f"lr={lr}_seed={seed}"
    folder = out / "trials" / name
    folder.mkdir(parents=True)
    last_epoch, last_batch = cut or (0, steps)
    records = []
    for epoch in range(last_epoch + 1):
        end = last_batch if epoch == last_epoch else steps
        records += [{"epoch": epoch, "step": epoch * steps + b, "batch": b, "train_loss": 1.0,
                     **({} if legacy else {"steps_per_epoch": steps})} for b in range(min(5, end), end + 1, 5)]
        if end == steps:
            records[-1].update(epoch_time_s=10.0, epoch_images_per_s=100.0, epoch_data_wait_frac=0.0)
    final = {"epoch": last_epoch, "step": last_epoch * steps + last_batch, "val_top1": top1, "val_top5": 50.0,
             "val_loss": 2.0, "val_images": n}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*records, final]))
    (folder / "trial.json").write_text(json.dumps({"status": "done", "metrics": final, "wall_s": 30.0}))
    return TrialSpec(name=name, folder=str(folder), base="recipes/a3.toml", cwd=str(ROOT), swept={"optim.lr": lr},
                     seed=seed, overrides=(f"optim.lr={lr}",), max_steps=None)


def table(md: str) -> list[list[str]]:
    lines = md.split("## Trials")[1].splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| optim.lr"))
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[head:] if ln.startswith("| ")]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def test_binomial_sigma_matches_a_simulation():
    rng = np.random.default_rng(0)
    for p, n in ((0.1, 600), (0.5, 5000), (0.86, 10000)):
        simulated = (rng.binomial(n, p, size=200_000) / n * 100).std()
        assert top1_sigma(100 * p, n) == pytest.approx(simulated, rel=0.01)
    assert 2 * top1_sigma(10.0, 600) == pytest.approx(2.45, abs=0.01)  # the "±2.5 points"


def test_noise_marks_epochs_and_no_seed_table_for_one_seed(tmp_path):
    # the case: 8-11% on 600 val images (2 sigma of a difference there is ~3.3 points), and one
    # trial far above; plus two cut by max_steps: after 1 epoch and 8 of 20 steps, and within the first epoch
    tops = {0.001: 8.0, 0.002: 11.0, 0.004: 9.5, 0.008: 30.0, 0.016: 27.0}
    trials = [fake_trial(tmp_path, lr, 0, top1) for lr, top1 in tops.items()]
    trials += [fake_trial(tmp_path, 0.032, 0, 5.0, cut=(1, 8)), fake_trial(tmp_path, 0.064, 0, 4.0, cut=(0, 8)),
               fake_trial(tmp_path, 0.128, 0, 3.0, cut=(0, 8), legacy=True)]
    rows = write_report(trials, ["optim.lr"], tmp_path, "lr sweep")
    md = (tmp_path / "results.md").read_text()
    got = {float(r["optim.lr"]): r for r in table(md)}
    for lr, r in got.items():
        top1 = float(r["val top-1"])
        sigma = top1_sigma(top1, 600)
        assert float(r["± 2σ"]) == pytest.approx(2 * sigma, abs=0.051)
        gap = top1 - 30.0
        if lr == 0.008:
            assert r["vs best"] == "best"
        else:
            alike = abs(gap) <= 2 * np.hypot(sigma, top1_sigma(30.0, 600))
            assert r["vs best"] == ("~ best " if alike else "") + f"{gap:+.2f}", (lr, r)
    assert got[0.016]["vs best"].startswith("~ best")  # 27 vs 30 on 600 images: not told apart
    assert not got[0.002]["vs best"].startswith("~")  # 11 vs 30: a real difference
    # among the low ones the ranking is noise: each is within noise of the others
    low = [r for r in rows if r["val_top1"] is not None and 6 < r["val_top1"] < 12]
    assert len(low) == 3 and all(np.hypot(top1_sigma(a["val_top1"], 600), top1_sigma(b["val_top1"], 600)) * 2
                                 >= abs(a["val_top1"] - b["val_top1"]) for a in low for b in low)
    assert "sigma = sqrt(p (1 - p) / n)" in md and "600 val images" in md  # says how it is computed
    # epochs trained: the one-epoch runs (final record epoch 0) trained 1 epoch; the cut ones 1 + 8/20 and
    # 8/20 (the records say the steps per epoch); an older run cut within its first epoch: less than one
    assert {lr: r["epochs"] for lr, r in got.items()} == {**{lr: "1" for lr in tops}, 0.032: "1.40", 0.064: "0.40",
                                                          0.128: "< 1"}
    csv = {line.split(",")[1]: line for line in (tmp_path / "results.csv").read_text().splitlines()[1:]}
    assert ",0.4," in csv["0.064"]  # the CSV has the fraction too
    assert "## Seed repeats" not in md and "One seed per configuration" in md


def test_seed_table_stays_for_several_seeds(tmp_path):
    trials = [fake_trial(tmp_path, lr, seed, 20.0 + seed + 10 * i) for i, lr in enumerate((0.01, 0.02))
              for seed in (0, 1)]
    md = markdown(sort_rows(write_report(trials, ["optim.lr"], tmp_path, "t")), ["optim.lr"], "t")
    assert "## Seed repeats" in md and "| 0.02 | 2/2 | 30.50 |" in md


@pytest.mark.parametrize("values", [
    [0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128],  # sweeps/a3_lr_demo.toml
    [0.004, 0.008, 0.016, 0.032, 0.064],  # little over one decade: matplotlib labels minor ticks
    [0.003, 0.0036, 0.0042, 0.005, 0.0061, 0.0075, 0.0093, 0.011, 0.013, 0.016, 0.019, 0.023, 0.027, 0.033, 0.041],
])
@pytest.mark.parametrize("seeds", [1, 2])
def test_x_tick_labels_do_not_overlap(tmp_path, values, seeds):
    import matplotlib.pyplot as plt

    trials = [fake_trial(tmp_path, lr, s, 20.0 + i + s) for i, lr in enumerate(values) for s in range(seeds)]
    rows = [r for r in write_report(trials, ["optim.lr"], tmp_path, "t")]
    fig = figure(rows, ["optim.lr"], "t")
    ax = fig.axes[0]
    fig.canvas.draw()
    labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
              if t.get_visible() and t.get_text()]
    assert len(labels) >= 3
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    assert {t.get_text() for t in labels} <= {repr(v) for v in values}  # as --set writes them
    plt.close(fig)


def test_demo_sweep_on_a_fresh_clone_says_to_run_make_demo(tmp_path, monkeypatch, capsys):
    from tools.sweep import main

    for folder in ("sweeps", "recipes"):  # a clone: the sweep and its recipes, no data/ (make demo writes it)
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--dry-run"], ["--report-only"]):
        assert main(["sweeps/a3_lr_demo.toml", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "data/demo/src is not a folder" in err[0] and "run `make demo` first" in err[0], err
    assert not (tmp_path / "runs").exists()
