"""The resumable, multi-process conversion driver.

Work unit = a *chunk*: ``shard_size`` consecutive items of a split's fixed order. A worker
decodes each item once (:mod:`decode`), encodes one JPEG that feeds every format, and writes the
chunk's DALI shard + index and FFCV part; then it commits the chunk record (:mod:`state`). The
parent shows progress, and when all chunks of a split are committed packs the FFCV parts into the
split's beton, writes the split's item list (:mod:`pipelines.dataroot`: which source file each stored sample
came from, for the reference pipeline) and finally ``manifest.json``. A rerun of the same command
skips committed chunks, so ``kill -9`` loses at most the chunks in flight and never duplicates a
sample; on a conversion finished by a version without item lists it only adds those.

Train order is a seeded shuffle of the sorted items, so every DALI shard holds a mix of classes
(webdataset readers shuffle only within a small buffer; class-sorted shards would give
single-class batches). Val keeps the sorted ``ImageFolder`` order.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.fileio import commit, sha256_file
from pipelines.dataroot import ITEMS_DIR, SCHEMA, encode_items, items_info, items_path, manifest_path

from . import TOOL_VERSION
from .dali_out import ShardWriter, write_index
from .decode import SkipImage, decode_source, encode_jpeg, passes_through, resize_to_fit
from .ffcv_out import MODE_JPG, MODE_RAW, PartWriter, write_beton
from .manifest import build_manifest, label_digest, split_paths
from .sources import Item, SplitSource, discover, read_item
from .state import (STATE_DIR, Lock, StateError, check_plan, chunk_record_path, read_json, remove_temps, tmp_name,
                    write_atomic, write_json)

FORMATS = ("ffcv", "dali")
WRITE_MODES = ("jpg", "raw", "proportion")
# Test hook: seconds each worker sleeps after every image, so a test can kill a run mid-way.
DELAY_ENV = "RSB_CONVERT_TEST_DELAY"


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the outputs (recorded in the manifest; a resume must match it)."""

    formats: tuple[str, ...] = FORMATS
    splits: tuple[str, ...] = ("train", "val")
    # Train: 500 px longest side: ImageNet's own size for nearly all images, so 224-px training (whose
    # random-resized crops go down to 8 % area, ~141 px of a 500-px image) loses no detail, while
    # the rare multi-megapixel files stop dominating decode time. ffcv-imagenet's rn50 uses 500 too.
    max_resolution: int | None = 500
    # Val: no cap by default, so FFCV/DALI evaluate the files timm evaluates (timm resizes the
    # originals); a cap makes eval figures differ from timm's.
    val_max_resolution: int | None = None
    # Store a source that already is an RGB JPEG (no rotation, within the cap) as its original bytes;
    # False re-encodes every image at jpeg_quality (ffcv-imagenet's uniform files).
    pass_through: bool = True
    # q90 for what is re-encoded: the error is far below what RandAugment/RRC do to pixels; ffcv-imagenet's value.
    jpeg_quality: int = 90
    # jpg: every sample compressed. A beton about the size of ImageNet itself that fits a node's page
    # cache; 'proportion'/'raw' trade 4-6x disk for less decode work at load time.
    write_mode: str = "jpg"
    compress_probability: float = 0.5  # 'proportion' only: chance a sample is stored as JPEG
    shard_size: int = 1024  # images per DALI shard (and per resumable chunk): ~100 MB of ImageNet
    shuffle_train: bool = True
    seed: int = 0
    limit_per_class: int | None = None
    classes: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------- planning
def ordered_items(items: list[Item], shuffle: bool, seed: int) -> list[Item]:
    if not shuffle:
        return list(items)
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def fingerprint(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.label}\t{it.name}\t{it.offset}\t{it.size}\n".encode())
    return h.hexdigest()


def sample_key(seq: int, name: str) -> str:
    """``<position>_<file stem>``: unique, sortable, traceable; no dots (webdataset splits there)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", name.rsplit("/", 1)[-1].split(".")[0])[:60]
    return f"{seq:08d}_{stem}"


def stored_as_jpeg(settings: Settings, split: str, seq: int) -> bool:
    """FFCV storage mode per sample; 'proportion' draws from a hash so reruns agree."""
    if settings.write_mode == "proportion":
        u = zlib.crc32(f"{settings.seed}:{split}:{seq}".encode()) / 2**32
        return u < settings.compress_probability
    return settings.write_mode == "jpg"


# --------------------------------------------------------------------------- worker side
_counter = None


def _init_worker(counter) -> None:
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if sys.platform.startswith("linux"):
        # Die with the parent (kill -9 included), so an orphan can never commit a chunk that a
        # resumed run is redoing. PR_SET_PDEATHSIG = 1.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _tick() -> None:
    if _counter is not None:
        with _counter.get_lock():
            _counter.value += 1


def process_chunk(task: tuple) -> dict:
    """Convert one chunk and commit it; returns its completion record."""
    split, chunk, first_seq, items, out, settings = task
    out = Path(out)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    dali, ffcv = "dali" in settings.formats, "ffcv" in settings.formats
    paths = split_paths(out, split, chunk)
    labels, names, skipped, handles = [], [], [], {}
    passed = reencoded = 0  # JPEGs stored as the source's bytes / encoded from its pixels
    part = shard = None
    tar_tmp, idx_tmp = tmp_name(paths["tar"]), tmp_name(paths["idx"])
    if ffcv:
        paths["part"].parent.mkdir(parents=True, exist_ok=True)
        part_tmp = tmp_name(paths["part"])
        part = PartWriter(part_tmp)
    try:
        for j, item in enumerate(items):
            seq = first_seq + j
            try:
                data = read_item(item, handles)
                decoded, original_ok = decode_source(data)
                img = resize_to_fit(decoded, settings.max_resolution if split == "train" else settings.val_max_resolution)
                as_jpeg = stored_as_jpeg(settings, split, seq)
                jpeg = None
                if dali or (ffcv and as_jpeg):
                    if settings.pass_through and passes_through(original_ok, decoded, img):
                        jpeg = data
                        passed += 1
                    else:
                        try:
                            jpeg = encode_jpeg(img, settings.jpeg_quality)
                        except (OSError, ValueError) as e:
                            raise SkipImage(f"cannot re-encode as JPEG: {e}") from None
                        reencoded += 1
            except SkipImage as e:
                skipped.append({"path": item.name, "reason": str(e)})
            else:
                key = sample_key(seq, item.name)
                if dali:
                    if shard is None:
                        paths["tar"].parent.mkdir(parents=True, exist_ok=True)
                        shard = ShardWriter(tar_tmp)
                    shard.add(key, jpeg, item.label)
                if ffcv:
                    payload = jpeg if as_jpeg else img.tobytes()
                    part.add(item.label, MODE_JPG if as_jpeg else MODE_RAW, img.width, img.height, payload)
                labels.append(item.label)
                names.append(item.name)
            _tick()
            if delay:
                time.sleep(delay)
    finally:
        for fd in handles.values():
            os.close(fd)

    record = {"split": split, "chunk": chunk, "images": len(labels), "labels": labels, "names": names,
              "skipped": skipped, "shard": None, "jpeg_passed_through": passed, "jpeg_reencoded": reencoded}
    if ffcv:
        meta_tmp = tmp_name(paths["part_meta"])
        part.close(meta_tmp)
        commit(part_tmp, paths["part"])
        commit(meta_tmp, paths["part_meta"])
    if shard is not None:
        members = shard.close()
        tool = write_index(tar_tmp, idx_tmp, members)
        record["shard"] = {"path": str(paths["tar"].relative_to(out)), "index": str(paths["idx"].relative_to(out)),
                           "images": len(members) // 2, "bytes": tar_tmp.stat().st_size, "sha256": sha256_file(tar_tmp),
                           "index_sha256": sha256_file(idx_tmp), "index_tool": tool}
        commit(tar_tmp, paths["tar"])
        commit(idx_tmp, paths["idx"])
    write_json(chunk_record_path(out, split, chunk), record)
    return record


# --------------------------------------------------------------------------- parent side
def _record_ok(out: Path, rec: dict | None, settings: Settings, beton_done: bool) -> bool:
    if not rec or "names" not in rec:  # no record, or one from a version without item lists: redo
        return False
    if "dali" in settings.formats and rec["shard"]:
        tar = out / rec["shard"]["path"]
        if not tar.is_file() or tar.stat().st_size != rec["shard"]["bytes"] or not (out / rec["shard"]["index"]).is_file():
            return False
    if "ffcv" in settings.formats and not beton_done:
        p = split_paths(out, rec["split"], rec["chunk"])
        if not (p["part"].is_file() and p["part_meta"].is_file()):
            return False
    return True


def _wipe(out: Path) -> None:
    """--overwrite: remove only what this tool writes (OUT may hold other things)."""
    for name in ("ffcv", "dali", ITEMS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for p in (out / STATE_DIR).iterdir() if (out / STATE_DIR).is_dir() else ():
        if p.name != "lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    manifest_path(out).unlink(missing_ok=True)


def _beton_record_path(out: Path, split: str) -> Path:
    return out / STATE_DIR / f"{split}-ffcv.json"


def _assemble(out: Path, split: str, n_chunks: int, records: list[dict], log) -> dict:
    rec_path = _beton_record_path(out, split)
    final = out / "ffcv" / f"{split}.beton"
    done = read_json(rec_path)
    if done and final.is_file() and final.stat().st_size == done["bytes"]:
        return done
    log(f"{split}: writing {final.relative_to(out)}")
    parts = [(split_paths(out, split, c)["part"], split_paths(out, split, c)["part_meta"]) for c in range(n_chunks)]
    tmp = tmp_name(final)
    stats = write_beton(tmp, parts)
    expected = [lab for r in records for lab in r["labels"]]
    if stats["labels"].tolist() != expected:  # parts disagree with the chunk records: a bug, not user error
        raise RuntimeError(f"{split}: FFCV parts do not match the chunk records")
    info = {"file": str(final.relative_to(out)), "images": stats["images"], "page_size": stats["page_size"],
            "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    commit(tmp, final)
    write_json(rec_path, info)
    shutil.rmtree(out / "ffcv" / ".parts" / split, ignore_errors=True)
    return info


def _write_items(out: Path, split: str, names: list[str], labels: list[int]) -> dict:
    """Write ``items/<split>.tsv`` atomically; returns the manifest's ``items`` record."""
    path = items_path(out, split)
    data = encode_items(names, labels)
    write_atomic(path, data)
    return items_info(out, path, data, len(names))


def _plan(src: Path, out: Path, settings: Settings, val_labels: Path | None,
          meta: Path | None) -> tuple[dict[str, SplitSource], dict[str, list[Item]]]:
    """The sources and each split's item order; refuses an OUT planned from other items or settings."""
    sources = discover(src, list(settings.splits), list(settings.classes) if settings.classes else None,
                       settings.limit_per_class, val_labels, meta)
    order = {name: ordered_items(s.items, settings.shuffle_train and name == "train", settings.seed)
             for name, s in sources.items()}
    check_plan(out, {**settings.to_dict(), "source": str(src), "tool_version": TOOL_VERSION,
                     **{f"items_{name}": fingerprint(items) for name, items in order.items()}})
    return sources, order


def _add_item_lists(out: Path, manifest: dict, order: dict[str, list[Item]], log) -> dict:
    """A conversion finished by a version without item lists: each split's stored items are its
    planned order less the skipped files (the plan check above guarantees the same order); the
    label count and digest must match the manifest's, else the source changed since."""
    for name, entry in manifest["splits"].items():
        if "items" in entry:
            continue
        gone = {s["path"] for s in entry["skipped"]}
        kept = [it for it in order.get(name, []) if it.name not in gone]
        labels = [it.label for it in kept]
        if len(kept) != entry["images"] or label_digest(labels) != entry["labels_sha256"]:
            raise StateError(f"{out}: the {name} item list of this conversion cannot be rebuilt (the source "
                             "changed since); use --overwrite")
        entry["items"] = _write_items(out, name, [it.name for it in kept], labels)
    manifest["format"] = SCHEMA
    write_json(manifest_path(out), manifest)
    log(f"{out}: recorded the converted item lists ({ITEMS_DIR}/<split>.tsv) in manifest.json")
    return manifest


def convert(src: Path, out: Path, settings: Settings, workers: int, progress: bool = True,
            overwrite: bool = False, val_labels: Path | None = None, meta: Path | None = None,
            log=print) -> dict:
    """Run (or resume, or confirm) a conversion; returns the manifest. Raises the user-error types of
    :mod:`sources` and :mod:`state` with one-line messages."""
    src, out = src.resolve(), out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with Lock(out):
        if overwrite:
            _wipe(out)
        remove_temps(out)
        done = read_json(manifest_path(out))
        if done is not None:
            if done.get("settings") != settings.to_dict() or done.get("source") != str(src):
                raise StateError(f"{out} holds a finished conversion with other settings or source; "
                                 "use a new OUT or --overwrite")
            if all("items" in s for s in done["splits"].values()):
                log(f"{out} is already complete (manifest.json); nothing to do")
                return done
            return _add_item_lists(out, done, _plan(src, out, settings, val_labels, meta)[1], log)
        sources, order = _plan(src, out, settings, val_labels, meta)

        size = settings.shard_size
        records: dict[str, dict[int, dict]] = {name: {} for name in order}
        tasks = []
        for name, items in order.items():
            beton_done = _beton_record_path(out, name).is_file()
            for c in range(-(-len(items) // size)):
                rec = read_json(chunk_record_path(out, name, c))
                if _record_ok(out, rec, settings, beton_done):
                    records[name][c] = rec
                else:
                    tasks.append((name, c, c * size, items[c * size:(c + 1) * size], str(out), settings))
        total = sum(len(items) for items in order.values())
        pending = sum(len(t[3]) for t in tasks)
        if total - pending:
            log(f"resuming: {total - pending} of {total} images already converted")
        for rec in _run_tasks(tasks, workers, progress, total, total - pending):
            records[rec["split"]][rec["chunk"]] = rec

        splits = {}
        for name, items in order.items():
            recs = [records[name][c] for c in sorted(records[name])]
            beton = _assemble(out, name, len(recs), recs, log) if "ffcv" in settings.formats else None
            listed = _write_items(out, name, [n for r in recs for n in r["names"]],
                                  [lab for r in recs for lab in r["labels"]])
            splits[name] = (sources[name], recs, beton, listed)
        manifest = build_manifest(src, settings.to_dict(), list(settings.formats), splits)
        write_json(manifest_path(out), manifest)
        shutil.rmtree(out / "ffcv" / ".parts", ignore_errors=True)
        return manifest


def _run_tasks(tasks: list, workers: int, progress: bool, total: int, initial: int):
    """Yield chunk records as workers finish them, driving a progress bar (images/s, ETA)."""
    if not tasks:
        return
    from tqdm import tqdm

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    counter = ctx.Value("Q", 0)
    if sys.stderr.isatty() or not progress:
        bar = tqdm(total=total, initial=initial, unit="img", disable=not progress, smoothing=0.05,
                   dynamic_ncols=True, desc="convert")
    else:  # a log file or a pipe: lines, not a bar's carriage returns
        bar = ProgressLines(total, initial)
    pool = ctx.Pool(max(1, min(workers, len(tasks))), initializer=_init_worker, initargs=(counter,))
    try:
        results = pool.imap_unordered(process_chunk, tasks, chunksize=1)
        remaining, shown = len(tasks), 0
        while remaining:
            try:
                rec = results.next(timeout=0.25)
            except mp.TimeoutError:
                rec = None
            value = counter.value
            bar.update(value - shown)
            shown = value
            if rec is not None:
                remaining -= 1
                yield rec
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        bar.close()


class ProgressLines:
    """The bar's figures as a line every :data:`STEP` of the images (to stderr): what a redirected
    conversion (``2> convert.log``, a Slurm job's log) shows instead of a bar's ``\\r`` updates."""

    STEP = 0.05

    def __init__(self, total: int, initial: int):
        self.total, self.done, self.start, self.first = total, initial, time.monotonic(), initial
        self.next = initial + max(1, int(total * self.STEP))

    def update(self, n: int) -> None:
        self.done += n
        if self.done < self.next or self.done >= self.total:
            return
        self.next = self.done + max(1, int(self.total * self.STEP))
        rate = (self.done - self.first) / max(time.monotonic() - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"convert: {self.done:,} of {self.total:,} images ({self.done / self.total:.0%}), {rate:,.0f} img/s, "
              f"about {left / 60:.0f} min left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.done > self.first:
            took = time.monotonic() - self.start
            print(f"convert: {self.done:,} of {self.total:,} images, {took:.0f} s", file=sys.stderr, flush=True)


def skip_problems(manifest: dict, max_skip_frac: float) -> list[str]:
    out = []
    for name, s in manifest["splits"].items():
        seen = s["images"] + len(s["skipped"])
        if seen and len(s["skipped"]) / seen > max_skip_frac:
            out.append(f"{name}: skipped {len(s['skipped'])} of {seen} files "
                       f"({100 * len(s['skipped']) / seen:.2f}% > --max-skip-frac {100 * max_skip_frac:g}%); "
                       f"reasons are listed in manifest.json")
    return out

