"""The console: a tqdm bar per epoch on a terminal, one plain line per log point otherwise (CI, files),
numbered by the step within the epoch; the epoch's totals line either way."""
from __future__ import annotations

import pytest

from common.config import LogConfig
from engine.logging import RunLogger


def _records(epoch: int, steps: int, every: int) -> list[dict]:
    recs = []
    for batch in [*range(every, steps + 1, every)] + ([steps] if steps % every else []):
        rec = {"epoch": epoch, "step": epoch * steps + batch, "batch": batch, "lr": 1e-3, "train_loss": 2.0,
               "images_per_s": 1000.0, "data_wait_frac": 0.05}
        if batch == steps:
            rec.update(epoch_time_s=12.5, epoch_images_per_s=980.0, epoch_data_wait_frac=0.04)
        recs.append(rec)
    return recs


@pytest.mark.parametrize("tty", [False, True])
def test_bar_on_a_terminal_plain_lines_otherwise(tmp_path, capsys, tty):
    log = RunLogger(LogConfig(wandb="off", progress=True), tmp_path, {}, enabled=True, run_id="x")
    log._tty = tty  # what sys.stderr.isatty() said at start-up
    log.epoch_start(1, 10, 0, 32)
    for rec in _records(1, 10, 4):
        log.progress(rec, 10)
    log.info("epoch 1: val top-1 50.00")
    log.close()
    err = capsys.readouterr().err
    assert "epoch 1: train res 32, 10 steps" in err
    assert "epoch 1: trained in 12.5 s, 980 img/s, data-wait 4%" in err
    assert "epoch 1: val top-1 50.00" in err.splitlines()[-1]  # after the bar, on its own line
    plain = [ln for ln in err.splitlines() if ln.startswith("epoch 1 [")]
    if tty:
        assert not plain and "10/10" in err and "loss 2.0000" in err  # tqdm's "n/total" and the figures
    else:
        assert plain == [f"epoch 1 [{b}/10] loss 2.0000 lr 0.001 1000 img/s data-wait 5%" for b in (4, 8, 10)]
        assert "\r" not in err  # no bar redraws in a file


def test_progress_off_keeps_the_epoch_totals(tmp_path, capsys):
    log = RunLogger(LogConfig(wandb="off", progress=False), tmp_path, {}, enabled=True, run_id="x")
    log._tty = True
    log.epoch_start(0, 10, 0, 32)
    for rec in _records(0, 10, 5):
        log.progress(rec, 10)
    log.close()
    err = capsys.readouterr().err
    assert "epoch 0 [" not in err and "\r" not in err and "epoch 0: trained in 12.5 s" in err


def test_resumed_epoch_bar_starts_where_the_checkpoint_was(tmp_path, capsys):
    log = RunLogger(LogConfig(wandb="off"), tmp_path, {}, enabled=True, run_id="x")
    log._tty = True
    log.epoch_start(2, 10, 6, 32)
    log.close()
    err = capsys.readouterr().err
    assert "train res" not in err  # the epoch had begun before the resume
    assert "6/10" in err
