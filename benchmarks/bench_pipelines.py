"""Stage-1 throughput: reference (PIL DataLoader) vs FFCV vs DALI, and our wrappers vs bare loops.

Everything runs in one process on the same converted images (real photo crops from tests/helpers/photos.py,
ImageNet-like 500x375 / 375x500, run through tools/convert_imagenet.py once and cached):

* ``reference``  pipelines.reference.ReferencePipeline (PIL decode + timm RandomResizedCrop, flip;
                 a torch DataLoader with ``--workers`` processes), reading the source JPEG tree (quality 90);
* ``ffcv``       pipelines.ffcv.FFCVPipeline over the beton (shared-sampler traversal order), every
                 image stored as JPEG (the converter's default, ``--write-mode jpg``);
* ``ffcv-proportion``  the same over a beton written with ``--write-mode proportion
                 --compress-probability 0.5``, ffcv-imagenet's ImageNet setting: about half the
                 images stored as raw pixels, which cost no decode (~6x the disk of the all-JPEG beton here);
* ``ffcv-raw``   (only when named in ``--backends``) the same over a ``--write-mode raw`` beton: no JPEG
                 at all, every image raw pixels (~12x the disk): FFCV with no decode cost;
* ``dali``       pipelines.dali.DALIPipeline over the webdataset shards (index feed);
* ``<backend>-bilinear`` (only when named in ``--backends``) the same backend with
                 ``augment.train_interpolation = bilinear`` instead of timm's default ``random``
                 (bilinear or bicubic per image): the cost of timm's interpolation;
* ``bare-ffcv``  an ffcv ``Loader`` with the same decoder (pipelines.ffcv.PILRandomResizedCropDecoder)/flip/
                 ToTensor/ToTorchImage ops and FFCV's own RANDOM order: what our wrapper costs on top of FFCV;
* ``bare-dali``  ``fn.readers.webdataset`` (random_shuffle) -> the same ops as our graph (on CPU: the ROI
                 decode, then pipelines.pil_resize's resize + flip; on GPU: DALI's decode/resize/flip),
                 the output copied into torch the same way: what our index feed costs vs DALI's reader.

All produce uint8 ``res`` x ``res`` train crops, batch ``--batch``, ``--workers`` decode threads or
processes. Each is measured stage-1 only, and (reference/ffcv/dali) with stage 2 applied to every
batch in the consuming thread (pipelines.augment.Stage2: RandAugment rand-m7-mstd0.5-inc1, normalize,
mixup 0.1 / CutMix 1.0, the A2 recipe). Epochs are interleaved across backends, one warm-up epoch
each first (FFCV JIT-compiles on its first epoch); the figure is the median of ``--rounds`` epochs.

Usage: python -m benchmarks.bench_pipelines [--images 1024] [--batch 64] [--res 224] [--workers 2]
       [--rounds 3] [--device cpu] [--data /tmp/bench_pipelines_data] [--write results.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import AugmentConfig
from pipelines.base import Batch

ROOT = Path(__file__).resolve().parents[1]


def make_data(data: Path, images: int, workers: int, raw: bool = False) -> Path:
    """Source JPEG tree (10 classes, quality 90) + converted FFCV/DALI output, built once and reused; also a
    'proportion' beton of the same images next to it (``out_proportion``) and, if ``raw``, a raw one
    (``out_raw``)."""
    data = data / f"{images}-jpg"
    out = data / "out"
    prop = data / "out_proportion"
    convert = [sys.executable, str(ROOT / "tools" / "convert_imagenet.py"), str(data / "src")]
    if raw and not (data / "out_raw" / "manifest.json").is_file():
        make_data(data.parent, images, workers)
        subprocess.run(convert + [str(data / "out_raw"), "--formats", "ffcv", "--write-mode", "raw", "--workers",
                                  str(workers), "--quiet"], check=True)
    if (out / "manifest.json").is_file() and (prop / "manifest.json").is_file():
        return out
    from tests.helpers.photos import photo_crops

    src = data / "src"
    if not (out / "manifest.json").is_file():  # (a finished conversion means the source tree is complete)
        crops = photo_crops(images // 2, (500, 375), seed=11) + photo_crops(images - images // 2, (375, 500), seed=12)
        for i, img in enumerate(crops):
            for split in ("train", "val") if i < 16 else ("train",):
                folder = src / split / f"c{i % 10}"
                folder.mkdir(parents=True, exist_ok=True)
                # JPEG, as ImageNet's own files: the reference decodes what a timm user's loader decodes
                # (a PNG tree cost PIL 4.5 ms per image against 0.76 ms for the JPEG, and flattered every ratio).
                img.save(folder / f"{i:05d}.jpg", quality=90)
        subprocess.run(convert + [str(out), "--formats", "ffcv,dali", "--workers", str(workers), "--quiet"], check=True)
    subprocess.run(convert + [str(prop), "--formats", "ffcv", "--write-mode", "proportion", "--compress-probability",
                              "0.5", "--workers", str(workers), "--quiet"], check=True)
    return out


def bare_ffcv(root: Path, a):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    from pipelines.ffcv import PILRandomResizedCropDecoder  # the decoder our wrapper uses: same ops

    dev = [ToDevice(torch.device(a.device), non_blocking=True)] if a.device != "cpu" else []
    loader = Loader(str(root / "ffcv" / "train.beton"), batch_size=a.batch, num_workers=a.workers,
                    order=OrderOption.RANDOM, drop_last=True, seed=0, pipelines={
                        "image": [PILRandomResizedCropDecoder((a.res, a.res)), RandomHorizontalFlip(0.5),
                                  ToTensor(), *dev, ToTorchImage(channels_last=True, convert_back_int16=False)],
                        "label": [IntDecoder(), ToTensor(), Squeeze(), *dev]})

    class Bare:
        def __iter__(self):
            for images, labels in loader:
                yield Batch(images, labels)
    return Bare()


def bare_dali(root: Path, a):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from pipelines.dali import resize_crops  # our CPU graph's resize + flip: same ops

    tars = sorted((root / "dali" / "train").glob("*.tar"))
    gpu = a.device != "cpu"

    @pipeline_def
    def graph():
        jpegs, cls = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(t.with_suffix(".idx")) for t in tars],
                                           ext=["jpg", "cls"], random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        coin = fn.random.coin_flip(probability=0.5)
        if not gpu:  # the same ops as our CPU graph: decode here, PIL-filter resize + flip on the way out
            return images, cls, coin
        images = fn.resize(images, size=[a.res, a.res], interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=coin)
        return images, cls

    pipe = graph(batch_size=a.batch, num_threads=a.workers, device_id=0 if gpu else None, seed=1)
    pipe.build()
    steps = pipe.epoch_size("reader") // a.batch
    device = torch.device(a.device)

    class Bare:
        def __iter__(self):
            for _ in range(steps):
                if not gpu:
                    images, cls, coin = pipe.run()
                    yield Batch(resize_crops(images, coin, a.res, a.res, a.workers),
                                torch.zeros(a.batch, dtype=torch.int64))
                    continue
                images, cls = pipe.run()
                t = images.as_tensor()
                out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
                feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream() if gpu else None)
                yield Batch(out.permute(0, 3, 1, 2), torch.zeros(a.batch, dtype=torch.int64))
    return Bare()


def build(name: str, root: Path, a):
    kw = dict(batch_size=a.batch, res=a.res, device=torch.device(a.device), rank=0, world_size=1, seed=0,
              repeats=0, workers=a.workers, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    if name.endswith("-bilinear"):  # every crop bilinear: FFCV/DALI before augment.train_interpolation
        name, kw["interpolation"] = name[: -len("-bilinear")], "bilinear"
    if name == "reference":
        from pipelines.reference import ReferencePipeline
        return ReferencePipeline(str(root), "train", **kw)
    if name in ("ffcv", "ffcv-proportion", "ffcv-raw"):
        from pipelines.ffcv import FFCVPipeline
        return FFCVPipeline(root if name == "ffcv" else root.parent / ("out_" + name.split("-")[1]), "train", **kw)
    if name == "dali":
        from pipelines.dali import DALIPipeline
        return DALIPipeline(root, "train", **kw)
    return bare_ffcv(root, a) if name == "bare-ffcv" else bare_dali(root, a)


def run_epoch(pipe, epoch: int, stage2, sync) -> tuple[int, float]:
    if hasattr(pipe, "set_epoch"):
        pipe.set_epoch(epoch)
    n = 0
    t = time.perf_counter()
    for batch in pipe:
        if stage2 is not None:
            x, y = stage2(batch)
        n += batch.images.shape[0]
    sync()
    return n, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=Path("/tmp/bench_pipelines_data"))
    p.add_argument("--backends", default="reference,ffcv,ffcv-proportion,dali,bare-ffcv,bare-dali")
    p.add_argument("--no-stage2", action="store_true")
    p.add_argument("--write", type=Path, default=None, help="also write a markdown report here")
    a = p.parse_args()

    root = make_data(a.data, a.images, a.workers, raw="ffcv-raw" in a.backends.split(","))
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    stage2 = None
    if not a.no_stage2:
        from pipelines.augment import Stage2
        aug = AugmentConfig(rand_augment="rand-m7-mstd0.5-inc1", mixup_alpha=0.1, cutmix_alpha=1.0)
        stage2 = Stage2(aug, num_classes=10, label_smoothing=0.0, train=True, seed=0)

    names = a.backends.split(",")
    variants = [(n, None) for n in names] + ([(n, stage2) for n in names if not n.startswith("bare")]
                                              if stage2 is not None else [])
    pipes = {n: build(n, root, a) for n in names}
    for n in names:  # warm-up: JIT, worker start-up, page cache
        run_epoch(pipes[n], 0, None, sync)
    times: dict[str, list[float]] = {}
    for r in range(a.rounds):
        for n, s2 in variants:
            count, dt = run_epoch(pipes[n], r + 1, s2, sync)
            times.setdefault(n + (" + stage2" if s2 is not None else ""), []).append(count / dt)
    rate = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}

    load = os.getloadavg()
    lines = [f"# Stage-1 pipeline throughput, {a.device.upper()}", "",
             f"Command: `.venv/bin/python -m benchmarks.bench_pipelines {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.node() and 'shared container'}, {os.cpu_count()} CPU cores "
             f"({platform.processor() or platform.machine()}), "
             f"{'GPU ' + torch.cuda.get_device_name() if a.device.startswith('cuda') else 'no GPU'}; "
             f"load average after the run {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other engineers' jobs).",
             f"torch {torch.__version__}; data: {a.images} converted photo crops (500x375 and 375x500), "
             f"train {a.res}x{a.res} crops, batch {a.batch}, {a.workers} workers; median of {a.rounds} "
             f"interleaved epochs after one warm-up epoch each (min-max in brackets).", "",
             "| pipeline | images/s | vs reference |", "|---|---|---|"]
    for k, v in rate.items():
        base = rate.get("reference + stage2" if "stage2" in k else "reference")
        rel = f"{v / base:.2f}x" if base else "-"
        lines.append(f"| {k} | {v:.0f} ({spread[k][0]:.0f}-{spread[k][1]:.0f}) | {rel} |")
    for ours, bare in (("ffcv", "bare-ffcv"), ("dali", "bare-dali")):
        if ours in rate and bare in rate:
            lines.append(f"\n{ours} wrapper / bare {bare[5:]} loop: {rate[ours] / rate[bare]:.2f}")
    text = "\n".join(lines)
    print(text)
    if a.write:
        a.write.write_text(text + "\n")


if __name__ == "__main__":
    main()
