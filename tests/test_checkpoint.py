"""Checkpoint files: atomic replace, weights_only loading, damaged-file skipping, pruning, RNG round trip."""
import random
from dataclasses import fields

import numpy as np
import pytest
import torch

from common.config import CheckpointConfig
from engine import checkpoint as ckpt


def test_atomic_save_leaves_no_temp_and_loads_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "progress": {"epoch": 1, "step": 7}, "rng": ckpt.rng_state()}
    path = tmp_path / ckpt.checkpoint_name(1, 7)
    record = ckpt.atomic_save(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]
    assert record["sha256"] == ckpt.sha256_file(path) and record["bytes"] == path.stat().st_size
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["progress"]["step"] == 7


def test_newest_good_skips_a_damaged_newest_file(tmp_path):
    for step in (10, 20, 30):
        ckpt.atomic_save({"step": step}, tmp_path / ckpt.checkpoint_name(0, step))
    newest = tmp_path / ckpt.checkpoint_name(0, 30)
    newest.write_bytes(newest.read_bytes()[:20])  # truncated, as after a crash of a non-atomic writer
    messages = []
    path, state = ckpt.newest_usable(tmp_path, log=messages.append)
    assert state["step"] == 20 and path.name == ckpt.checkpoint_name(0, 20)
    assert "unusable" in messages[0] and "bytes where" in messages[0]


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / ckpt.checkpoint_name(0, 1)
    torch.save({"evil": print}, path)  # not a tensor/primitive: must not be unpickled
    with pytest.raises(Exception):
        ckpt.load(path)


def test_prune_keeps_last_k_by_step(tmp_path):
    for step in (5, 50, 500, 5000):
        ckpt.atomic_save({}, tmp_path / ckpt.checkpoint_name(step // 100, step))
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.checkpoint_name(5, 500), ckpt.checkpoint_name(50, 5000)]


def test_prune_counts_end_of_epoch_checkpoints_as_keep_last_says(tmp_path):
    """Mid-epoch checkpoints (every few minutes) do not push the last epochs out: keep_last=2 keeps
    the two newest end-of-epoch checkpoints, the two newest of the others (mid-epoch, interrupted)
    and the newest confirmed one."""
    plan = [(1, "mid-epoch"), (2, "epoch"), (3, "mid-epoch"), (4, "epoch"), (5, "mid-epoch"), (6, "epoch"),
            (7, "mid-epoch"), (8, "mid-epoch"), (9, "interrupted")]
    for step, tag in plan:
        ckpt.atomic_save({}, tmp_path / ckpt.checkpoint_name(0, step), {"tag": tag, "step": step,
                                                                         "confirmed": step == 1})
        ckpt.prune(tmp_path, 2)
    kept = [int(p.name.split("-s")[1][:9]) for p in ckpt.list_checkpoints(tmp_path)]
    assert kept == [1, 4, 6, 8, 9], kept
    help_text = {f.name: f.metadata["help"] for f in fields(CheckpointConfig)}["keep_last"]
    assert "end-of-epoch checkpoints to keep" in help_text and "mid-epoch" in help_text


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = tmp_path / "rng.pt"
    ckpt.atomic_save(ckpt.rng_state(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load(path))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_safetensors_export(tmp_path):
    from safetensors.torch import load_file

    ckpt.export_safetensors({"a": torch.ones(2, 2)}, tmp_path / "m.safetensors", {"arch": "x"})
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["a"], torch.ones(2, 2))


def test_resumed_log_keeps_what_the_checkpoint_saw(tmp_path):
    """A checkpoint written at the epoch's last log point (step 10), before that epoch's eval
    record: a run killed after the eval resumes there and evaluates again, so the eval record of
    step 10 must go (a step rule would keep it and the step would hold two eval records)."""
    import json

    from common.config import LogConfig
    from engine.logging import RunLogger

    lines = [{"step": 8, "train_loss": 1.0}, {"step": 10, "train_loss": 0.9}, {"step": 10, "val_top1": 50.0},
             {"step": 12, "train_loss": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 14, "tra')
    log = RunLogger(LogConfig(wandb="off"), tmp_path, {}, enabled=True, run_id="x")
    log.truncate(2, 10)  # the checkpoint counted 2 records
    log.metrics({"step": 10, "val_top1": 51.0})
    log.close()
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    new = kept[-1]
    assert new.pop("time") > 0 and new.pop("elapsed_s") >= 0  # stamped by the logger
    assert kept == lines[:2] + [{"step": 10, "val_top1": 51.0}] and log.records == 3
    old = RunLogger(LogConfig(wandb="off"), tmp_path, {}, enabled=True, run_id="x")
    old.truncate(-1, 8)  # a checkpoint from before records were counted: by step
    old.close()
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:1]
