"""Stage-2 throughput: batched RandAugment + normalize + mixup/CutMix vs timm's per-image transforms.

Both run in the same process on the same 64 real photo crops (tests/helpers/photos.py) at 224x224:

* timm:    ``rand_augment_transform`` (PIL, per image) -> ``ToTensor`` -> ``Normalize`` per image,
           ``torch.stack``, then ``timm.data.Mixup`` on the batch (what timm's train loop does
           without its CUDA prefetcher);
* batched: ``pipelines.augment.Stage2`` on the uint8 channels_last batch.

Also timed in the same loop: Stage2 allocating a fresh output every call (no buffer recycling),
Stage2 on its torch backend (the code CUDA runs), Stage2 with a bf16 output (what AMP runs can
take) and a floor, allocating and writing a float32 batch once.

Usage: python -m benchmarks.bench_augment [--batch 64] [--res 224] [--iters 5] [--threads 2]
       [--rand rand-m7-mstd0.5-inc1] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from common.config import AugmentConfig
from pipelines.augment import Stage2
from pipelines.base import Batch
from tests.helpers.photos import photo_crops


def timed(fn, iters: int, sync=lambda: None) -> list[float]:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def _once(fn, sync=lambda: None) -> float:
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rand", default="rand-m7-mstd0.5-inc1")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import torchvision.transforms as T
    from timm.data import Mixup
    from timm.data.auto_augment import rand_augment_transform

    imgs = photo_crops(args.batch, (args.res, args.res), seed=0)
    labels = torch.randint(0, 1000, (args.batch,))
    aug = AugmentConfig(rand_augment=args.rand, mixup_alpha=0.2, cutmix_alpha=1.0)  # A1 settings

    hparams = dict(translate_const=int(args.res * 0.45), img_mean=(124, 116, 104))
    per_image = T.Compose([rand_augment_transform(args.rand, hparams), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    mixer = Mixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha, label_smoothing=0.1, num_classes=1000)

    def timm_step():
        x = torch.stack([per_image(im) for im in imgs])
        return mixer(x, labels)

    dev = torch.device(args.device)
    x8 = torch.from_numpy(np.stack([np.array(im) for im in imgs])).permute(0, 3, 1, 2).to(dev)
    batch = Batch(x8, labels.to(dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # What the engine runs: the default backend ('auto': compiled loops on CPU, torch on CUDA) and
    # recycled output buffers (the loop drops each batch before asking for the next).
    variants = {"stage2": Stage2(aug, 1000, 0.1, train=True, seed=0)}
    fresh = Stage2(aug, 1000, 0.1, train=True, seed=0)
    fresh.pool = None  # a newly allocated output batch every call
    variants["fresh"] = fresh
    if dev.type == "cpu":  # the torch code (CUDA's path) on this CPU, for comparison
        variants["torch"] = Stage2(aug, 1000, 0.1, train=True, seed=0, backend="torch")
    variants["bf16"] = Stage2(aug, 1000, 0.1, train=True, seed=0, out_dtype=torch.bfloat16)
    floor = lambda: torch.empty(x8.shape, device=dev, memory_format=torch.channels_last).fill_(0)  # noqa: E731

    # Interleaved, so that load from other processes on a shared machine hits all alike.
    # "floor": allocating the float32 output batch and writing it once (fill), what any stage 2
    # that returns a fresh float32 batch must spend; on CPU mostly first-touch page faults.
    timm_step()
    for v in variants.values():
        v(batch)
    t_timm, t_floor = [], []
    t = {k: [] for k in variants}
    for _ in range(args.iters):
        t_timm.append(_once(timm_step))
        for k, v in variants.items():
            t[k].append(_once(lambda: v(batch), sync))
        t_floor.append(_once(floor, sync))
    # Each part of the default path alone, to show where the time goes.
    from pipelines.augment import draw_mix_params, normalize, rand_augment_batch
    g = torch.Generator().manual_seed(0)
    xa = rand_augment_batch(x8, variants["stage2"].policy, g)
    params = draw_mix_params(xa.shape, aug, g)
    pool = variants["stage2"].pool
    parts = {
        "RandAugment": timed(lambda: rand_augment_batch(x8, variants["stage2"].policy, g), args.iters, sync),
        "normalize + mixup/CutMix": timed(lambda: normalize(xa, mix=params, pool=pool), args.iters, sync),
    }

    med = {k: statistics.median(v) for k, v in t.items()}
    med_t, med_f = statistics.median(t_timm), statistics.median(t_floor)
    labels_ = {"stage2": "batched Stage2, as the engine runs it (float32 out, recycled buffers)",
               "fresh": "batched Stage2, a fresh output batch every call",
               "torch": "batched Stage2, torch backend (CUDA's code) on this CPU",
               "bf16": "batched Stage2, bf16 output (for AMP runs)"}
    print(f"stage 2, batch {args.batch}x3x{args.res}x{args.res}, '{args.rand}', mixup 0.2 / CutMix 1.0, "
          f"device {args.device}, torch threads {args.threads}, {args.iters} iters (median)")
    print(f"  {'timm per-image (PIL RandAugment + ToTensor + Normalize, then Mixup)':74s}"
          f"{med_t * 1e3:8.1f} ms/batch {args.batch / med_t:7.0f} img/s")
    for k, m in med.items():
        print(f"  {labels_[k]:74s}{m * 1e3:8.1f} ms/batch {args.batch / m:7.0f} img/s  {med_t / m:5.2f}x")
        if k == "stage2":
            for name, tt in parts.items():
                print(f"      {name:26s} {statistics.median(tt) * 1e3:8.1f} ms")
    print(f"  {'floor: allocate + write a float32 output batch once':74s}{med_f * 1e3:8.1f} ms/batch")
    print(f"  speed-up (goal >= 5x): {med_t / med['stage2']:.2f}x; with a fresh output batch: "
          f"{med_t / med['fresh']:.2f}x")
    # The fastest iteration of each is the one least disturbed by other jobs on a shared machine.
    print(f"  speed-up, fastest iteration of each: {min(t_timm) / min(t['stage2']):.2f}x "
          f"(timm {min(t_timm) * 1e3:.1f} ms, ours {min(t['stage2']) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
