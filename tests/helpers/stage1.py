"""Stage 1 as the backend tests drive it: small converted data sets whose images carry their own id or
coordinates, each backend built with the keywords pipelines/build.py uses, and the checks every backend
must pass (crops, sharding, resume, progressive resolution, missing data or library).

The data sets:

* ``ids``: flat-colour images whose colour encodes (sample index, label), so any crop/resize/flip
  of one still says which sample it was: checks order, sharding, resume and label alignment.
* ``coords``: 256x192 gradients, R = x, G = y * 255/191, B = label code, so the output of a
  random-resized crop reveals the crop box (and flip) it came from: crop statistics vs timm.
* ``photos``: real photographs (tests/helpers/photos.py) for pixel parity with the reference pipeline.

Each is a class-folder tree ``SRC/{train,val}/<class>/*`` (PNG; the photos as JPEG) run through the
converter (``tools/convert_imagenet.py SRC OUT --formats ffcv,dali``), once per session.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
COORD_W, COORD_H = 256, 192
EVAL_RES, EVAL_CROP = 96, 0.875  # the eval parity point (tests/test_pipeline_parity.py, test_stage1_backends.py)
CONVERTER = ROOT / "tools" / "convert_imagenet.py"


def id_colour(i: int, label: int) -> tuple[int, int, int]:
    """Colour of sample ``i`` (< 64) with ``label`` (< 4): 8 levels per channel, 32 apart, so JPEG
    and resampling errors (a few levels) never change the decoded id."""
    return 16 + 32 * (i % 8), 16 + 32 * (i // 8), 40 + 50 * label


def stored_ids(root: Path, split: str) -> list[int]:
    """Sample id at each dataset index of a converted ``ids`` split, read independently of the
    pipelines: the JPEG members of the DALI shards in manifest order, decoded by PIL. (The
    converter shuffles train by default; FFCV's tests compare against this too, so they also check
    that the beton holds the same order as the shards.)"""
    import io
    import json
    import tarfile

    split_entry = json.loads((root / "manifest.json").read_text())["splits"][split]
    ids = []
    for shard in split_entry["shards"]:
        with tarfile.open(root / shard["path"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    img = np.array(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                    ids.append(int(decode_ids(torch.from_numpy(img).permute(2, 0, 1)[None])[0][0]))
    return ids


def decode_ids(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(sample id, label code) of each image in a uint8 [N,3,H,W] batch of ``ids`` images."""
    m = images.float().mean(dim=(2, 3)).cpu().numpy()
    q = np.clip(np.round((m[:, :2] - 16) / 32), 0, 7).astype(int)
    return q[:, 0] + 8 * q[:, 1], np.round((m[:, 2] - 40) / 50).astype(int)


def coord_image(label: int) -> Image.Image:
    x = np.arange(COORD_W, dtype=np.float64)[None, :].repeat(COORD_H, 0)
    y = np.arange(COORD_H, dtype=np.float64)[:, None].repeat(COORD_W, 1) * 255 / (COORD_H - 1)
    b = np.full((COORD_H, COORD_W), 40 + 50 * label, np.float64)
    return Image.fromarray(np.stack([x, y, b], -1).round().astype(np.uint8))


def crop_boxes(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Recover each ``coords`` crop's box in source pixels from the output's R/G ramps: a resized
    crop of [x0, x0 + w) samples x at x0 + (c + 0.5) * w / res, so a line fit over columns gives
    w (slope * res) and its sign gives the flip; the same over rows gives h."""
    img = images.float().cpu().numpy()
    n, _, res, _ = img.shape
    c = (np.arange(res) + 0.5) / res
    keep = slice(res // 8, res - res // 8)  # edge pixels carry the resampling filter's clamp
    rx = img[:, 0, keep, :].mean(1)  # [n, res] mean R per column
    gy = img[:, 1, :, keep].mean(2) * (COORD_H - 1) / 255  # [n, res] y per row
    sx = np.polyfit(c, rx.T, 1)[0]
    sy = np.polyfit(c, gy.T, 1)[0]
    w, h = np.abs(sx), np.abs(sy)
    return {"w": w, "h": h, "area": w * h / (COORD_W * COORD_H), "aspect": w / h, "flipped": sx < 0,
            "label": np.round((img[:, 2].mean((1, 2)) - 40) / 50).astype(int)}


def write_tree(src: Path, kind: str, n_train: int, n_val: int, classes: int = 3) -> Path:
    """``src/{train,val}/c<k>/<i>.png`` (lossless: the converter's one JPEG encode is the only
    lossy step every backend sees); photos as ``<i>.jpg`` (quality 90), which the converter stores
    byte for byte, so backends and the reference decode the very same file."""
    from tests.helpers.photos import photo_crops

    photos = (photo_crops(n_train, (288, 224), seed=1) + photo_crops(n_val, (224, 288), seed=2)
              if kind == "photos" else None)
    for split, n, off in (("train", n_train, 0), ("val", n_val, n_train)):
        for i in range(n):
            label = i % classes
            if kind == "ids":
                img = Image.new("RGB", (48 + 8 * (i % 3), 40 + 8 * (i % 4)), id_colour(i, label))
            elif kind == "coords":
                img = coord_image(label)
            else:
                img = photos[off + i]
            folder = src / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "photos":  # JPEG, as ImageNet's files: the converter stores them as they are
                img.save(folder / f"{i:04d}.jpg", quality=90)
            else:  # flat colours and ramps: PNG, lossless
                img.save(folder / f"{i:04d}.png")
    return src


def convert(src: Path, out: Path, *extra: str) -> Path:
    r = subprocess.run([sys.executable, str(CONVERTER), str(src), str(out), "--formats", "ffcv,dali", "--quiet",
                        "--shard-size", "16", *extra],  # several shards even for these tiny sets
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def dataset(tmp_path_factory, kind: str, n_train: int, n_val: int) -> Path:
    """Build (once per session, shared by every test module) and convert one synthetic dataset."""
    base = tmp_path_factory.getbasetemp() / f"stage1_{kind}"
    out = base / "out"
    if not (out / "manifest.json").is_file():
        write_tree(base / "src", kind, n_train, n_val)
        convert(base / "src", out)
    return out


def make(backend: str, root: Path, split: str, **kw):
    """Construct a backend with the exact keywords pipelines/build.py uses."""
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        from pipelines.ffcv import FFCVPipeline as cls
    else:
        pytest.importorskip("nvidia.dali")
        from pipelines.dali import DALIPipeline as cls
    if split == "train":
        args = dict(batch_size=8, res=64, device=torch.device("cpu"), rank=0, world_size=1, seed=0, repeats=0,
                    workers=2, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    else:
        args = dict(batch_size=8, res=64, crop_pct=0.875, device=torch.device("cpu"), rank=0, world_size=1,
                    workers=2)
    args.update(kw)
    return cls(root, split, **args)


def collect(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of one epoch, cloned (FFCV reuses its output buffers)."""
    ims, labs = [], []
    for b in pipe:
        ims.append(b.images.clone())
        labs.append(b.labels.clone())
    return torch.cat(ims), torch.cat(labs)


def check_batch(batch, n: int, res: int) -> None:
    """Shape, dtype, memory layout and device of one stage-1 batch (pipelines/base.py contract)."""
    assert batch.images.shape == (n, 3, res, res) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.shape == (n,) and batch.labels.dtype == torch.int64
    assert batch.images.device.type == batch.labels.device.type == "cpu"


def timm_crop_stats(n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed: int = 0) -> dict[str, np.ndarray]:
    """Crop boxes drawn by timm's RandomResizedCrop on a COORD_W x COORD_H image: the oracle."""
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

    torch.manual_seed(seed)
    img = Image.new("RGB", (COORD_W, COORD_H))
    boxes = np.array([RRC.get_params(img, scale, ratio) for _ in range(n)], dtype=np.float64)  # i, j, h, w
    return {"area": boxes[:, 3] * boxes[:, 2] / (COORD_W * COORD_H), "aspect": boxes[:, 3] / boxes[:, 2]}


def check_train_crops(pipe, epochs: int, res: int) -> dict[str, np.ndarray]:
    """Run ``epochs`` epochs of a train pipeline over ``coords``; check every batch, label alignment
    and that crop area / aspect distributions match timm's RandomResizedCrop (two-sample KS test,
    alpha = 1e-3), flips happen about half the time. Returns the measured statistics."""
    from scipy.stats import ks_2samp

    stats: dict[str, list] = {}
    for epoch in range(epochs):
        pipe.set_epoch(epoch, res)
        batches = 0
        for batch in pipe:
            check_batch(batch, pipe.batch_size, res)
            boxes = crop_boxes(batch.images)
            assert boxes["label"].tolist() == batch.labels.tolist()  # labels travel with their images
            for k, v in boxes.items():
                stats.setdefault(k, []).append(v)
            batches += 1
        assert batches == len(pipe)
    got = {k: np.concatenate(v) for k, v in stats.items()}
    ref = timm_crop_stats(4000)
    for key in ("area", "aspect"):
        p = ks_2samp(got[key], ref[key]).pvalue
        print(f"crop {key}: ours median {np.median(got[key]):.3f} (10%-90% {np.percentile(got[key], 10):.3f}-"
              f"{np.percentile(got[key], 90):.3f}), timm median {np.median(ref[key]):.3f} "
              f"({np.percentile(ref[key], 10):.3f}-{np.percentile(ref[key], 90):.3f}), KS p={p:.3g}")
        assert p > 1e-3, (key, p)
    # The box estimate is good to about a pixel: areas stay within the scale range, aspects within ratio.
    assert got["area"].min() > 0.08 * 0.9 and got["area"].max() < 1.03
    assert got["aspect"].min() > 0.75 * 0.95 and got["aspect"].max() < 4 / 3 * 1.05
    n = len(got["flipped"])
    frac = got["flipped"].mean()
    assert abs(frac - 0.5) < 4 * math.sqrt(0.25 / n), frac  # binomial, 4 sigma
    return got


def ids_of(pipe, epoch: int, res: int | None = None, start_batch: int = 0, limit: int | None = None):
    """Set the epoch, run it (or its first ``limit`` batches) and return (ids, labels, resolutions)."""
    pipe.set_epoch(epoch, res, start_batch=start_batch)
    ids, labels, sizes = [], [], []
    for k, batch in enumerate(pipe):
        if limit is not None and k >= limit:
            break
        i, code = decode_ids(batch.images)
        assert code.tolist() == batch.labels.tolist()
        ids += i.tolist()
        labels += batch.labels.tolist()
        sizes.append(batch.images.shape[-1])
    return ids, labels, sizes


def check_sharding_resume_progressive(pipes, *, n: int, seed: int, repeats: int, batch_size: int) -> None:
    """Simulated ranks (``pipes[r]`` has rank r): each epoch's ids are exactly the shared sampler's
    indices for that rank, in order, less the last partial batch; resuming with ``start_batch``
    yields exactly the rest of that order; an epoch abandoned early does not leak into the next;
    and a progressive schedule's resolution takes effect at its epoch."""
    from common.config import ProgressiveConfig
    from engine.progressive import resolution_for_epoch
    from pipelines.sampler import epoch_indices

    world = len(pipes)
    order = stored_ids(pipes[0].root, "train")
    assert sorted(order) == list(range(n))
    prog = ProgressiveConfig(kind="linear", start_res=32, end_res=64, start_epoch=1, end_epoch=3, round_to=16)
    schedule = [resolution_for_epoch(prog, e, 5, 64) for e in range(5)]
    assert schedule == [32, 32, 48, 64, 64]
    for epoch in range(4):
        seen = []
        for rank, pipe in enumerate(pipes):
            expect_idx = epoch_indices(n, epoch=epoch, seed=seed, rank=rank, world_size=world, repeats=repeats)
            expect_idx = expect_idx[: len(expect_idx) // batch_size * batch_size]
            ids, labels, sizes = ids_of(pipe, epoch, schedule[epoch])
            assert ids == [order[k] for k in expect_idx], (epoch, rank)
            assert labels == [order[k] % 3 for k in expect_idx]  # write_tree: label = id % 3
            assert sizes == [schedule[epoch]] * len(pipe) and len(pipe) == len(expect_idx) // batch_size
            seen += ids
        if repeats == 0:
            assert len(set(seen)) == len(seen)  # no sample twice in an epoch across ranks
    # resume mid-epoch: the rest of the order, not re-drawn and not re-decoded from the start
    pipe = pipes[-1]
    full, _, _ = ids_of(pipe, 7, 32)
    rest, _, sizes = ids_of(pipe, 7, 32, start_batch=1)
    assert rest == full[batch_size:] and len(sizes) == len(pipe) - 1
    assert [decode_ids(b.images)[0].tolist() for b in pipe] == [full[k:k + batch_size] for k in
                                                                range(0, len(full), batch_size)]  # a skip lasts one pass
    none, _, _ = ids_of(pipe, 7, 32, start_batch=len(pipe))
    assert none == []
    # leave an epoch after one batch (max_steps / interruption), then run the next one in full
    ids_of(pipe, 8, 48, limit=1)
    again, _, sizes = ids_of(pipe, 7, 32)
    assert again == full and sizes == [32] * len(pipe)


def check_val_sharding(pipes, n: int) -> None:
    """Val over simulated ranks: every sample exactly once, no padding, last partial batch kept."""
    world = len(pipes)
    order = stored_ids(pipes[0].root, "val")
    seen = []
    for rank, pipe in enumerate(pipes):
        ids, labels, _ = ids_of(pipe, 0)
        assert ids == [order[k] for k in range(rank, n, world)]
        assert labels == [i % 3 for i in ids]
        assert len(pipe) == math.ceil(len(range(rank, n, world)) / pipe.batch_size)
        seen += ids
    assert sorted(seen) == list(range(n))


def check_missing_data(backend: str, tmp_path: Path, ids_root: Path) -> None:
    """No converted data → DataError naming the converter; a manifest without this format's files too."""
    from pipelines.base import DataError

    with pytest.raises(DataError, match="convert_imagenet.py"):
        make(backend, tmp_path / "nowhere", "train")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "manifest.json").write_text((ids_root / "manifest.json").read_text())
    with pytest.raises(DataError, match="convert_imagenet.py") as e:
        make(backend, partial, "val")
    assert "\n" not in str(e.value)


def check_missing_backend(module: str, backend_pkg: str, monkeypatch) -> None:
    """If the backend package cannot be imported, the module import raises MissingBackendError
    (pipelines/build.py's one-line install hint), never a silent fallback."""
    import importlib

    from common.config import AugmentConfig, DataConfig
    from pipelines.build import build_train_pipeline
    from pipelines.base import MissingBackendError

    for name in [m for m in sys.modules if m == backend_pkg or m.startswith(backend_pkg + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import <pkg>[.sub]` raise ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingBackendError):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)
    data = DataConfig(pipeline=module.split(".")[-1], root=str(ROOT))
    with pytest.raises(MissingBackendError, match="install"):
        build_train_pipeline(data, AugmentConfig(), res=32, batch_size=8, rank=0, world_size=1,
                             device=torch.device("cpu"), seed=0)
