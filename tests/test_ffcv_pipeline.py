"""FFCV stage 1 (pipelines/ffcv.py) on data the converter wrote: batch contract, random-resized-crop
statistics vs timm, shared-sampler order over simulated ranks, resume, progressive resolution
without a new Loader, val coverage, and the error paths. Eval pixel parity: test_pipeline_parity.py.

Each FFCV Loader JIT-compiles on its first epoch (several seconds), so pipelines are module-scoped
and reused; every check sets its own epoch first."""
from __future__ import annotations

import pytest

pytest.importorskip("ffcv")

from tests.test_pipeline_parity import (check_missing_backend, check_missing_data,  # noqa: E402
                                        check_sharding_resume_progressive, check_train_crops, check_val_sharding,
                                        coords_root, ids_root, make)

__all__ = ["coords_root", "ids_root"]  # session fixtures shared with the other stage-1 tests

SEED, REPEATS, BS = 5, 3, 8


@pytest.fixture(scope="module")
def rank_pipes(ids_root):
    return [make("ffcv", ids_root, "train", rank=r, world_size=2, seed=SEED, repeats=REPEATS, batch_size=BS, res=32)
            for r in range(2)]


def test_train_batches_and_crop_statistics(coords_root):
    pipe = make("ffcv", coords_root, "train", batch_size=8, res=64)
    assert pipe.num_classes == 3 and pipe.num_samples == 16 and len(pipe) == 2
    check_train_crops(pipe, epochs=16, res=64)


def test_sharding_resume_and_progressive_resolution(rank_pipes):
    loader, code = rank_pipes[0].loader, rank_pipes[0].loader.code
    check_sharding_resume_progressive(rank_pipes, n=48, seed=SEED, repeats=REPEATS, batch_size=BS)
    # Resolution changed three times with the same Loader and the same compiled code.
    assert rank_pipes[0].loader is loader and rank_pipes[0].loader.code is code


def test_val_every_sample_once_across_ranks(ids_root):
    pipes = [make("ffcv", ids_root, "val", rank=r, world_size=2, batch_size=4, res=32) for r in range(2)]
    check_val_sharding(pipes, n=21)


def test_missing_data_is_a_one_line_data_error(tmp_path, ids_root):
    check_missing_data("ffcv", tmp_path, ids_root)


def test_truncated_or_damaged_beton_is_a_one_line_data_error(tmp_path, ids_root):
    """FFCV itself fails deep in numpy ("negative dimensions are not allowed") on a cut file."""
    import shutil

    from pipelines.base import DataError

    root = tmp_path / "conv"
    shutil.copytree(ids_root, root)
    beton = root / "ffcv" / "train.beton"
    data = beton.read_bytes()
    beton.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="truncated or changed") as e:
        make("ffcv", root, "train")
    assert "\n" not in str(e.value) and "re-run the converter" in str(e.value)
    beton.write_bytes(data[:24] + b"\xff" * (len(data) - 24))  # same size, header's table pointer intact, table gone
    with pytest.raises(DataError, match="cannot read"):
        make("ffcv", root, "train")


def test_missing_ffcv_is_missing_backend_error(monkeypatch):
    check_missing_backend("pipelines.ffcv", "ffcv", monkeypatch)
