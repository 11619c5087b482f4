"""Stage 1 on NVIDIA DALI over the converter's webdataset shards (``dali/{train,val}/*.tar`` + ``.idx``).

Design choice — index feed, not ``fn.readers.webdataset``: the reader shards by contiguous file
ranges and shuffles inside a bounded buffer, and it has no notion of repeated augmentation, so it
cannot produce the shared sampler's order (pipelines/sampler.py: timm ``RepeatAugSampler`` /
``DistributedSampler`` semantics) nor an exact per-rank epoch length (its ``pad_last_batch`` /
``stick_to_shard`` modes pad with duplicates or drift shards between epochs). Instead
:class:`ShardStore` memory-maps every tar once, takes each sample's JPEG offset/size from the
``.idx`` file (DALI's own v1.2 index format, written by ``wds2idx``), and a batch-mode
``fn.external_source`` hands DALI zero-copy views of the JPEG bytes for exactly the indices the
sampler chose. Per batch that is a few microseconds of Python per image; decoding and resizing
run on DALI's thread pool (CPU) or nvJPEG + the GPU (``device="mixed"``).

Graph (DALI docs: ``fn.decoders.image_random_crop``, ``fn.resize``, ``fn.flip``, ``fn.external_source``):
train: ``image_random_crop`` (ROI decode of a random-resized-crop box; ``random_area`` = timm
``scale``, ``random_aspect_ratio`` = ``ratio``, 10 attempts) → ``resize`` to the epoch's
``res``×``res`` (antialiased; bilinear or bicubic per image by a coin: timm's ``random`` train
interpolation, or ``augment.train_interpolation``'s fixed one) → ``flip`` (coin with ``hflip``) →
uint8 HWC. On CPU the graph ends after the decode (and the coins): ``pipelines/pil_resize.py``
resizes the crops with PIL's own filters (the reference pipeline's) and flips them while copying
them out: ~0.13 ms per image (bilinear) against ~1.3 ms for DALI's CPU ``resize`` + ``flip``
(benchmarks/results/pipelines_cpu.md).
val: ``decoders.image`` → ``resize`` shorter side to ``floor(res / crop_pct)`` (antialiased,
``eval.interpolation``: bicubic by default; timm's eval transform) → centre ``crop`` ``res``×``res``.
On a GPU the decoder is ``device="mixed"`` (nvJPEG; ``hw_decoder_load`` offloads part of the work
to the A100/H100 hardware JPEG decoder) and resize/flip/crop run on the GPU; without one,
everything runs on CPU with ``device_id=None``.

Progressive resolution: the output size is an *argument input* fed per iteration by the same
external source, so ``set_epoch(epoch, res)`` needs no new graph. Epoch boundaries: while a train
epoch runs, the feed already holds the next epoch's order (the sampler's order is a pure function
of seed and epoch) and rolls on into it, so DALI's prefetch queue stays full across the boundary.
When ``set_epoch`` then asks for exactly that epoch from its start at the same resolution,
iteration simply continues. Anything else (a new resolution, a resume offset, an epoch left
early) rebuilds the train pipeline from DALI's checkpoint of the batches handed out
(``enable_checkpointing``; DALI docs, "Checkpointing"): the crops and flips DALI drew for batches
it prefetched and nobody used are forgotten, exactly as after a resume, whose checkpoint carries
the same state (``random_state``). So a resumed run draws the very crops an uninterrupted one
does. The val pipeline has no random operator: it drains the feed and ``reset()``s.

Batches are copied out of DALI's buffers into fresh torch tensors (NHWC memory viewed as NCHW,
i.e. channels_last), so a yielded batch is never overwritten by later iterations.
"""
from __future__ import annotations

import collections
import math
import mmap
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipelines.base import Batch, DataError, MissingBackendError

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError as e:  # pipelines/build.py turns this into the one-line "what to install" message
    raise MissingBackendError(f"DALI is not importable ({e}): pip install -e '.[dali]' (nvidia-dali-cuda130), "
                              "or set data.pipeline=reference") from None

from pipelines import pil_resize
from pipelines._stage1_common import (EpochPlan, check_eval_interpolation, check_interpolation, convert_hint, read_split,
                                      resolve_device)


def _parse_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """DALI webdataset index → per sample ``{ext: (data_offset, size)}``. v1.2 lines hold
    ``ext offset size name`` groups; the older v1.1 ``ext offset size`` groups are accepted too."""
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise DataError(f"{path}: not a DALI webdataset index (header {lines[:1]}); re-run the converter")
    step = 4 if head[0] >= "v1.2" else 3
    samples = []
    for line in lines[1:]:
        f = line.split()
        if not f:
            continue
        samples.append({f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f) - step + 1, step)})
    if len(samples) != int(head[1]):
        raise DataError(f"{path}: header says {head[1]} samples, found {len(samples)}; re-run the converter")
    return samples


class ShardStore:
    """Random access by global sample index (manifest order = shards in order, samples in tar order)
    to the JPEG bytes and labels in a split's webdataset shards, through one ``mmap`` per tar."""

    def __init__(self, root: Path, split: str, entry: dict):
        folder = root / "dali" / split
        names = entry.get("shards")
        if names:
            tars = [self._resolve(root, folder, s) for s in names]
        else:
            tars = sorted(folder.glob("*.tar"))
        if not tars:
            raise DataError(f"no DALI shards in {folder}; " + convert_hint(root, "dali"))
        self.maps, shard, offset, size, labels = [], [], [], [], []
        for k, tar in enumerate(tars):
            idx = tar.with_suffix(".idx")
            for p in (tar, idx):
                if not p.is_file():
                    raise DataError(f"{p} not found; " + convert_hint(root, "dali"))
            with open(tar, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.maps.append(mm)
            for comp in _parse_index(idx):
                jpg = comp.get("jpg") or comp.get("jpeg")
                cls = comp.get("cls")
                if jpg is None or cls is None:
                    raise DataError(f"{idx}: a sample lacks .jpg or .cls ({sorted(comp)}); re-run the converter")
                shard.append(k)
                offset.append(jpg[0])
                size.append(jpg[1])
                labels.append(int(mm[cls[0]:cls[0] + cls[1]]))
        self.shard = np.asarray(shard, np.int32)
        self.offset = np.asarray(offset, np.int64)
        self.size = np.asarray(size, np.int64)
        self.labels = np.asarray(labels, np.int64)
        self._buffers = [np.frombuffer(mm, np.uint8) for mm in self.maps]

    @staticmethod
    def _resolve(root: Path, folder: Path, shard) -> Path:
        """A manifest shard entry (``{"path": ...}`` relative to the data root, or a bare name)."""
        p = Path(shard["path"] if isinstance(shard, dict) else shard)
        if p.is_absolute():
            return p
        return root / p if (root / p).is_file() else folder / p.name

    def __len__(self) -> int:
        return len(self.labels)

    def jpegs(self, indices: np.ndarray) -> list[np.ndarray]:
        """Zero-copy views of the encoded images (DALI copies them into its own input buffer)."""
        bufs, sh, off, sz = self._buffers, self.shard, self.offset, self.size
        return [bufs[sh[i]][off[i]:off[i] + sz[i]] for i in indices.tolist()]


class _Feed:
    """The batch-mode external source: each call returns the next batch of indices as (jpegs,
    labels, output sizes). At the end of the current order it rolls on into the queued next
    epoch's order when there is one (so DALI's prefetch never drains at an epoch boundary), else
    it raises ``StopIteration``."""

    def __init__(self, store: ShardStore, batch_size: int, with_size: bool):
        self.store, self.batch_size, self.with_size = store, batch_size, with_size
        self.order = np.zeros(0, np.int64)
        self.pos, self.stop, self.size = 0, False, np.zeros(2, np.float32)
        self.key: tuple[int, int] | None = None  # (epoch, res) of the order being fed
        self.queued: tuple[tuple[int, int], np.ndarray] | None = None
        self.rolled = False
        self.alive = collections.deque(maxlen=16)  # > prefetch depth + batches in flight

    def start(self, order: np.ndarray, res: int, key: tuple[int, int] | None = None) -> None:
        self.order, self.pos, self.stop, self.key, self.queued = order, 0, False, key, None
        self.rolled = False  # True once the feed has moved on into a queued order
        self.size = np.array([res, res], np.float32)

    def queue(self, key: tuple[int, int], order: np.ndarray) -> None:
        """Feed ``order`` (epoch ``key[0]`` at resolution ``key[1]``) right after the current one."""
        self.queued = (key, order)

    def holds(self, key: tuple[int, int]) -> bool:
        """True when the batches fed since the current order began are exactly the first batches
        of epoch ``key``: the pipeline may go on without a reset."""
        if self.queued is not None:
            return self.queued[0] == key  # queued, nothing of it fed yet
        return self.rolled and self.key == key

    def __call__(self, info=None):
        if not self.stop and self.pos >= len(self.order) and self.queued is not None:
            (self.key, self.order), self.pos, self.queued, self.rolled = self.queued, 0, None, True
            self.size = np.array([self.key[1], self.key[1]], np.float32)
        if self.stop or self.pos >= len(self.order):
            raise StopIteration
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += len(idx)
        # jpegs: a list (ragged); labels [N] and sizes [N, 2]: arrays, one row per sample.
        out = (self.store.jpegs(idx), self.store.labels[idx])
        out = out + (np.tile(self.size, (len(idx), 1)),) if self.with_size else out
        self.alive.append(out)  # no_copy: keep the arrays referenced until DALI has surely used them
        return out


class DALIPipeline:
    """DALI stage 1 for ``split`` in {"train", "val"}; keywords as pipelines/build.py passes them."""

    def __init__(self, root, split: str, *, batch_size: int, res: int, device="cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, repeats: int = 0, workers: int = 8,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "random",
                 crop_pct: float = 0.875, eval_interpolation: str = "bicubic", hw_decoder_load: float = 0.65,
                 prefetch: int = 2, max_images: int = 0):
        check_interpolation(interpolation)
        info = read_split(root, split, "dali")
        self.root, self.split, self.train = Path(root), split, split == "train"
        self.num_classes, self.num_samples, self.classes = info.num_classes, info.num_samples, info.classes
        self.store = ShardStore(self.root, split, info.entry)
        if len(self.store) != self.num_samples:
            raise DataError(f"DALI shards under {self.root / 'dali' / split} hold {len(self.store)} images but "
                            f"manifest.json says {self.num_samples}; re-run the converter")
        self.batch_size, self.res, self.device = batch_size, res, resolve_device(device)
        self.crop_pct, self.workers = crop_pct, max(1, workers)
        self.plan = EpochPlan(self.num_samples, train=self.train, batch_size=batch_size, rank=rank,
                              world_size=world_size, seed=seed, repeats=repeats, max_images=max_images)
        self.feed = _Feed(self.store, batch_size, with_size=self.train)
        gpu = self.device.type == "cuda"
        build = _train_graph if self.train else _val_graph
        opts = (dict(scale=list(scale), ratio=list(ratio), hflip=hflip, interpolation=interpolation,
                     resize_in_dali=gpu or not pil_resize.AVAILABLE)
                if self.train else dict(res=res, crop_pct=crop_pct, cubic=check_eval_interpolation(eval_interpolation)))
        # Distinct random streams per rank: repeated copies of an image on different ranks must get
        # different crops (the point of repeated augmentation). Train graphs keep DALI's checkpoint
        # of their random operators (crop boxes, flip coins), so a resume continues the very stream.
        self._build = lambda checkpoint=None: build(
            self.feed, gpu=gpu, hw_decoder_load=hw_decoder_load, **opts, batch_size=batch_size,
            num_threads=max(1, workers), device_id=self.device.index if gpu else None,
            seed=(seed * 1_000_003 + rank * 7919 + 1) % (2**31 - 1), prefetch_queue_depth=prefetch,
            enable_checkpointing=self.checkpointing, checkpoint=checkpoint)
        self.checkpointing = self.train
        self.pipe = self._build()
        self.pipe.build()
        if self.checkpointing:
            self._probe_checkpointing()
        self._fresh = True  # no run() since build/reset: no reset needed before the next epoch
        self._rolling = False  # the last epoch was read to its end and the feed rolled on into the next

    def _probe_checkpointing(self) -> None:
        """Every operator of this graph must save its state (the CPU graph's do, tested here; the
        GPU decoder's could not be tried without a GPU). If one cannot, train without DALI's
        checkpoints rather than fail: one warning, and a resume then draws fresh crops."""
        try:
            self.pipe.checkpoint()
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(f"DALI cannot checkpoint this train graph ({first[:200]}); training goes on, but a "
                          "resume will not reproduce the crops an uninterrupted run draws", RuntimeWarning,
                          stacklevel=3)
            self.checkpointing = False
            self._rebuild(None)

    def random_state(self) -> bytes | None:
        """DALI's checkpoint of the random operators after the batches handed out so far (DALI
        keeps one per iteration, so batches it prefetched beyond those do not count)."""
        return self.pipe.checkpoint() if self.checkpointing else None

    def load_random_state(self, state: bytes) -> None:
        """Rebuild the train graph from a :meth:`random_state` (DALI restores a checkpoint only
        into a new pipeline)."""
        if self.checkpointing:
            self._rebuild(state)

    def _rebuild(self, checkpoint: bytes | None) -> None:
        self.pipe = None  # the old pipeline (threads, buffers) goes before the new one is built
        self.pipe = self._build(checkpoint)
        self.pipe.build()
        self._fresh, self._rolling = True, False

    def set_epoch(self, epoch: int, res: int | None = None, start_batch: int = 0) -> None:
        """Reseed the order for ``epoch``, skip ``start_batch`` batches (indices only, nothing is
        decoded) and set the train output resolution for this epoch (val keeps its eval size)."""
        self.plan.set_epoch(epoch, start_batch)
        if res is not None and self.train:
            self.res = res

    def __len__(self) -> int:
        return len(self.plan)

    def _restart(self) -> None:
        if self._fresh:
            return
        if self.checkpointing:
            # A previous epoch was left early (max_steps, interruption) or the next one differs
            # from what was queued (a new resolution, a resume offset). The batches DALI prefetched
            # drew crops and flips that nobody used: rebuild from the checkpoint of the batches
            # handed out, so the random streams depend on those alone, exactly as after a resume.
            self._rebuild(self.random_state())
            return
        # Val (or a graph DALI cannot checkpoint): let DALI finish the few batches it already
        # prefetched, without feeding it more, then rewind.
        self.feed.stop = True
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass
        self.pipe.reset()
        self._fresh = True

    def __iter__(self) -> Iterator[Batch]:
        whole = self.plan.start_batch == 0
        order = self.plan.take()
        if len(order) == 0:
            return
        key = (self.plan.epoch, self.res)
        batches = math.ceil(len(order) / self.batch_size)
        if not (self._rolling and whole and self.feed.holds(key)):
            self._restart()
            self.feed.start(order, self.res, key)
        self._fresh, self._rolling = False, False
        if self.train:
            # Train epochs are whole batches, so the next epoch can follow in the same stream. If
            # set_epoch then asks for something else (a new resolution, a resume offset), __iter__
            # resets the pipeline as it would without this.
            nxt = (self.plan.epoch + 1, self.res)
            self.feed.queue(nxt, self.plan.order_for(nxt[0]))
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for i in range(batches):
            outputs = self.pipe.run()
            # Set before the last yield: a consumer that stops after exactly `batches` batches has
            # finished the epoch even if it never resumes this generator.
            self._rolling = self.train and i == batches - 1
            if len(outputs) == 5:  # CPU train graph: crops still to be resized and flipped
                images, labels, size, flips, cubic = outputs
                yield Batch(self._resized(images, size, flips, cubic), self._labels(labels))
            else:
                images, labels = outputs
                yield Batch(self._images(images, stream), self._labels(labels))

    def _resized(self, crops, size, flips, cubic) -> torch.Tensor:
        """The CPU train crops resized to the batch's own size (fed with its indices, so a batch
        DALI prefetched before a resolution change keeps its size)."""
        h, w = (int(v) for v in np.array(size.at(0)).reshape(-1)[:2])
        return resize_crops(crops, flips, h, w, self.workers, cubic)

    def _images(self, tl, stream) -> torch.Tensor:
        t = tl.as_tensor()  # uniform [N, H, W, 3] uint8
        out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(t, out, cuda_stream=stream)
        return out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last

    def _labels(self, tl) -> torch.Tensor:
        labels = torch.from_numpy(np.array(tl.as_tensor(), dtype=np.int64).reshape(-1))
        if self.device.type == "cuda":
            return labels.pin_memory().to(self.device, non_blocking=True)
        return labels


def resize_crops(crops, flips, h: int, w: int, threads: int, cubic=None) -> torch.Tensor:
    """DALI CPU outputs (a TensorList of HWC uint8 crops, TensorLists of flip and bicubic coins) -> a
    fresh [N, 3, h, w] uint8 batch (NHWC memory: channels_last), resized with PIL's bicubic filter
    where the coin says (else bilinear) and mirrored where the flip coin says."""
    out = torch.empty((len(crops), h, w, 3), dtype=torch.uint8)
    flip = np.array(flips.as_tensor()).reshape(-1).astype(bool)
    cubics = None if cubic is None else np.array(cubic.as_tensor()).reshape(-1).astype(bool)
    pil_resize.resize_batch([np.asarray(crops[j]) for j in range(len(crops))], flip, out.numpy(), threads=threads,
                            cubic=cubics)
    return out.permute(0, 3, 1, 2)


def _source(feed):
    """``no_copy``: the JPEG views point into read-only mmaps that live as long as the pipeline, and
    label/size arrays are fresh per batch, so DALI may use them in place (DALI docs, external_source)."""
    if feed.with_size:
        return fn.external_source(source=feed, num_outputs=3, batch=True, no_copy=True,
                                  dtype=[types.UINT8, types.INT64, types.FLOAT])
    return fn.external_source(source=feed, num_outputs=2, batch=True, no_copy=True, dtype=[types.UINT8, types.INT64])


@pipeline_def(enable_conditionals=False)
def _train_graph(feed, *, gpu: bool, hw_decoder_load: float, scale, ratio, hflip: float, interpolation: str,
                 resize_in_dali: bool = True):
    """GPU: decode, resize and flip in DALI. CPU (``resize_in_dali=False``): DALI decodes the crops
    and draws the flips and the bicubic coins; the wrapper resizes and flips them (``pil_resize``;
    DALI's CPU resize cost twice the decode, ours a quarter of it). Every coin is a DALI random
    operator, so DALI's checkpoint restores it on resume. ``interpolation``: timm's train
    interpolation, ``random`` = bilinear or bicubic with probability 1/2 per image."""
    jpegs, labels, size = _source(feed)
    kw = dict(hw_decoder_load=hw_decoder_load) if gpu else {}
    images = fn.decoders.image_random_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                           random_area=scale, random_aspect_ratio=ratio, num_attempts=10, **kw)
    cubic = fn.random.coin_flip(probability={"bilinear": 0.0, "bicubic": 1.0, "random": 0.5}[interpolation],
                                dtype=types.INT32)
    if not resize_in_dali:
        return images, labels, size, fn.random.coin_flip(probability=hflip), cubic
    # INTERP_LINEAR = 1, INTERP_CUBIC = 2: a per-sample interpolation type (an argument input)
    interp = fn.cast(cubic + int(types.INTERP_LINEAR), dtype=types.INTERP_TYPE)
    images = fn.resize(images, size=size, interp_type=interp, antialias=True)
    if hflip > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=hflip))
    return images, labels


def _timm_eval_geometry(jpegs, res: int, crop_pct: float):
    """Per-sample resize size and crop position that reproduce timm's eval transform exactly:
    ``Resize(S = floor(res / crop_pct))`` sets the shorter side to S and the longer to
    ``int(S * long / short)`` (torchvision truncates), then ``CenterCrop(res)`` starts at
    ``int(round((side - res) / 2))`` with Python's round-half-to-even. DALI's ``resize_shorter``
    and ``crop_pos=0.5`` round differently (one pixel off for odd margins, a visible shift), so
    the integers are computed here from the JPEG header (``peek_image_shape``), in float64."""
    s = float(math.floor(res / crop_pct))
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT64)  # [H, W, C]
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    out_h, out_w = dmath.floor(s * h / short), dmath.floor(s * w / short)

    def pos(side):
        margin = side - res
        k = dmath.floor(margin / 2)
        k += (margin - 2 * k) * (k - 2 * dmath.floor(k / 2))  # odd margin: the even neighbour
        # DALI's anchor is crop_pos * margin; a quarter pixel keeps it on k whether it rounds or floors.
        return (k + 0.25) / dmath.max(margin, 1.0)

    return out_h, out_w, pos(out_h), pos(out_w)


@pipeline_def(enable_conditionals=False)
def _val_graph(feed, *, gpu: bool, hw_decoder_load: float, res: int, crop_pct: float, cubic: bool = True):
    jpegs, labels = _source(feed)
    out_h, out_w, pos_y, pos_x = _timm_eval_geometry(jpegs, res, crop_pct)
    kw = dict(hw_decoder_load=hw_decoder_load) if gpu else {}
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **kw)
    images = fn.resize(images, resize_x=fn.cast(out_w, dtype=types.FLOAT), resize_y=fn.cast(out_h, dtype=types.FLOAT),
                       interp_type=types.INTERP_CUBIC if cubic else types.INTERP_LINEAR, antialias=True)
    images = fn.crop(images, crop=(res, res), crop_pos_x=fn.cast(pos_x, dtype=types.FLOAT),
                     crop_pos_y=fn.cast(pos_y, dtype=types.FLOAT))
    return images, labels
