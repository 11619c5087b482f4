"""One workload of the throughput guard, run in one tree (the base's worktree or the head's).

    python benchmarks/guard_work.py WORKLOAD --data DIR --out RESULT.json [--scratch DIR]

Not a command for people: ``benchmarks/guard.py`` runs it with the tree to measure as the working
directory and first on ``PYTHONPATH``, so every ``import pipelines`` / ``engine`` / ``workflows`` below
is that tree's code, while this file is always the head's (the base may predate it). It measures
through entry points both trees have: ``python -m engine.run`` for a whole training run, the
profiler's own measurements (``workflows.profiling.measure``) for stage 1, stage 2 and the bare
step, ``engine.evaluate.evaluate`` and the converter's ``convert``. A figure an older base cannot
give is written as ``null``.

Workloads (``DATA`` is prepared by the guard: ``demo/`` a Fashion-MNIST subset as the demo writes it,
converted; ``photos/`` ImageNet-like photo crops as benchmarks/bench_pipelines.py makes them, converted):

* ``e2e-<backend>``: ``recipes/demo.toml`` for 2 epochs at 32 px (progressive resolution off),
  batch 256, 2 workers, on the demo subset; the figures are the second epoch's training images/s as
  the run logged it (``epoch_images_per_s``: the first epoch carries start-up and FFCV's compile;
  with ``--e2e-epochs N`` the run has N epochs and the figure is the mean of epochs 2..N's, steadier
  where one 3-second epoch swings by 20%) and the second epoch's evaluation's images/s (the demo
  subset's 1,000 val images over the time between that epoch's last train record and its eval
  record, as the run's own clock wrote them).
* ``parts``: in one process, each backend's stage 1 alone on the photos at 224 px (batch 64), the
  libraries' own stock pipelines on the same files (FFCV's ``Loader`` with its
  ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip``; DALI's
  ``fn.decoders.image_random_crop`` + ``fn.resize`` + ``fn.flip``), stage 2 alone on a 224-px batch of
  64 (the A2 recipe's RandAugment and mixup/CutMix) and the demo's bare step (batch 256 at 32 px).
* ``convert``: the converter (FFCV + DALI, 2 worker processes) over the photo source tree, 3 times.
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

BACKENDS = ("reference", "ffcv", "dali")
DEMO_SETS = ["train.epochs=2", "train.progressive.kind=none", "train.train_res=32", "train.global_batch_size=256",
             "data.workers=2", "checkpoint.every_minutes=0", "log.progress=false", "log.wandb=off",
             "train.precision=fp32", "eval.batch_size=500"]
PHOTO_BATCH, PHOTO_RES, WORKERS = 64, 224, 2
STAGE1_EPOCHS = 3  # timed epochs of the photo set per stage-1 figure, after one warm-up epoch
CONVERT_PASSES = 3  # conversions of the photo set (each from scratch, worker start-up included)


def e2e(backend: str, data: Path, scratch: Path, epochs: int = 2) -> dict:
    import subprocess

    out = scratch / f"e2e-{backend}"
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"data.root={data / 'demo' / 'converted'}", f"data.pipeline={backend}", *DEMO_SETS,
            f"train.epochs={epochs}"]
    cmd = [sys.executable, "-m", "engine.run", "recipes/demo.toml", "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"e2e {backend}: the engine failed: {proc.stderr.strip().splitlines()[-1:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    per_epoch = [[r for r in records if r.get("epoch") == e and "epoch_images_per_s" in r][-1]
                 for e in range(1, epochs)]
    second = per_epoch[0]
    # the second epoch's evaluation, from the records' own clock: its record is written when it ends,
    # right after the epoch's last train record (the first evaluation also starts workers and compiles)
    evaluated = next(r for r in records if r.get("epoch") == 1 and "val_top1" in r)
    return {f"e2e training, {backend}": statistics.fmean(r["epoch_images_per_s"] for r in per_epoch),
            f"evaluation, {backend}": evaluated["val_images"] / (evaluated["time"] - second["time"])}


def _photo_cfg(backend: str, data: Path):
    from common.config import load_config

    return load_config("recipes/a2.toml", [f"data.root={data / 'photos' / 'converted'}", f"data.pipeline={backend}",
                                           f"data.workers={WORKERS}", "data.num_classes=10"])


def _epochs_per_s(make_batches, epochs: int) -> float:
    """Images/s of ``epochs`` passes over ``make_batches(epoch)`` after a warm-up pass (FFCV's
    compile, worker start-up, the page cache)."""
    for _ in make_batches(0):
        pass
    images, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for batch in make_batches(epoch):
            images += batch[0].shape[0] if isinstance(batch, tuple) else batch.images.shape[0]
    return images / (time.perf_counter() - start)


def stage1(backend: str, data: Path) -> float:
    import torch

    from pipelines.build import build_train_pipeline

    cfg = _photo_cfg(backend, data)
    pipe = build_train_pipeline(cfg.data, cfg.augment, res=PHOTO_RES, batch_size=PHOTO_BATCH, rank=0, world_size=1,
                                device=torch.device("cpu"), seed=0)

    def batches(epoch):
        pipe.set_epoch(epoch, PHOTO_RES)
        return iter(pipe)

    try:
        return _epochs_per_s(batches, STAGE1_EPOCHS)
    finally:
        del pipe, batches
        gc.collect()  # its threads and worker processes end before the next figure is taken


def stock_ffcv(data: Path) -> float:
    """FFCV as its README and ffcv-imagenet build a train loader: its own decoder (crop sampler and
    OpenCV resize), its flip, its random order."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    loader = Loader(str(data / "photos" / "converted" / "ffcv" / "train.beton"), batch_size=PHOTO_BATCH,
                    num_workers=WORKERS, order=OrderOption.RANDOM, drop_last=True, seed=0, pipelines={
                        "image": [RandomResizedCropRGBImageDecoder((PHOTO_RES, PHOTO_RES)), RandomHorizontalFlip(),
                                  ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False)],
                        "label": [IntDecoder(), ToTensor(), Squeeze()]})
    return _epochs_per_s(lambda epoch: iter(loader), STAGE1_EPOCHS)


def stock_dali(data: Path) -> float:
    """DALI as its examples build a train pipeline: the webdataset reader, ``image_random_crop``
    (decode + random crop), ``resize`` (its own linear filter with antialiasing), ``flip``; on CPU."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    tars = sorted((data / "photos" / "converted" / "dali" / "train").glob("*.tar"))

    @pipeline_def
    def graph():
        jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars],
                                              index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                              ext=["jpg", "cls"], random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, size=[PHOTO_RES, PHOTO_RES], interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        return images, labels

    pipe = graph(batch_size=PHOTO_BATCH, num_threads=WORKERS, device_id=None, seed=1)
    pipe.build()
    steps = pipe.epoch_size("reader") // PHOTO_BATCH

    def batches(epoch):
        for _ in range(steps):
            images, _ = pipe.run()
            yield (images.as_array(),)

    return _epochs_per_s(batches, STAGE1_EPOCHS)


def stage2_alone(data: Path) -> float:
    """Stage 2 on one decoded 224-px batch of 64 (new draws each call), as the profiler times it."""
    import torch

    from workflows.profiling import measure

    cfg = _photo_cfg("reference", data)
    row = measure.measure_stage2(cfg, PHOTO_BATCH, PHOTO_RES, steps=20, warmup=3, device=torch.device("cpu"))
    return row["images_per_s"]


def _demo_cfg(backend: str, data: Path):
    from common.config import load_config

    return load_config("recipes/demo.toml", [f"data.root={data / 'demo' / 'converted'}", f"data.pipeline={backend}",
                                             *DEMO_SETS])


def bare_step(data: Path) -> float:
    import torch

    from workflows.profiling import measure

    cfg = _demo_cfg("reference", data)
    row = measure.measure_step(cfg, 256, 32, steps=30, warmup=5, device=torch.device("cpu"), synthetic=True)
    return row["images_per_s"]


def parts(data: Path) -> dict:
    figures = {}
    for backend in BACKENDS:
        figures[f"stage 1 at {PHOTO_RES} px, {backend}"] = stage1(backend, data)
    figures[f"stock FFCV Loader at {PHOTO_RES} px"] = stock_ffcv(data)
    figures[f"stock DALI pipeline at {PHOTO_RES} px"] = stock_dali(data)
    figures[f"stage 2 at {PHOTO_RES} px, batch {PHOTO_BATCH}"] = stage2_alone(data)
    figures["bare step, batch 256 at 32 px"] = bare_step(data)
    return figures


def convert_photos(data: Path, scratch: Path) -> dict:
    from pipelines.convert.convert import Settings, convert

    out = scratch / "convert"
    shutil.rmtree(out, ignore_errors=True)
    src = data / "photos" / "src"
    count = sum(1 for p in src.rglob("*.jpg"))
    start = time.perf_counter()
    for _ in range(CONVERT_PASSES):  # one pass is under a second here: too short to time alone
        shutil.rmtree(out, ignore_errors=True)
        convert(src, out, Settings(formats=("ffcv", "dali")), WORKERS, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"converter (FFCV + DALI)": CONVERT_PASSES * count / seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workload", help="e2e-reference, e2e-ffcv, e2e-dali, parts or convert")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/rsb-guard-scratch"))
    p.add_argument("--e2e-epochs", type=int, default=2, help="epochs of an e2e run (the first is not measured)")
    a = p.parse_args(argv)
    a.scratch.mkdir(parents=True, exist_ok=True)
    if a.workload.startswith("e2e-"):
        figures = e2e(a.workload[4:], a.data, a.scratch, a.e2e_epochs)
    elif a.workload == "parts":
        figures = parts(a.data)
    elif a.workload == "convert":
        figures = convert_photos(a.data, a.scratch)
    else:
        p.error(f"unknown workload {a.workload}")
    a.out.write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
