"""Stage 1 of the fast backends (pipelines/ffcv.py, pipelines/dali.py) on data the converter wrote.

Both backends, one parametrized set: batch contract, random-resized-crop statistics vs timm,
shared-sampler order over simulated ranks, resume, progressive resolution, val coverage, missing
data and missing library. Then what only one backend has: FFCV's one Loader across resolutions and
its beton checks; DALI's random-stream checkpoints, its shard index and its rebuild rules. Eval pixel
parity: test_pipeline_parity.py.

FFCV JIT-compiles a Loader on its first epoch (several seconds) and DALI builds a graph, so the
multi-rank pipelines are module-scoped and reused; every check sets its own epoch first."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.stage1 import (check_missing_backend, check_missing_data, check_sharding_resume_progressive,
                                  check_train_crops, check_val_sharding, make)

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


def test_ffcv_crops_repeat_for_any_thread_count_and_after_a_resume(coords_root):
    """FFCV's crops, filters and flips come from the counter-based generator, not numba's per-thread
    ones: one thread or two give the same batches; a pipeline started at batch 2 (a resume) gives the
    uninterrupted epoch's last batches; another epoch or seed gives other crops of the same images."""
    def run(pipe, epoch, start=0):
        pipe.set_epoch(epoch, 32, start_batch=start)
        return [batch.images.clone() for batch in pipe]

    kw = dict(seed=2, repeats=0, batch_size=4, res=32)  # 16 images: 4 batches per epoch
    threads = torch.get_num_threads()
    one = run(make("ffcv", coords_root, "train", workers=1, **kw), 0)
    two = make("ffcv", coords_root, "train", workers=2, **kw)
    assert len(one) == 4 and all(a.equal(b) for a, b in zip(one, run(two, 0)))
    assert all(a.equal(b) for a, b in zip(one[2:], run(make("ffcv", coords_root, "train", workers=2, **kw), 0, 2)))
    assert not any(a.equal(b) for a, b in zip(one, run(two, 1)))
    assert not any(a.equal(b) for a, b in zip(one, run(make("ffcv", coords_root, "train", workers=2,
                                                             **{**kw, "seed": 3}), 0)))
    assert torch.get_num_threads() == threads, "FFCV changed torch's intra-op threads (the training step's)"


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
        assert len(sizes) == len(pipe) - start and set(sizes) == {res}, (epoch, sizes)


def test_dali_plain_sharding(ids_root):
    """repeats=0 over 2 ranks: DistributedSampler semantics from the shared sampler, no sample twice."""
    pipes = [make("dali", ids_root, "train", rank=r, world_size=2, seed=1, repeats=0, batch_size=BS, res=32, hflip=0.0)
             for r in range(2)]
    check_sharding_resume_progressive(pipes, n=48, seed=1, repeats=0, batch_size=BS)


def test_dali_no_flip_when_hflip_is_zero(coords_root):
    from tests.helpers.stage1 import crop_boxes

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
    from tests.helpers.stage1 import ids_of, stored_ids

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


# --------------------------------------------------------------------------- crop sampling and interpolation
KS_DRAWS, KS_P = 2048, 0.01
BIG_W, BIG_H = 500, 375  # an ImageNet-typical size, so integer rounding of crop sides barely matters


def torchvision_crop_stats(n: int, width: int, height: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Area fraction and log aspect ratio of ``n`` boxes from torchvision's RandomResizedCrop sampler
    (timm's RandomResizedCropAndInterpolation draws with the same code): the oracle."""
    import torchvision.transforms as T

    torch.manual_seed(seed)
    img = torch.empty(3, height, width)
    boxes = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], np.float64)
    h, w = boxes[:, 2], boxes[:, 3]
    return {"area": h * w / (width * height), "log_ratio": np.log(w / h)}


def assert_same_distribution(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], who: str) -> None:
    from scipy.stats import ks_2samp

    for key in ("area", "log_ratio"):
        p = ks_2samp(got[key], ref[key]).pvalue
        print(f"{who} crop {key}: {len(got[key])} draws, median {np.median(got[key]):.3f} "
              f"(torchvision {np.median(ref[key]):.3f}), KS p={p:.3g}")
        assert len(got[key]) >= KS_DRAWS and p > KS_P, (who, key, p)


def test_ffcv_crop_sampler_matches_torchvision():
    """The box sampler FFCV's decoder compiles (``counter_rng.random_resized_crop``, with the recipe's
    scale and ratio), drawn for 2,048 images of one epoch's key, against torchvision's sampler."""
    from pipelines import counter_rng

    key = counter_rng.stream_key(0, 0, 0)
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    boxes = np.array([counter_rng.random_resized_crop(BIG_H, BIG_W, scale, ratio, key, i, i % 64)
                      for i in range(KS_DRAWS)], np.float64)
    h, w = boxes[:, 2], boxes[:, 3]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + h <= BIG_H).all() and (boxes[:, 1] + w <= BIG_W).all()
    got = {"area": h * w / (BIG_W * BIG_H), "log_ratio": np.log(w / h)}
    assert_same_distribution(got, torchvision_crop_stats(KS_DRAWS, BIG_W, BIG_H), "ffcv")


def test_counter_rng_is_uniform_and_keyed():
    """The counter-based draws: uniform on [0, 1) (KS against the uniform law, 2^14 draws), and a
    new stream for every seed, epoch, rank, image, place in the batch and draw number."""
    from scipy.stats import kstest

    from pipelines import counter_rng

    key = counter_rng.stream_key(3, 5, 1)
    u = np.array([counter_rng.uniform(key, i, i % 7, d) for i in range(4096) for d in range(4)])
    assert 0.0 <= u.min() and u.max() < 1.0 and kstest(u, "uniform").pvalue > 0.01
    base = counter_rng.uniform(key, 10, 2, 0)
    keys = {counter_rng.stream_key(s, e, r) for s in range(3) for e in range(3) for r in range(3)}
    assert len(keys) == 27
    others = [counter_rng.uniform(counter_rng.stream_key(3, 6, 1), 10, 2, 0), counter_rng.uniform(key, 11, 2, 0),
              counter_rng.uniform(key, 10, 3, 0), counter_rng.uniform(key, 10, 2, 1)]
    assert all(o != base for o in others) and counter_rng.uniform(key, 10, 2, 0) == base


def converted_photos(tmp_path_factory, name: str, size: tuple[int, int], seed: int, quality: int) -> Path:
    """8 train JPEGs of ``size`` (real photo crops) in two classes, converted (train split only)."""
    from tests.helpers.photos import photo_crops
    from tests.helpers.stage1 import convert

    src = tmp_path_factory.mktemp(name) / "src"
    for i, img in enumerate(photo_crops(8, size, seed=seed)):
        folder = src / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i}.jpg", quality=quality)
    return convert(src, src.parent / "out", "--splits", "train")


@pytest.fixture(scope="module")
def big_root(tmp_path_factory):
    """8 train JPEGs of 500x375, converted."""
    return converted_photos(tmp_path_factory, "big", (BIG_W, BIG_H), seed=3, quality=90)


def test_dali_crop_sampler_matches_torchvision(big_root, monkeypatch):
    """End to end through our DALI graph (seeded, so deterministic): the decoded crops' sizes over
    256 epochs of 8 images, before our resize, and the flip coins (binomial test, p > 0.01)."""
    pytest.importorskip("nvidia.dali")
    import pipelines.dali as dali

    sizes, flips = [], []
    real = dali.resize_crops

    def record(crops, coins, *args, **kw):
        sizes.extend(tuple(crops[j].shape()[:2]) for j in range(len(crops)))
        flips.extend(np.array(coins.as_tensor()).reshape(-1).tolist())
        return real(crops, coins, *args, **kw)

    monkeypatch.setattr(dali, "resize_crops", record)
    pipe = make("dali", big_root, "train", batch_size=8, res=16, seed=4, workers=2)
    for epoch in range(KS_DRAWS // 8):
        pipe.set_epoch(epoch, 16)
        for _ in pipe:
            pass
    hw = np.array(sizes, np.float64)
    got = {"area": hw[:, 0] * hw[:, 1] / (BIG_W * BIG_H), "log_ratio": np.log(hw[:, 1] / hw[:, 0])}
    assert_same_distribution(got, torchvision_crop_stats(KS_DRAWS, BIG_W, BIG_H), "dali")
    from scipy.stats import binomtest

    assert len(flips) == KS_DRAWS and binomtest(int(sum(flips)), len(flips), 0.5).pvalue > KS_P, np.mean(flips)


SQUARE, INTERP_RES = 48, 96  # a 2x upscale: the two filters differ clearly


@pytest.fixture(scope="module")
def square_root(tmp_path_factory):
    """8 square train JPEGs, converted: with scale = ratio = (1, 1) every backend's random-resized
    crop is the whole image, so each output is the image resized with one filter."""
    return converted_photos(tmp_path_factory, "square", (SQUARE, SQUARE), seed=5, quality=95)


def decoded(path, decoder: str) -> np.ndarray:
    """The source JPEG's pixels as the backend decodes them (the converter stored the file's own
    bytes): PIL for the reference and DALI (both libjpeg-turbo, identical here), FFCV's decoder for FFCV."""
    from PIL import Image

    if decoder != "ffcv":
        return np.asarray(Image.open(path).convert("RGB"))
    from ffcv.libffcv import imdecode

    pixels = np.zeros((SQUARE, SQUARE, 3), np.uint8)
    imdecode(np.frombuffer(path.read_bytes(), np.uint8), pixels, SQUARE, SQUARE, SQUARE, SQUARE, 0, 0, 1, 1,
             False, False)
    return pixels


TELL_APART = 0.5  # grey levels (mean |diff|) between an image's bilinear and bicubic resize


def interpolation_choices(pipe, root, epochs: int, decoder: str) -> tuple[list[bool], float, int]:
    """Which filter made each output image (True: bicubic), found as the nearest of PIL's bilinear
    and bicubic resizes of every source image; the worst distance to the nearest (mean |diff| in
    grey levels: 0 means the backend's pixels are exactly one of PIL's resizes); how many sources
    the two filters tell apart (only their outputs are counted)."""
    from PIL import Image

    sources = sorted((root.parent / "src" / "train").rglob("*.jpg"))
    candidates = torch.stack([torch.from_numpy(np.array(Image.fromarray(decoded(p, decoder)).resize(
        (INTERP_RES, INTERP_RES), f))).permute(2, 0, 1).float()
        for p in sources for f in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)])
    gap = (candidates[0::2] - candidates[1::2]).abs().mean(dim=(1, 2, 3))  # per source: the filters' difference
    choices, worst = [], 0.0
    for epoch in range(epochs):
        pipe.set_epoch(epoch, INTERP_RES)
        for batch in pipe:
            d = (batch.images.float()[:, None] - candidates[None]).abs().mean(dim=(2, 3, 4))  # [n, 2 * sources]
            best = d.argmin(1)
            worst = max(worst, float(d.min(1).values.max()))
            # a flat patch looks the same through both filters: only count sources they tell apart
            choices += [bool(b % 2) for b in best.tolist() if gap[b // 2] > TELL_APART]
    return choices, worst, int((gap > TELL_APART).sum())


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "random"])
@pytest.mark.parametrize("name", ["reference", "ffcv", "dali"])
def test_train_interpolation_follows_the_recipe(name, mode, square_root):
    """augment.train_interpolation in every backend: ``bilinear``/``bicubic`` always, ``random``
    (timm's default) either with probability 1/2 per image (4-sigma binomial bound over >= 192 draws).
    Every output is exactly PIL's resize of the backend's decoded pixels with the chosen filter."""
    kw = dict(batch_size=4, res=INTERP_RES, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, interpolation=mode,
              seed=6, repeats=0, workers=2)
    if name == "reference":
        from pipelines.reference import ReferencePipeline

        pipe = ReferencePipeline(str(square_root), "train", device=torch.device("cpu"), rank=0, world_size=1,
                                 **{**kw, "workers": 0})
    else:
        pytest.importorskip(LIBRARY[name])
        pipe = make(name, square_root, "train", **kw)
    choices, worst, distinct = interpolation_choices(pipe, square_root, 32 if mode == "random" else 2, name)
    print(f"{name} {mode}: {np.mean(choices):.3f} bicubic over {len(choices)} (of {distinct} distinguishable "
          f"sources), worst distance {worst:.3f}")
    assert worst < 0.05 and distinct >= 6, (worst, distinct)  # exact resizes; the test can tell filters apart
    if mode == "random":
        n = len(choices)
        assert n >= 32 * 6 and abs(np.mean(choices) - 0.5) < 4 * math.sqrt(0.25 / n), np.mean(choices)
    else:
        assert set(choices) == {mode == "bicubic"}


@pytest.mark.parametrize("name", ["reference", "ffcv", "dali"])
def test_eval_interpolation_reaches_every_backend(name, photos_root):
    """eval.interpolation through pipelines.build (the engine's and evaluate's val path): the
    reference equals timm's eval transform with that filter; FFCV and DALI are nearer to the
    reference with the same filter than to the one with the other filter."""
    from timm.data import create_transform

    from common.config import DataConfig, EvalConfig
    from pipelines.build import build_val_pipeline
    from tests.helpers.stage1 import EVAL_CROP, EVAL_RES, collect

    if name != "reference":
        pytest.importorskip(LIBRARY[name])

    def val(backend: str, interpolation: str) -> torch.Tensor:
        data = DataConfig(pipeline=backend, root=str(photos_root), num_classes=3, workers=2)
        ev = EvalConfig(res=EVAL_RES, crop_pct=EVAL_CROP, batch_size=4, interpolation=interpolation)
        return collect(build_val_pipeline(data, ev, rank=0, world_size=1, device=torch.device("cpu")))[0].float()

    ref = {i: val("reference", i) for i in ("bilinear", "bicubic")}
    if name == "reference":
        from PIL import Image

        files = sorted((photos_root.parent / "src" / "val").rglob("*.jpg"))
        for interpolation, images in ref.items():
            tf = create_transform(EVAL_RES, is_training=False, crop_pct=EVAL_CROP, interpolation=interpolation)
            tf.transforms = tf.transforms[:-2]  # uint8 pixels: no ToTensor / Normalize
            timm_images = torch.stack([torch.from_numpy(np.array(tf(Image.open(f).convert("RGB")))).permute(2, 0, 1)
                                       for f in files]).float()
            assert torch.equal(images, timm_images), interpolation
        assert (ref["bilinear"] - ref["bicubic"]).abs().mean() > 0.5  # the filters differ on these photos
        return
    for interpolation, other in (("bilinear", "bicubic"), ("bicubic", "bilinear")):
        got = val(name, interpolation)
        near, far = ((got - ref[i]).abs().mean().item() for i in (interpolation, other))
        print(f"{name} eval {interpolation}: mean |diff| to the reference {near:.3f} (same filter), {far:.3f} (other)")
        assert near < far, (interpolation, near, far)


def test_data_mean_and_std_reach_stage_2_in_train_and_eval():
    """data.mean / data.std are what stage 2 (every backend's, and evaluation's) normalizes with."""
    from common.config import AugmentConfig, DataConfig
    from pipelines.base import Batch
    from pipelines.build import build_stage2

    data = DataConfig(num_classes=3, mean=[0.5, 0.25, 0.75], std=[0.2, 0.4, 0.1])
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(data.mean)[:, None, None]) / torch.tensor(data.std)[:, None, None]
    for train in (False, True):
        out, _ = build_stage2(data, AugmentConfig(), train=train)(Batch(x, torch.zeros(4, dtype=torch.int64)))
        assert torch.allclose(out, expected, atol=1e-5), train


def test_ffcv_flip_rate_over_2048_draws(coords_root):
    """FFCV's flips end to end (drawn in our decoder from the counter-based generator): 2,048 draws,
    the same ones in every run (seed 7), so the bound is the usual p > 0.01."""
    pytest.importorskip("ffcv")
    from scipy.stats import binomtest

    from tests.helpers.stage1 import crop_boxes

    pipe = make("ffcv", coords_root, "train", batch_size=16, res=32, seed=7)
    flips = []
    for epoch in range(KS_DRAWS // 16):
        pipe.set_epoch(epoch, 32)
        for batch in pipe:
            flips += crop_boxes(batch.images)["flipped"].tolist()
    p = binomtest(int(sum(flips)), len(flips), 0.5).pvalue
    print(f"ffcv flips: {np.mean(flips):.3f} over {len(flips)}, binomial p={p:.3g}")
    assert len(flips) == KS_DRAWS and p > 0.01, (np.mean(flips), p)
