"""Stage 1 on FFCV: a ``Loader`` over the converter's ``ffcv/{train,val}.beton``.

Why FFCV: its decoders JIT-compile (numba) the whole read → JPEG decode → crop → resize → flip
chain and run it on a thread pool with no Python per image, which is what makes the
ffcv-imagenet ResNet-50 schedules fast (Leclerc et al. 2023, "FFCV: Accelerating Training by
Removing Data Bottlenecks"; docs: https://docs.ffcv.io).

Per batch (train), all inside FFCV:
:class:`PILRandomResizedCropDecoder` (decode + timm/torchvision random-resized-crop box sampling
with ``scale``/``ratio``, 10 attempts then the centre fallback; the crop resized with PIL's
filters, not FFCV's OpenCV INTER_AREA: timm's ``random`` interpolation, bilinear or bicubic per
image; the horizontal flip in the same pass) → ``ToTensor`` → ``ToDevice`` (``non_blocking=True``,
CUDA only) →
``ToTorchImage(channels_last=True)``: an NHWC uint8 buffer viewed as NCHW, the layout stage 2 expects.
Val: :class:`TimmEvalDecoder` — decode, then PIL's bicubic resize of the source box that timm's
eval transform (resize the shorter side to ``floor(res / crop_pct)``, centre-crop ``res``) shows:
the two steps fused into one resize with the same filter taps; tests/test_pipeline_parity.py
bounds the difference to the reference pipeline.

Order: FFCV accepts a custom ``TraversalOrder``; :class:`SamplerOrder` returns the shared sampler's
indices (pipelines/sampler.py: DDP sharding + repeated augmentation), so FFCV's own
``distributed=True`` sampler (plain ``DistributedSampler``, no repeats) is never used.

Progressive resolution: the decoder's memory is re-declared by FFCV at the start of every epoch
(``EpochIterator`` calls ``graph.allocate_memory``) and the compiled decode writes into whatever
output buffer it is given, so setting ``decoder.output_size`` between epochs changes the resolution
with no new Loader and no recompilation (the same trick as ffcv-imagenet's ``train_imagenet.py``).

Buffer lifetime: FFCV reuses ``batches_ahead + 2`` output slots, so a yielded batch stays valid
until a few later batches have been produced; consume it (or ``.clone()``) before keeping it.
Random crops, filters and flips are drawn from a counter-based generator keyed by (seed, epoch,
rank, image, place in the batch) (``pipelines/counter_rng.py``), not from numba's per-thread
generators that FFCV does not let us seed: an FFCV run is the same for any thread count, and a
resumed one repeats the uninterrupted run's crops.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
import torch

from pipelines.base import Batch, DataError, MissingBackendError

# FFCV's compiler module ends with ``Compiler.set_num_threads(1)``, whose ``torch.set_num_threads(1)``
# would leave every training step of the process on one CPU thread (the step, stage 2's kernels and
# evaluation all follow torch's count): the user's count (or OMP_NUM_THREADS's) is put back after
# the import, and the method replaced below (:func:`_set_decode_threads`) no longer touches it.
_USER_THREADS = torch.get_num_threads()
try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.loader import Loader
    from ffcv.pipeline.compiler import Compiler
    from ffcv.traversal_order.base import TraversalOrder
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
except ImportError as e:  # pipelines/build.py turns this into the one-line "what to install" message
    raise MissingBackendError(f"FFCV is not importable ({e}): pip install -e '.[ffcv]' "
                              "(needs libturbojpeg and OpenCV dev packages), or set data.pipeline=reference") from None
finally:
    torch.set_num_threads(_USER_THREADS)

from pipelines import counter_rng, pil_resize


def _set_decode_threads(cls, n: int) -> None:
    """FFCV's ``Compiler.set_num_threads`` (ffcv/pipeline/compiler.py), which ``Loader`` calls at
    construction (in the main thread) and its decoding thread at every epoch, with torch's count
    kept the user's: FFCV's ``torch.set_num_threads(n)`` set torch's intra-op threads, the training
    step's, to ``data.workers``, so a change of decoding threads changed the step's CPU reductions
    and the weights. Numba's count (the decode's threads) is set as FFCV sets it.

    The decoding thread still makes torch's call, as FFCV's own method does, with the count the
    main thread holds. Measured on the 2-core box (FFCV demo e2e, epochs 2-5 of 5, trees interleaved;
    benchmarks/results/guard-ffcv-threads.md): in three comparisons, leaving the call out (as this
    method did from 533866e on) cost 10-17% of the training images/s, ff77b6e's FFCV pipeline with
    the call left out was as slow, and a ``torch.get_num_threads()`` there did not help; in a fourth
    (6 rounds), ff77b6e, the tree without the call and the tree with it were within 3% of each other,
    inside the rounds' 20% spread. Kept for FFCV's own behaviour, at no measured cost."""
    global _torch_threads
    if n < 1:
        n = os.cpu_count() or 1
    cls.num_threads = n
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if threading.current_thread() is threading.main_thread():
        _torch_threads = torch.get_num_threads()  # the user's, read where the user (or the engine) set it
    else:
        torch.set_num_threads(_torch_threads)


_torch_threads = _USER_THREADS


Compiler.set_num_threads = classmethod(_set_decode_threads)
from pipelines._stage1_common import (INTERPOLATION_CODES, EpochPlan, check_eval_interpolation, check_interpolation,
                                      read_split, require_file, resolve_device)


def timm_eval_box(height, width, res, short_side):
    """The source box ``(x0, y0, x1, y1)`` (float pixel edges) that timm's eval transform shows:
    ``Resize(short_side)`` of the shorter side (longer side ``int(S * long / short)``, torchvision's
    truncation) then ``CenterCrop(res)`` at ``round((side - res) / 2)`` (round half to even), mapped
    back onto the source. PIL's resize of that box to ``res`` computes exactly the filter taps of
    the whole-image resize that the crop keeps. Compiled by numba inside the decoder."""
    h, w = np.float64(height), np.float64(width)
    short = min(h, w)
    out_h, out_w = np.floor(short_side * h / short), np.floor(short_side * w / short)
    top, left = np.round((out_h - res) / 2), np.round((out_w - res) / 2)
    sy, sx = h / out_h, w / out_w
    return left * sx, top * sy, (left + res) * sx, (top + res) * sy


class TimmEvalDecoder(ResizedCropRGBImageDecoder):
    """Eval decoder: decode, then PIL's BICUBIC resize of :func:`timm_eval_box` to ``res``
    (``pipelines/pil_resize.py``): the pixels of timm's ``Resize(floor(res / crop_pct), bicubic)`` +
    ``CenterCrop(res)`` (identical on the same decoded pixels: tests/test_pipeline_parity.py),
    instead of FFCV's OpenCV INTER_AREA of a whole-pixel window. FFCV's memory declaration; only the per-image code
    differs."""

    def __init__(self, res: int, crop_pct: float, cubic: bool = True):
        super().__init__((res, res))
        self.res, self.short_side, self.cubic = res, int(math.floor(res / crop_pct)), cubic

    @property
    def get_crop_generator(self):  # abstract in FFCV's base; this decoder computes its box itself
        return timm_eval_box

    def generate_code(self):
        box_of = Compiler.compile(timm_eval_box)
        resample = pil_resize.resample_into
        res, short_side, cubic = self.res, self.short_side, self.cubic

        def place(image, my_storage, k, sample):
            x0, y0, x1, y1 = box_of(image.shape[0], image.shape[1], res, short_side)
            resample(image, x0, y0, x1, y1, my_storage[0][k], False, cubic)

        return _decode_each(self, Compiler.compile(place))


def _decode_each(decoder, place):
    """FFCV's per-batch decode loop (read, JPEG decode or raw pixels) with ``place(image,
    my_storage, k, sample)``, a compiled function, writing the decoded image of ``sample`` (its
    dataset index) into slot ``k`` of the output ``my_storage[0]``: the one part in which this
    module's decoders differ."""
    read = decoder.memory_read
    loop = Compiler.get_iterator()
    decode_jpeg = Compiler.compile(imdecode)
    jpg = IMAGE_MODES["jpg"]

    def decode(batch_indices, my_storage, metadata, storage_state):
        out, scratch = my_storage[0], my_storage[1]
        for k in loop(len(batch_indices)):
            field = metadata[batch_indices[k]]
            data = read(field["data_ptr"], storage_state)
            h, w = np.uint32(field["height"]), np.uint32(field["width"])
            if field["mode"] == jpg:  # else raw pixels, stored as they are
                decode_jpeg(data, scratch[k], h, w, h, w, 0, 0, 1, 1, False, False)
                image = scratch[k].reshape(-1)[:3 * h * w].reshape(h, w, 3)
            else:
                image = data.reshape(h, w, 3)
            place(image, my_storage, k, batch_indices[k])
        return out[:len(batch_indices)]

    decode.is_parallel = True
    return decode


class PILRandomResizedCropDecoder(RandomResizedCropRGBImageDecoder):
    """Decode, random-resized-crop and flip, with every random number drawn from a counter-based
    generator (``pipelines/counter_rng.py``) keyed by (seed, epoch, rank) and the image's index and
    place in the batch, instead of numba's unseeded per-thread generators that FFCV's own decoder
    and ``RandomHorizontalFlip`` use: the crops of a run are the same for any thread count and after
    a resume, as the reference and DALI backends' are.

    The box follows torchvision's sampler (``scale``/``ratio``, 10 attempts, centre fallback, as
    timm's ``RandomResizedCropAndInterpolation``); the crop is resized with PIL's filters
    (``pipelines/pil_resize.py``) instead of OpenCV INTER_AREA, with timm's train interpolation:
    ``random`` by default (bilinear or bicubic per image), or always ``bilinear`` / ``bicubic``; and
    mirrored with probability ``hflip`` in the same pass. PIL's bilinear is ~3x cheaper than FFCV's
    resize on CPU (benchmarks/results/pipelines_cpu.md).

    The epoch's key reaches the compiled code through a third memory buffer of FFCV's: FFCV
    allocates its buffers again at the start of every epoch (``EpochIterator`` ->
    ``Graph.allocate_memory``), and :meth:`key_buffers` fills this one there."""

    def __init__(self, output_size, scale, ratio, interpolation: str = "random", hflip: float = 0.5):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.interpolation, self.hflip = interpolation, hflip

    def declare_state_and_memory(self, previous_state):
        state, (out, scratch) = super().declare_state_and_memory(previous_state)
        return state, (out, scratch, AllocationQuery((1,), np.dtype("<u8")))

    def generate_code(self):
        crop_box, uniform = counter_rng.random_resized_crop, counter_rng.uniform
        resize = pil_resize.resize_into
        scale, ratio = np.array(self.scale, np.float64), np.array(self.ratio, np.float64)
        mode, hflip = INTERPOLATION_CODES[self.interpolation], float(self.hflip)
        draw_cubic, draw_flip = counter_rng.DRAW_CUBIC, counter_rng.DRAW_FLIP

        def place(image, my_storage, k, sample):
            key = my_storage[2][k, 0]
            top, left, ch, cw = crop_box(image.shape[0], image.shape[1], scale, ratio, key, sample, k)
            cubic = mode == 1 or (mode == 2 and uniform(key, sample, k, draw_cubic) < 0.5)
            flip = hflip > 0 and uniform(key, sample, k, draw_flip) < hflip
            resize(np.ascontiguousarray(image[top:top + ch, left:left + cw]), my_storage[0][k], flip, cubic)

        return _decode_each(self, Compiler.compile(place))

    def key_buffers(self, loader: "Loader", key_of_epoch) -> None:
        """Make ``loader`` fill this decoder's key buffer with ``key_of_epoch()`` each time FFCV
        allocates the epoch's memory (before its decoding thread starts)."""
        graph = loader.graph
        node_id = graph.operation_to_node[self][0].id
        allocate = graph.allocate_memory

        def allocate_and_key(batch_size, batches_ahead):
            buffers = allocate(batch_size, batches_ahead)
            buffers["operation"][node_id][2][...] = key_of_epoch()
            return buffers

        graph.allocate_memory = allocate_and_key


class SamplerOrder(TraversalOrder):
    """FFCV traversal order that serves :class:`EpochPlan`'s indices for the current epoch.

    FFCV 1.0.2's ``Loader`` builds a custom order by calling the instance it is given with the
    loader (``order(self)``), so the instance is created first, without a loader, and binds it in
    ``__call__``. FFCV's own epoch counter is ignored: the pipeline's ``set_epoch`` decides.
    """

    def __init__(self, plan: EpochPlan):  # no super().__init__: it needs the loader, bound later
        self.plan = plan
        self.loader = None

    def __call__(self, loader) -> "SamplerOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        # FFCV's memory managers and JIT code expect unsigned 64-bit sample ids.
        return self.plan.take().astype(np.uint64)


def _fields(reader) -> tuple[str, str]:
    """Image and label field names, found by type (the converter's names are not hard-coded)."""
    image = [n for n, h in reader.handlers.items() if isinstance(h, RGBImageField)]
    label = [n for n, h in reader.handlers.items() if isinstance(h, IntField)]
    if len(image) != 1 or len(label) != 1:
        raise DataError(f"{reader.file_name}: expected one RGB image field and one int label field, found "
                        f"{ {n: type(h).__name__ for n, h in reader.handlers.items()} }; re-run the converter")
    return image[0], label[0]


def _check_size(beton: Path, entry: dict) -> None:
    """A .beton cut short (a copy or a disk that filled up) makes FFCV fail deep inside numpy
    ("negative dimensions are not allowed"); the manifest records the size the converter wrote."""
    want = entry.get("bytes")
    have = beton.stat().st_size
    if want is not None and have != int(want):
        raise DataError(f"{beton} is {have:,} bytes but the converter wrote {int(want):,} (truncated or changed "
                        f"since); copy it again or re-run the converter")


class FFCVPipeline:
    """FFCV stage 1 for ``split`` in {"train", "val"}; keywords as pipelines/build.py passes them."""

    def __init__(self, root, split: str, *, batch_size: int, res: int, device="cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, repeats: int = 0, workers: int = 8,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "random",
                 crop_pct: float = 0.875, eval_interpolation: str = "bicubic", batches_ahead: int = 3,
                 os_cache: bool = True, max_images: int = 0):
        check_interpolation(interpolation)
        info = read_split(root, split, "ffcv")
        self.root, self.split, self.train = Path(root), split, split == "train"
        self.beton = require_file(self.root / "ffcv" / f"{split}.beton", self.root, "ffcv")
        _check_size(self.beton, info.entry)
        self.num_classes, self.num_samples, self.classes = info.num_classes, info.num_samples, info.classes
        self.batch_size, self.res, self.device = batch_size, res, resolve_device(device)
        self.crop_pct = crop_pct
        self.plan = EpochPlan(self.num_samples, train=self.train, batch_size=batch_size, rank=rank,
                              world_size=world_size, seed=seed, repeats=repeats, max_images=max_images)
        self.seed, self.rank = seed, rank
        if self.train:
            self.decoder = PILRandomResizedCropDecoder((res, res), scale=tuple(scale), ratio=tuple(ratio),
                                                       interpolation=interpolation, hflip=hflip)
            image_ops = [self.decoder]
        else:
            self.decoder = TimmEvalDecoder(res, crop_pct, cubic=check_eval_interpolation(eval_interpolation))
            image_ops = [self.decoder]
        cuda = self.device.type == "cuda"
        # On CPU ToDevice would only add a memcpy into another reused buffer: leave it out.
        to_dev = [ToDevice(self.device, non_blocking=True)] if cuda else []
        image_ops += [ToTensor(), *to_dev, ToTorchImage(channels_last=True, convert_back_int16=False)]
        label_ops = [IntDecoder(), ToTensor(), Squeeze(), *to_dev]
        self._order = SamplerOrder(self.plan)
        from ffcv.reader import Reader

        try:
            reader = Reader(str(self.beton))
        except (ValueError, IndexError, KeyError, OSError) as e:  # FFCV's own errors on a damaged header/table
                raise DataError(f"cannot read {self.beton} ({type(e).__name__}: {e}): damaged; re-run the converter "
                            f"into a new OUT") from None
        image_field, label_field = _fields(reader)
        self.loader = Loader(str(self.beton), batch_size=batch_size, num_workers=max(1, workers),
                             order=self._order, os_cache=os_cache, drop_last=self.train, seed=seed,
                             batches_ahead=batches_ahead,
                             pipelines={image_field: image_ops, label_field: label_ops})
        if self.train:
            self.decoder.key_buffers(self.loader, self.epoch_key)
        if self.loader.reader.num_samples != self.num_samples:
                raise DataError(f"{self.beton} holds {self.loader.reader.num_samples} images but manifest.json says "
                            f"{self.num_samples}; re-run the converter")

    def epoch_key(self) -> np.uint64:
        """The counter-based generator's key for this rank's current epoch (its crops and flips)."""
        return counter_rng.stream_key(self.seed, self.plan.epoch, self.rank)

    def set_epoch(self, epoch: int, res: int | None = None, start_batch: int = 0) -> None:
        """Reseed the order for ``epoch``, skip ``start_batch`` batches (indices only), and switch the
        decode resolution in place (train; val keeps its eval resolution unless given one)."""
        self.plan.set_epoch(epoch, start_batch)
        if res is not None and res != self.res:
            self.res = res
            self.decoder.output_size = (res, res)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[Batch]:
        if len(self.plan.remaining()) == 0:
            self.plan.take()
            return
        for images, labels in self.loader:  # Loader.__iter__ takes the order through SamplerOrder
            yield Batch(images, labels)
