"""workflows/run_report.py (the end of `make demo`): the summary of a real run folder agrees with its
metrics.jsonl read here by hand, and metrics.png is a three-panel picture."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from workflows.run_report import format_summary, plot_metrics, read_metrics, summarize


def test_summary_and_png_of_a_real_run(tiny_runs, tmp_path):
    out = tiny_runs["plain"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "epoch_time_s" in r]
    assert len(epoch) == 1  # a 1-epoch run: its last train record carries the epoch's totals
    s = summarize(out)
    assert s["val_top1"] == [r for r in records if "val_top1" in r][-1]["val_top1"]
    assert s["images_per_s"] == pytest.approx(640 / epoch[0]["epoch_time_s"], rel=1e-6)  # 640 train images
    assert s["data_wait_frac"] == pytest.approx(epoch[0]["epoch_data_wait_frac"])
    assert s["wall_s"] == records[-1]["elapsed_s"] and s["epochs"] == 1

    png = plot_metrics(read_metrics(out), tmp_path / "metrics.png", "tiny")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 3 * 300 and img.height >= 250

    text = format_summary(s, pipeline="reference", device="CPU", png=png)
    lines = text.splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"="}
    assert f"val top-1      {s['val_top1']:.2f}%" in text and f"{s['images_per_s']:,.0f} img/s" in text
    assert str(out) in text and str(png) in text and "for 1 epoch (" in text


def test_summary_skips_a_line_cut_by_kill9(tmp_path):
    rec = {"epoch": 0, "step": 5, "batch": 5, "train_loss": 1.0, "lr": 0.1, "epoch_time_s": 10.0,
           "epoch_images_per_s": 50.0, "epoch_data_wait_frac": 0.2, "elapsed_s": 11.0}
    ev = {"epoch": 0, "step": 5, "val_top1": 40.0, "val_top5": 90.0, "elapsed_s": 12.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(ev) + "\n" + '{"epoch": 1, "st')
    s = summarize(tmp_path)
    assert (s["val_top1"], s["images_per_s"], s["data_wait_frac"], s["wall_s"]) == (40.0, 50.0, 0.2, 12.0)
