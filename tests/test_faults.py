"""What a multi-day run meets, run through the real CLI (tests/helpers/faults.py holds the cases; this
module runs them on one shared small data set, the benchmark adds kill -9 at random points and the
FFCV stop).

* group SIGTERM under ``torchrun --nproc_per_node 2`` (gloo) mid-epoch, reference and DALI: one
  stop line, one checkpoint at a step both ranks agree on, exit 143, no DataLoader worker crash,
  and ``--resume auto`` ends bit-identical to an uninterrupted torchrun run;
* a diverging learning rate (loss limit, and weights that overflow): exit 3, nothing non-finite
  usable, the message names the last good checkpoint, no fp32 advice to an fp32 run;
* the newest checkpoint damaged in the middle (same size): refused by its checksum, the previous
  one used, final weights identical; every checkpoint unusable: one line, then ``--resume fresh``;
* ENOSPC on a small tmpfs (root only) while training and converting: one line with the bytes;
* a stale temp file, ``--resume`` of a text file / cut checkpoint, a config error under torchrun;
* an error on rank 1 alone (its batch unreadable): one line with the rank, the group ends at once;
* 4 ranks resumed from a mid-epoch checkpoint: bit-identical to the uninterrupted 4-rank run;
* a stop during an evaluation (SIGTERM one process and under torchrun, SIGINT during the final one):
  exit 128 + signal within seconds, the evaluation redone on resume, the end as an uninterrupted run;
* ``--resume auto`` on a folder with a run's output and no checkpoint: moved aside, never overwritten.
"""
from __future__ import annotations

import os

import pytest

from tests.helpers.faults import Faults


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return Faults(tmp_path_factory.mktemp("faults"))


def check(row) -> None:
    assert row.ok, f"{row.case}\n  expected: {row.expected}\n  observed: {row.observed}"


@pytest.mark.parametrize("pipeline", ["reference", "dali"])
def test_group_sigterm_under_torchrun_stops_once_and_resumes_exactly(faults, pipeline):
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    check(faults.sigterm(pipeline))


@pytest.mark.parametrize("nan", [False, True], ids=["loss-limit", "weights-overflow"])
def test_diverging_run_keeps_only_finite_checkpoints_and_names_the_last_good(faults, nan):
    check(faults.diverge(nan=nan))


def test_checkpoint_damaged_in_the_middle_is_refused_and_the_previous_used(faults):
    check(faults.corrupt())


def test_all_checkpoints_unusable_is_one_line_then_resume_fresh(faults):
    check(faults.all_bad())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_is_one_line_with_the_bytes(faults):
    for row in faults.enospc():
        check(row)


def test_stale_temp_removed_and_bad_resume_and_torchrun_config_error_are_one_line(faults):
    for row in (faults.stale_temp(), faults.bad_resume(), faults.torchrun_config()):
        check(row)


def test_an_error_on_rank_1_alone_is_one_line_and_ends_the_group(faults):
    """Before: rank 1 waited 5 s and exited without a word; rank 0 died in the all-reduce (gloo) or
    would wait for NCCL's timeout; no line said why."""
    check(faults.rank_error())


def test_a_4_rank_resume_is_bit_identical(faults):
    """Before: the resumed processes reduced their first step in DDP's initial one-bucket layout, the
    uninterrupted run in the rebuilt buckets; with 4 ranks the sums differ in the last bits."""
    check(faults.resume_4_ranks())


@pytest.mark.parametrize("nproc", [0, 2], ids=["one-process", "torchrun-2"])
def test_a_stop_during_evaluation_is_honoured_and_resumed_exactly(faults, nproc):
    """Before: the stop flag was read between training steps only; a signal during an evaluation waited
    for all of it, and one Ctrl-C during the final evaluation ended the run with exit 0."""
    check(faults.stop_during_eval(nproc))


def test_resume_auto_never_overwrites_output_without_checkpoint(faults):
    """Before: "no checkpoint in OUT; starting fresh", metrics.jsonl cut and both exports replaced."""
    check(faults.resume_auto_without_checkpoint())


def test_ranks_resume_from_one_checkpoint_when_one_rank_cannot_read_the_newest(faults):
    """Before: each rank took its own newest readable checkpoint; rank 1 resumed a step behind rank 0."""
    check(faults.unreadable_on_one_rank())


def test_a_failed_final_export_on_rank_0_ends_every_rank(faults):
    """Before: the others had closed the board at the final barrier; under srun (rank 0 hosts the store)
    rank 1 printed a traceback and a second line when rank 0's process went."""
    check(faults.export_fails_on_rank_0())


def test_a_rank_killed_without_a_word_ends_the_group_with_its_name(faults):
    """Before: rank 0 died in the next collective with gloo's "Connection reset by peer" traceback (with
    NCCL nothing would arrive at all); nothing said that rank 1 had died."""
    check(faults.silent_death())


def test_a_rank_stuck_alive_ends_the_group_at_the_recipes_timeout(faults):
    """Before: rank 0 waited in the all-reduce for the process group's default timeout (30 min on gloo)."""
    check(faults.stuck_rank())


def test_a_mid_epoch_resume_on_another_process_count_is_refused_with_the_boundary_to_use(faults):
    """Before: the position (a micro-batch count of the old shard) was applied to the new shard: samples
    repeated or skipped, the epoch a different number of steps."""
    check(faults.world_size_change())
