"""Stage 1 of the fast backends (pipelines/ffcv.py, pipelines/dali.py) on data the converter wrote.

Both backends, one parametrized set: batch contract, random-resized-crop statistics vs timm,
shared-sampler order over simulated ranks, resume, progressive resolution, val coverage, missing
data and missing library. Then what only one backend has: FFCV's one Loader across resolutions and
its beton checks; DALI's random-stream checkpoints, its shard index and its rebuild rules. Eval pixel
parity: test_pipeline_parity.py.

FFCV JIT-compiles a Loader on its first epoch (several seconds) and DALI builds a graph, so the
multi-rank pipelines are module-scoped and reused; every check sets its own epoch first."""
from __future__ import annotations

import pytest

from tests.test_pipeline_parity import (check_missing_backend, check_missing_data, check_sharding_resume_progressive,
                                        check_train_crops, check_val_sharding, coords_root, ids_root, make)

__all__ = ["coords_root", "ids_root"]  # session fixtures shared with the other stage-1 tests

SEED, REPEATS, BS = 5, 3, 8
LIBRARY = {"ffcv": "ffcv", "dali": "nvidia.dali"}


@pytest.fixture(scope="module", params=sorted(LIBRARY))
def backend(request) -> str:
    pytest.importorskip(LIBRARY[request.param])
    return request.param


@pytest.fixture(scope="module")
def rank_pipes(backend, ids_root):
    return [make(backend, ids_root, "train", rank=r, world_size=2, seed=SEED, repeats=REPEATS, batch_size=BS, res=32)
            for r in range(2)]


def test_train_batches_and_crop_statistics(backend, coords_root):
    pipe = make(backend, coords_root, "train", batch_size=8, res=64)
    assert pipe.num_classes == 3 and pipe.num_samples == 16 and len(pipe) == 2
    check_train_crops(pipe, epochs=16, res=64)


def test_sharding_resume_and_progressive_resolution(backend, rank_pipes):
    first = rank_pipes[0]
    loader = getattr(first, "loader", None)
    check_sharding_resume_progressive(rank_pipes, n=48, seed=SEED, repeats=REPEATS, batch_size=BS)
    if backend == "ffcv":  # resolution changed three times with the same Loader and the same compiled code
        assert first.loader is loader and first.loader.code is loader.code


def test_val_every_sample_once_across_ranks(backend, ids_root):
    pipes = [make(backend, ids_root, "val", rank=r, world_size=2, batch_size=4, res=32) for r in range(2)]
    check_val_sharding(pipes, n=21)


def test_missing_data_is_a_one_line_data_error(backend, tmp_path, ids_root):
    check_missing_data(backend, tmp_path, ids_root)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_missing_library_is_missing_backend_error(name, monkeypatch):
    check_missing_backend(f"pipelines.{name}", LIBRARY[name], monkeypatch)


# --------------------------------------------------------------------------- FFCV only
def test_ffcv_truncated_or_damaged_beton_is_a_one_line_data_error(tmp_path, ids_root):
    """FFCV itself fails deep in numpy ("negative dimensions are not allowed") on a cut file."""
    import shutil

    from pipelines.base import DataError

    pytest.importorskip("ffcv")
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


# --------------------------------------------------------------------------- DALI only
def test_dali_random_state_resumes_the_crop_and_flip_streams(coords_root):
    """A checkpoint's ``random_state`` taken after 2 batches (while DALI has prefetched more),
    loaded into a new pipeline, gives the same next batches as the uninterrupted pipeline: the
    crops and flips come from DALI's operators, whose streams only DALI's checkpoint restores."""
    def run(pipe, epoch, start, n):
        pipe.set_epoch(epoch, 32, start_batch=start)
        out = []
        for batch in pipe:
            out.append(batch.images.clone())
            if len(out) == n:
                break
        return out

    kw = dict(seed=2, repeats=0, batch_size=4, res=32)  # 16 images: 4 batches per epoch
    whole = make("dali", coords_root, "train", **kw)
    expected = run(whole, 0, 0, 4) + run(whole, 1, 0, 2)
    first = make("dali", coords_root, "train", **kw)
    got = run(first, 0, 0, 2)
    state = first.random_state()
    resumed = make("dali", coords_root, "train", **kw)
    resumed.load_random_state(state)
    got += run(resumed, 0, 2, 2) + run(resumed, 1, 0, 2)
    assert len(got) == len(expected) and all(a.equal(b) for a, b in zip(expected, got))
    fresh = make("dali", coords_root, "train", **kw)  # without the state: the same images, other crops
    assert not any(a.equal(b) for a, b in zip(expected[2:4], run(fresh, 0, 2, 2)))


def test_a_graph_dali_cannot_checkpoint_still_trains(ids_root, monkeypatch):
    """If an operator cannot save its state (possible for the GPU decoder, untried here), the
    pipeline warns once and trains without DALI's checkpoints, never fails."""
    Pipeline = pytest.importorskip("nvidia.dali").Pipeline

    def refuse(self, filename=None):
        raise RuntimeError("Checkpointing is not implemented for this operator")

    monkeypatch.setattr(Pipeline, "checkpoint", refuse)
    with pytest.warns(RuntimeWarning, match="cannot checkpoint this train graph"):
        pipe = make("dali", ids_root, "train", batch_size=BS, res=32)
    assert pipe.random_state() is None
    for epoch, res, start in ((0, 32, 0), (1, 48, 0), (2, 48, 2)):  # resolution change, resume offset
        pipe.set_epoch(epoch, res, start_batch=start)
        sizes = [b.images.shape[-1] for b in pipe]


def test_dali_plain_sharding(ids_root):
    """repeats=0 over 2 ranks: DistributedSampler semantics from the shared sampler, no sample twice."""
    pipes = [make("dali", ids_root, "train", rank=r, world_size=2, seed=1, repeats=0, batch_size=BS, res=32, hflip=0.0)
             for r in range(2)]
    check_sharding_resume_progressive(pipes, n=48, seed=1, repeats=0, batch_size=BS)


def test_dali_no_flip_when_hflip_is_zero(coords_root):
    from tests.test_pipeline_parity import crop_boxes

    pipe = make("dali", coords_root, "train", batch_size=8, res=48, hflip=0.0)
    for epoch in range(4):
        pipe.set_epoch(epoch, 48)
        for batch in pipe:
            assert not crop_boxes(batch.images)["flipped"].any()


def test_dali_shard_store_matches_tar_members(ids_root):
    """The index-based reader returns the same bytes and labels as reading the tars with tarfile."""
    import tarfile

    import numpy as np

    pipe = make("dali", ids_root, "val")
    k = 0
    for tar in sorted((ids_root / "dali" / "val").glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            assert bytes(pipe.store.jpegs(np.array([k]))[0]) == members[name]
            assert pipe.store.labels[k] == int(members[name[:-4] + ".cls"])
            k += 1
    assert k == pipe.num_samples


def test_dali_consecutive_epochs_continue_without_a_reset(ids_root):
    """Whole train epochs at one resolution follow each other in one DALI stream (no rebuild at the
    boundary) and still give exactly the sampler's order; a new resolution or a resume offset
    rebuilds the pipeline once, from the checkpoint of the batches handed out (so the crops DALI
    prefetched and nobody used do not move its random streams: as after a resume)."""
    from pipelines.sampler import epoch_indices
    from tests.test_pipeline_parity import ids_of, stored_ids

    pipe = make("dali", ids_root, "train", seed=3, repeats=0, batch_size=BS, res=32, hflip=0.0)
    resets = []
    real_rebuild = pipe._rebuild
    pipe._rebuild = lambda cpt: (resets.append(1), real_rebuild(cpt))[1]
    order = stored_ids(ids_root, "train")

    def expected(epoch):
        idx = epoch_indices(48, epoch=epoch, seed=3, rank=0, world_size=1, repeats=0)
        return [order[k] for k in idx[: len(idx) // BS * BS]]

    for epoch in range(3):
        ids, _, sizes = ids_of(pipe, epoch, 32)
        assert ids == expected(epoch) and sizes == [32] * len(pipe)
    assert resets == []
    ids, _, sizes = ids_of(pipe, 3, 48)
    assert ids == expected(3) and sizes == [48] * len(pipe) and len(resets) == 1
    ids, _, _ = ids_of(pipe, 4, 48, start_batch=2)
    assert ids == expected(4)[2 * BS:] and len(resets) == 2
