"""Reference stage 1: PIL decode + torchvision-style crops in a ``DataLoader`` (CPU fallback).

The yardstick the fast backends (FFCV, DALI) are checked against, so its transforms are
timm's, from ``timm/data/transforms_factory.py`` and ``timm/data/transforms.py``:

* train: ``RandomResizedCropAndInterpolation(res, scale, ratio, interpolation='random')``
  (timm train.py's ``--train-interpolation`` default: bilinear or bicubic at random per image),
  then horizontal flip with probability ``hflip``;
* eval: resize the shorter side to ``floor(res / crop_pct)`` (bicubic, the ResNet pretrained
  configs' interpolation), then centre-crop ``res``.

Images are decoded with ``Image.open(p).convert('RGB')`` (EXIF orientation ignored, as ImageNet
practice). Output: :class:`pipelines.base.Batch` of uint8 [N, 3, res, res] in channels_last
memory and int64 labels, on ``device``; stage 2 does the rest.

Which images: on a converted data root, exactly the converter's item list (``items/<split>.tsv``
named by ``manifest.json``: source paths and labels in storage order, classes from the manifest),
the images FFCV and DALI read converted copies of; so a ``--classes`` subset trains a subset-sized
head here too, and files the converter skipped are not read. A manifest from a converter without
item lists falls back to listing ``<source>/<split>`` (torchvision ``make_dataset``, one warning);
a conversion from the ILSVRC2012 tars has no source files to read (an error). A plain class-folder
tree (``split_dir``, e.g. ImageNet-V2) is listed as torchvision's ``ImageFolder`` does.

Unreadable images: a source file damaged or removed after conversion must not end a run (a crash
at the same step every epoch, with a worker traceback). Its decode error is caught in the worker;
its batch slot takes another image of the same batch (the next readable one, with its label), so
the batch size stays fixed (stage 2's mixup pairs samples; compiled steps want static shapes), and
the batch lists it in ``Batch.skipped``. The main process prints one warning line per path.

Workers start from a forkserver (pipelines/worker_server.py) and persist across epochs. They
ignore SIGINT and SIGUSR2, and SIGTERM from any process but the main one: a signal sent to the whole
process group (Ctrl-C, Slurm preemption and its early signal, which reach every process of the job
step, ``kill -- -PGID``) must reach only the main process, which owns shutdown (a final checkpoint);
a worker killed first would make the ``DataLoader`` raise instead. SIGTERM from the main process
still ends a worker at once, with status 0: torch's own worker handler does the same
(``handler_SIGTERM`` in ``torch/csrc/DataLoader.cpp``), because when a traceback keeps a loader
alive at exit, ``multiprocessing``'s exit handler terminates the workers and then joins them, so a
worker that ignored it would hang the exit forever. Workers also end with the main process (the
loader's parent watchdog), and SIGKILL still kills them. The sender is told apart with
``sigwaitinfo`` on a thread (SIGTERM stays blocked elsewhere in the worker).

Determinism: each sample's randomness comes from its own generator seeded by
``(seed, epoch, rank, position in this rank's epoch)``, so results do not depend on worker count
or timing, repeated copies of an image get different crops, and a resumed run
(``set_epoch(epoch, start_batch=k)`` or ``skip_batches(k)``) continues exactly.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import select
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode

from ._stage1_common import check_eval_interpolation, check_interpolation
from .dataroot import load_manifest
from .base import Batch, DataError
from .dataroot import decode_items
from .sampler import ShardSampler
from .worker_server import worker_context

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
# What PIL and the OS raise for a bad file (missing, truncated, not an image, a broken header, a
# decompression bomb). Not Exception: a bug or KeyboardInterrupt must still stop the run.
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
CONVERT_CMD = "python tools/convert_imagenet.py SRC {root}"


def _read_manifest(root: Path) -> dict | None:
    return load_manifest(root, f"rerun the converter: {CONVERT_CMD.format(root=root)}")


def _source_root(root: Path, manifest: dict) -> Path:
    """The tree the manifest was converted from (``source``; relative to ``root`` if not absolute)."""
    src = Path(manifest.get("source") or ".")
    return src if src.is_absolute() else root / src


def resolve_split_dir(root: str | Path, split: str) -> Path:
    """``root/<split>``, or ``<source>/<split>`` where ``root/manifest.json`` names a ``source`` tree."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest and manifest.get("source"):
        root = _source_root(root, manifest)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"no class-folder tree at {split_dir} (expected {split_dir}/<class>/<image>)")
    return split_dir


def converted_items(root: Path, manifest: dict, split: str) -> tuple[list[tuple[str, int]], list[str]] | None:
    """The converter's stored items of ``split`` as ``(source path, label)`` in storage order, and the
    class names; None when the manifest has no item list (written by an older converter)."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return None
    entry = splits.get(split)
    if not isinstance(entry, dict):
        raise DataError(f"{root} was converted without the {split} split (manifest.json); convert it with "
                        "--splits train,val")
    if entry.get("source_kind") == "archive":
        raise DataError(f"the reference pipeline reads source image files, but the {split} split of {root} was "
                        "converted from the ILSVRC2012 tars; use data.pipeline=ffcv or dali, or convert "
                        "extracted folders")
    info = entry.get("items")
    if info is None:
        return None
    path = root / info["file"]
    try:
        data = path.read_bytes()
        names, labels = decode_items(data)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the item list {path} ({e}); rerun the converter: "
                        f"{CONVERT_CMD.format(root=root)}") from None
    classes = list(entry.get("classes") or ())
    if len(names) != info["images"] or hashlib.sha256(data).hexdigest() != info["sha256"] or \
            any(not 0 <= lab < len(classes) for lab in set(labels)):
        raise DataError(f"{path} does not match {root / 'manifest.json'} (damaged or replaced); check it with "
                        f"{CONVERT_CMD.format(root=root)} --verify")
    source = _source_root(root, manifest)
    return [(str(source / name), label) for name, label in zip(names, labels)], classes


def folder_items(split_dir: Path, class_index_folders: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision ``ImageFolder``'s listing of a class-folder tree: (path, label) and class names.
    ``class_index_folders``: folder names are class indices (ImageNet-V2), label = int(name)."""
    classes, class_to_idx = find_classes(str(split_dir))
    if class_index_folders:
        bad = [c for c in classes if not c.isdigit()]
        if bad:
            raise DataError(f"class-index folders expected (0, 1, ... as in ImageNet-V2) but {split_dir} has "
                            f"folder {bad[0]!r}; drop the class-index option for named class folders")
        class_to_idx = {c: int(c) for c in classes}
        classes = [str(i) for i in range(max(class_to_idx.values()) + 1)]
    try:  # ImageNet-V2-style trees may hold a class with no image: allowed there, an error elsewhere
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS,
                               allow_empty=class_index_folders)
    except FileNotFoundError as e:
        raise DataError(f"{split_dir}: {str(e).splitlines()[0]}") from None
    return samples, classes


def split_items(root: str | Path, split: str, rank: int = 0) -> tuple[list[tuple[str, int]], list[str]]:
    """What ``ReferencePipeline(root, split)`` reads: the converted item list when ``root`` has one,
    else the class folders of ``<source or root>/<split>`` (with a warning when a manifest exists)."""
    root = Path(root)
    manifest = _read_manifest(root)
    listed = converted_items(root, manifest, split) if manifest is not None else None
    if listed is not None:
        return listed
    split_dir = resolve_split_dir(root, split)
    if manifest is not None and rank == 0:
        print(f"warning: {root / 'manifest.json'} has no item list for {split} (older converter): reading every "
              f"image under {split_dir}, which may differ from the converted images; rerun the converter to "
              f"record the list: {CONVERT_CMD.format(root=root)}", file=sys.stderr, flush=True)
    return folder_items(split_dir, False)


def bare_class_folder(root: str | Path) -> Path | None:
    """``root`` when it is itself a class-folder directory (``root/<class>/<image>``, e.g. an
    ImageNet-V2 download) rather than a data root (``manifest.json`` or ``val/``), else None."""
    root = Path(root)
    return None if (root / "manifest.json").is_file() or (root / "val").is_dir() else root


def random_resized_crop_params(width: int, height: int, scale, ratio, rng: np.random.Generator):
    """(top, left, h, w) as timm's ``RandomResizedCropAndInterpolation.get_params``: 10 tries at a
    random area and log-uniform aspect ratio, else a centre crop at the nearest allowed ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Folder(torch.utils.data.Dataset):
    """Items are addressed by ``(index, key, res)``: key seeds the sample's own generator (train), res
    is the pass's resolution. The resolution travels with the item, not in the dataset: a persistent
    worker's copy of the dataset is made once and never sees a later epoch's."""

    def __init__(self, samples, train: bool, crop_pct: float, scale, ratio, hflip: float,
                 interpolation: str, eval_interpolation: str = "bicubic"):
        self.samples = samples
        self.train = train
        self.crop_pct = crop_pct
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation, self.eval_interpolation = interpolation, eval_interpolation

    def __len__(self):
        return len(self.samples)

    def transform(self, img: Image.Image, rng: np.random.Generator | None, res: int) -> Image.Image:
        if not self.train:
            img = TF.resize(img, math.floor(res / self.crop_pct), INTERPOLATIONS[self.eval_interpolation])
            return TF.center_crop(img, [res, res])
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
        name = self.interpolation
        if name == "random":
            name = "bilinear" if rng.random() < 0.5 else "bicubic"
        img = TF.resized_crop(img, top, left, h, w, [res, res], INTERPOLATIONS[name])
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def __getitem__(self, item):
        """``(HWC uint8 array, label, None)``, or ``(None, label, (path, reason))`` when unreadable."""
        index, key, res = item
        path, label = self.samples[index]
        try:
            img = _decode(path)
        except UNREADABLE as e:
            return None, label, (path, _reason(e))
        rng = np.random.default_rng(key) if self.train else None
        return np.asarray(self.transform(img, rng, res)), label, None


def _decode(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")  # Image.open is lazy: convert() decodes, inside the guard


def _reason(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{type(e).__name__}: {' '.join(text.split())[:200]}"


def _collate(items):
    """Stack a batch; each unreadable image's slot takes the next readable image of the batch
    (cyclically) with its label. Returns ``(images | None when none was readable, labels, skipped)``."""
    ok = [i for i, (a, _, _) in enumerate(items) if a is not None]
    skipped = tuple(s for _, _, s in items if s is not None)
    if not ok:
        return None, None, skipped
    src = [i if items[i][0] is not None else min((j for j in ok if j > i), default=ok[0]) for i in range(len(items))]
    images = torch.from_numpy(np.stack([items[i][0] for i in src]))  # [N, H, W, 3]
    labels = torch.tensor([items[i][1] for i in src], dtype=torch.int64)
    return images.permute(0, 3, 1, 2), labels, skipped  # NCHW view of NHWC memory: channels_last


def _ignore_stop_signals(worker_id: int, main_pid: int) -> None:
    """DataLoader ``worker_init_fn`` (runs after the loader's per-worker seeding and signal handlers):
    ignore SIGINT, and SIGTERM from any process but the main one (see the module docstring). The
    main process is named, not found as the parent: forkserver's workers are the server's children."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there torch's handler lets any SIGTERM end the worker
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask
        threading.Thread(target=_exit_on_parent_sigterm, args=(main_pid,), daemon=True).start()
    threading.Thread(target=_exit_with_main, args=(main_pid,), daemon=True).start()


def _exit_with_main(main: int) -> None:
    """End this worker when the main process has ended, however it ended (kill -9, the OOM killer, the
    ``os._exit`` of a rank whose group failed). torch's own check watches the worker's parent, which
    for a forkserver's worker is the server, and the server lives as long as a worker holds its
    pipe: without this, orphaned workers and the server would live on, holding the job's output
    pipes open. A pidfd (Linux 5.3+) becomes readable when the process ends, no polling."""
    try:
        fd = os.pidfd_open(main)
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd here: look once a second
        while _running(main):
            time.sleep(1.0)
        os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _exit_on_parent_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # a group-wide SIGTERM (Slurm, kill -- -PGID): the main process decides
    os._exit(0)  # status 0, as torch's handler_SIGTERM does, so the loader's SIGCHLD check stays quiet


class _EpochBatches:
    """The DataLoader's batch sampler: the current pass's batches of ``(index, key, res)`` items, set
    when the pass starts (:meth:`ReferencePipeline.__iter__`). The loader may ask for them more than
    once per pass (a persistent loader's first pass does: when made, and when reset). It holds no
    reference back to the pipeline: without a cycle, a dropped pipeline's workers are shut down at
    once (by reference counting), not by the cycle collector, whose order of finalizers leaves
    them to a 5-s join timeout each."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ReferencePipeline:
    """torchvision/PIL ``DataLoader`` pipeline over the converted item list or a class-folder tree;
    implements ``Pipeline``."""

    def __init__(self, root: str, split: str, *, batch_size: int, res: int, crop_pct: float = 0.875,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, workers: int = 2,
                 device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0, repeats: int = 0,
                 drop_last: bool | None = None, interpolation: str = "random", eval_interpolation: str = "bicubic",
                 split_dir: str | Path | None = None, class_index_folders: bool = False, max_images: int = 0):
        """``split_dir``: read this class-folder directory instead of ``root/<split>`` (e.g. an
        ImageNet-V2 download). ``class_index_folders``: folder names are class indices ("0".."999",
        ImageNet-V2's layout), so label = int(name), not the position in sorted name order (where
        "10" would sort before "2"). ``max_images``: val only, that many images evenly spaced over the
        split (``eval.max_images``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        check_interpolation(interpolation)  # the same names and messages as the FFCV and DALI backends
        check_eval_interpolation(eval_interpolation)
        self.train = split == "train"
        if split_dir is not None:
            split_dir = Path(split_dir)
            if not split_dir.is_dir():
                raise DataError(f"no class-folder tree at {split_dir} (expected {split_dir}/<class>/<image>)")
            samples, self.classes = folder_items(split_dir, class_index_folders)
        else:
            samples, self.classes = split_items(root, split, rank)
        if not samples:
            raise DataError(f"no images for the {split} split of {split_dir or root}")
        self.num_classes = len(self.classes)
        self.num_samples = len(samples)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.workers = workers
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.max_images = max_images
        self.drop_last = self.train if drop_last is None else drop_last
        self._res = res
        self.dataset = _Folder(samples, self.train, crop_pct, scale, ratio, hflip, interpolation,
                               eval_interpolation)
        # Eval visits every image once in file order (padded to equal length across ranks).
        self.sampler = ShardSampler(self.num_samples, seed=seed, rank=rank, world_size=world_size,
                                    repeats=repeats if self.train else 0, shuffle=self.train)
        self.epoch = 0
        self.start_batch = 0
        self._warned: set[str] = set()  # unreadable paths already reported
        self._dataloader = None  # made at the first pass (_loader)
        self._mp_context = worker_context() if workers > 0 else None
        self._pass = _EpochBatches()  # this pass's batches, the loader's batch sampler

    @property
    def res(self) -> int:
        return self._res

    def set_epoch(self, epoch: int, res: int | None = None, *, start_batch: int = 0) -> None:
        self.epoch = epoch
        if res is not None:
            self._res = res
        self.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def skip_batches(self, n: int) -> None:
        """Start the coming epoch at batch ``n`` (resume mid-epoch)."""
        self.start_batch = n

    def _indices(self):
        # val: every sample exactly once across ranks (no DistributedSampler-style padding), so
        # metrics summed over ranks count each image once
        if self.train:
            return self.sampler.indices()
        from ._stage1_common import val_indices
        return val_indices(self.num_samples, self.rank, self.world_size, self.max_images)

    def _batches(self) -> list[list[tuple[int, tuple[int, ...], int]]]:
        idx = self._indices()
        keys = [(self.seed, self.epoch, self.rank, pos) for pos in range(len(idx))]
        items = [(i, key, self.res) for i, key in zip(idx.tolist(), keys)]
        n = len(items) // self.batch_size if self.drop_last else math.ceil(len(items) / self.batch_size)
        return [items[b * self.batch_size:(b + 1) * self.batch_size] for b in range(self.start_batch, n)]

    def __len__(self) -> int:
        n = len(self.sampler) if self.train else len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _report(self, skipped: tuple) -> None:
        """One warning line per unreadable path (main process, so once per run, not per worker)."""
        for path, reason in skipped:
            if path not in self._warned:
                self._warned.add(path)
                print(f"warning: skipped unreadable image {path} ({reason}); its batch slot reuses another image",
                      file=sys.stderr, flush=True)

    def _loader(self) -> torch.utils.data.DataLoader:
        """The pipeline's one DataLoader. Its workers persist across epochs (the batches, with each
        item's key and resolution, come from :class:`_EpochBatches` at each pass) and start from the
        forkserver of :mod:`pipelines.worker_server`."""
        if self._dataloader is None:
            kw = {}
            if self.workers > 0:
                kw = dict(persistent_workers=True, multiprocessing_context=self._mp_context,
                          worker_init_fn=functools.partial(_ignore_stop_signals, main_pid=os.getpid()))
            # Its own generator: the loader draws its workers' base seed when its first pass starts, which
            # would otherwise take a number from the training's global RNG (restored by a resume) once
            # per process, not once per run. The transforms never read that seed (keys seed them).
            self._dataloader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._pass, num_workers=self.workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.seed), **kw)
        return self._dataloader

    def __iter__(self):
        self._pass.batches = self._batches()
        self.start_batch = 0  # a skip applies to one epoch only
        loader = self._loader()
        for images, labels, skipped in loader:
            if images is None:
                path, reason = skipped[0]
                raise DataError(f"no image of a batch of {len(skipped)} could be read (e.g. {path}: {reason}); "
                                "check the source files")
            self._report(skipped)
            yield Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                        skipped)
