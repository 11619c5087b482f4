"""tools/convert_imagenet.py end to end on real photos plus every bad-file kind: counts, labels,
skip reasons, and pixels read back with FFCV's own Loader and DALI's own webdataset reader,
compared with the reference decode (PIL ``Image.open(p).convert('RGB')``) of each source."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers.convert_tree import (CLASSES, JPEG_TOL, ODD_FILES, SIZE, build_tree, manifest,
                                        mean_abs_diff, reference_rgb, run_tool, shard_samples, source_for_key)

N_TRAIN_PHOTOS, N_VAL = 3 * len(CLASSES), 2 * len(CLASSES)
GOOD_ODD = [n for n, why in ODD_FILES.items() if why is None]
BAD_ODD = {n: why for n, why in ODD_FILES.items() if why is not None}
if os.geteuid() != 0:
    BAD_ODD["no_permission.JPEG"] = "unreadable"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("convert")
    src = build_tree(base / "src")
    out = base / "out"
    proc = run_tool(src, out, "--workers", "2", "--shard-size", "4", "--max-skip-frac", "0.5")
    return src, out, proc


def test_manifest_counts_classes_and_skips(converted):
    src, out, proc = converted
    m = manifest(out)
    assert m["source"] == str(src.resolve()) and m["formats"] == ["ffcv", "dali"] and m["version"]
    assert m["settings"]["max_resolution"] == 500 and m["settings"]["jpeg_quality"] == 90
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["classes"] == val["classes"] == sorted(CLASSES)  # index order = sorted synsets
    assert train["images"] == N_TRAIN_PHOTOS + len(GOOD_ODD) and val["images"] == N_VAL
    odd_label = sorted(CLASSES).index(CLASSES[0])
    assert train["class_counts"][odd_label] == 3 + len(GOOD_ODD)
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in train["skipped"]}
    assert set(reasons) == set(BAD_ODD), reasons
    for name, why in BAD_ODD.items():
        assert why in reasons[name], (name, reasons[name])
    assert all(s["path"].startswith(f"train/{CLASSES[0]}/") for s in train["skipped"])
    assert val["skipped"] == []
    # shards: ceil(files / 4) chunks; each listed shard and its index exist
    assert len(train["shards"]) == -(-(N_TRAIN_PHOTOS + len(ODD_FILES) + (len(BAD_ODD) - 5)) // 4)
    for s in train["shards"] + val["shards"]:
        assert (out / s["path"]).is_file() and (out / s["index"]).is_file() and s["index"].endswith(".idx")
    assert (out / "ffcv" / "train.beton").is_file() and (out / "ffcv" / "val.beton").is_file()
    assert not list(out.rglob("*.tmp-*")) and not (out / "ffcv" / ".parts").exists()
    assert "train: 14 images" in proc.stdout


def test_dali_shards_hold_reference_pixels_and_labels(converted):
    src, out, _ = converted
    for split in ("train", "val"):
        samples = shard_samples(out, split)
        assert len(samples) == manifest(out)["splits"][split]["images"]
        assert len({k for k, _, _ in samples}) == len(samples)  # no duplicates
        for key, jpeg, label in samples:
            path = source_for_key(src, split, key)
            assert label == sorted(CLASSES).index(path.parent.name)
            stored = Image.open(__import__("io").BytesIO(jpeg))
            assert stored.format == "JPEG" and stored.mode == "RGB" and not stored.getexif()
            assert mean_abs_diff(np.asarray(stored), reference_rgb(path)) < JPEG_TOL, key
        names = {source_for_key(src, split, k).name for k, _, _ in samples}
        if split == "train":
            assert set(GOOD_ODD) <= names and not set(BAD_ODD) & names
    # train order is shuffled (mixed classes per shard); val keeps ImageFolder's sorted order
    train_labels = [lab for _, _, lab in shard_samples(out, "train")]
    assert train_labels != sorted(train_labels)
    val_labels = [lab for _, _, lab in shard_samples(out, "val")]
    assert val_labels == sorted(val_labels)


def test_rgb_jpeg_sources_are_stored_as_their_own_bytes(converted):
    """An RGB JPEG source (baseline or progressive) within the size cap and without EXIF rotation is
    stored byte for byte in the DALI shard and in the FFCV beton: the decoders see the file timm
    evaluates. CMYK, grey, PNG-named-.JPEG and EXIF-rotated sources are re-encoded (so is anything
    over the cap: test_subset_classes_limit_and_resize). The manifest counts both kinds."""
    from pipelines.convert.ffcv_out import MODE_JPG, read_beton

    src, out, _ = converted
    reencoded = {"cmyk.JPEG", "gray.JPEG", "png_named.JPEG", "exif_rot6.JPEG"}
    for split in ("train", "val"):
        beton = (out / "ffcv" / f"{split}.beton").read_bytes()
        meta, alloc, _ = read_beton(out / "ffcv" / f"{split}.beton")
        samples = shard_samples(out, split)
        passed = 0
        for k, (key, jpeg, _) in enumerate(samples):
            path = source_for_key(src, split, key)
            assert meta["f0"]["mode"][k] == MODE_JPG
            assert beton[int(alloc["ptr"][k]):int(alloc["ptr"][k]) + int(alloc["size"][k])] == jpeg, key
            assert (jpeg == path.read_bytes()) == (path.name not in reencoded), path.name
            passed += path.name not in reencoded
        entry = manifest(out)["splits"][split]
        assert (entry["jpeg_passed_through"], entry["jpeg_reencoded"]) == (passed, len(samples) - passed)
    assert passed == N_VAL and manifest(out)["splits"]["train"]["jpeg_reencoded"] == len(reencoded)


def test_item_list_names_each_stored_image_in_storage_order(converted):
    """items/<split>.tsv: the source file (relative to SRC) and label of every stored sample, in
    the shards' order; skipped files are not listed. The reference pipeline reads exactly these."""
    from pipelines.dataroot import decode_items
    src, out, _ = converted
    for split in ("train", "val"):
        entry = manifest(out)["splits"][split]
        data = (out / entry["items"]["file"]).read_bytes()
        assert entry["items"]["file"] == f"items/{split}.tsv" and entry["items"]["images"] == entry["images"]
        assert entry["items"]["bytes"] == len(data) and entry["items"]["sha256"] == hashlib.sha256(data).hexdigest()
        names, labels = decode_items(data)
        samples = shard_samples(out, split)
        assert names == [str(source_for_key(src, split, k).relative_to(src)) for k, _, _ in samples]
        assert labels == [lab for _, _, lab in samples]
        assert not {n.rsplit("/", 1)[-1] for n in names} & set(BAD_ODD)


def test_odd_inputs_match_reference_decode(converted):
    """CMYK, grayscale, PNG-named-.JPEG (RGBA), progressive and EXIF-rotated files come out as the
    reference loader sees them; the EXIF one is NOT rotated (96x80 stays 96x80)."""
    src, out, _ = converted
    by_name = {source_for_key(src, "train", k).name: (k, jpeg) for k, jpeg, _ in shard_samples(out, "train")}
    for name in GOOD_ODD:
        _, jpeg = by_name[name]
        got = np.asarray(Image.open(__import__("io").BytesIO(jpeg)))
        ref = reference_rgb(src / "train" / CLASSES[0] / name)
        assert got.shape == (SIZE[1], SIZE[0], 3), name
        assert mean_abs_diff(got, ref) < JPEG_TOL, name
    # the check can fail: the unrotated EXIF photo is far from its rotated rendering
    from PIL import ImageOps
    rotated = np.asarray(ImageOps.exif_transpose(Image.open(src / "train" / CLASSES[0] / "exif_rot6.JPEG")).convert("RGB"))
    assert rotated.shape == (SIZE[0], SIZE[1], 3)


def test_ffcv_loader_reads_reference_pixels_and_labels(converted):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    src, out, _ = converted
    for split in ("train", "val"):
        keys = [k for k, _, _ in shard_samples(out, split)]  # beton order == shard order
        loader = Loader(str(out / "ffcv" / f"{split}.beton"), batch_size=64, num_workers=1,
                        order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        images, labels = [], []
        for x, y in loader:
            images.append(np.array(x))
            labels.append(np.array(y).reshape(-1))
        images, labels = np.concatenate(images), np.concatenate(labels)
        assert len(images) == len(keys) == manifest(out)["splits"][split]["images"]
        for img, label, key in zip(images, labels, keys):
            path = source_for_key(src, split, key)
            assert label == sorted(CLASSES).index(path.parent.name)
            assert mean_abs_diff(img, reference_rgb(path)) < JPEG_TOL, key
        # the tolerance is meaningful: neighbouring samples are other photos
        assert mean_abs_diff(images[0], reference_rgb(source_for_key(src, split, keys[1]))) > 4 * JPEG_TOL


def test_dali_webdataset_reader_reads_reference_pixels(converted):
    from nvidia.dali import fn, pipeline_def, types

    src, out, _ = converted
    m = manifest(out)["splits"]["train"]
    tars = [str(out / s["path"]) for s in m["shards"]]
    idxs = [str(out / s["index"]) for s in m["shards"]]
    keys = [k for k, _, _ in shard_samples(out, "train")]

    @pipeline_def(batch_size=len(keys), num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls"], random_shuffle=False)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    images, cls = p.run()
    assert len(images) == len(keys)
    for i, key in enumerate(keys):
        path = source_for_key(src, "train", key)
        assert int(bytes(np.array(cls[i])).decode()) == sorted(CLASSES).index(path.parent.name)
        img = np.array(images[i])
        assert img.shape == (SIZE[1], SIZE[0], 3), key  # DALI did not apply EXIF rotation either
        assert mean_abs_diff(img, reference_rgb(path)) < JPEG_TOL, key


def test_rerun_is_a_noop_and_verify_passes(converted):
    src, out, _ = converted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".convert" not in p.parts}
    proc = run_tool(src, out, "--workers", "2", "--shard-size", "4", "--max-skip-frac", "0.5", "--verify")
    assert "already complete" in proc.stdout and "verify: ok" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".convert" not in p.parts}
    assert before == after


def test_verify_catches_damaged_outputs(converted, tmp_path):
    src, out, _ = converted
    cases = {
        "shard": lambda o: _flip(o / manifest(o)["splits"]["train"]["shards"][1]["path"], 700),
        "beton": lambda o: _flip(o / "ffcv" / "val.beton", manifest(o)["splits"]["val"]["ffcv"]["page_size"] + 300),
        "missing": lambda o: (o / manifest(o)["splits"]["val"]["shards"][0]["path"]).unlink(),
        "index": lambda o: _edit_index(o / manifest(o)["splits"]["train"]["shards"][0]["index"]),
        "labels": lambda o: _relabel_manifest(o),
        "items": lambda o: _flip(o / "items" / "val.tsv", 3),
    }
    for name, damage in cases.items():
        copy = tmp_path / name
        shutil.copytree(out, copy, symlinks=True)
        m = manifest(copy)  # the copy's source is the same, so the run is "already complete"
        damage(copy)
        proc = run_tool(src, copy, "--workers", "2", "--shard-size", "4", "--max-skip-frac", "0.5", "--verify",
                        check=False)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert "verify: FAILED" in proc.stdout, name
        expect = {"shard": "shard-00001.tar", "beton": "val.beton", "missing": "missing", "index": "does not match",
                  "labels": "label sequence differs", "items": "items/val.tsv"}[name]
        assert expect in proc.stderr, (name, proc.stderr)
        assert m["splits"]["train"]["images"] == manifest(copy)["splits"]["train"]["images"] or name == "labels"


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_index(path):
    lines = path.read_text().splitlines()
    f = lines[1].split()
    f[1] = str(int(f[1]) + 512)
    lines[1] = " ".join(f)
    path.write_text("\n".join(lines) + "\n")


def _relabel_manifest(out):
    m = manifest(out)
    m["splits"]["train"]["labels_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))


def test_too_many_skips_exit_1_but_outputs_written(tmp_path):
    src = build_tree(tmp_path / "src", per_class=1, val_per_class=1)
    proc = run_tool(src, tmp_path / "out", "--workers", "1", check=False)  # default --max-skip-frac 0.001
    assert proc.returncode == 1
    assert "train: skipped" in proc.stderr and "max-skip-frac" in proc.stderr
    assert manifest(tmp_path / "out")["splits"]["val"]["images"] == len(CLASSES)


def test_subset_classes_limit_and_resize(tmp_path):
    """--classes re-indexes over the subset; --limit-per-class keeps the first N sorted files;
    --max-resolution caps the longest side (area filter); ffcv-only raw mode stores exact pixels."""
    from pipelines.convert.decode import resize_to_fit

    src = build_tree(tmp_path / "src", per_class=3, val_per_class=1, odd=False)
    out = tmp_path / "out"
    wanted = sorted(CLASSES)[1:]
    run_tool(src, out, "--classes", ",".join(reversed(wanted)), "--limit-per-class", "2", "--formats", "dali",
             "--max-resolution", "48", "--workers", "1")
    m = manifest(out)["splits"]["train"]
    assert m["classes"] == wanted and m["class_counts"] == [2, 2] and "ffcv" not in m
    for key, jpeg, label in shard_samples(out, "train"):
        path = source_for_key(src, "train", key)
        assert path.name.endswith(("_0.JPEG", "_1.JPEG")) and label == wanted.index(path.parent.name)
        got = np.asarray(Image.open(__import__("io").BytesIO(jpeg)))
        ref = np.asarray(resize_to_fit(Image.open(path).convert("RGB"), 48))
        assert got.shape == (40, 48, 3) and mean_abs_diff(got, ref) < JPEG_TOL
        assert jpeg != path.read_bytes()  # resized: re-encoded
    # val has no size cap unless --val-max-resolution says so: timm evaluates the original files
    for key, jpeg, _ in shard_samples(out, "val"):
        assert jpeg == source_for_key(src, "val", key).read_bytes()
    m = manifest(out)["splits"]
    assert (m["train"]["jpeg_reencoded"], m["train"]["jpeg_passed_through"]) == (4, 0)
    assert (m["val"]["jpeg_reencoded"], m["val"]["jpeg_passed_through"]) == (0, 2)

    raw = tmp_path / "raw"
    run_tool(src, raw, "--formats", "ffcv", "--write-mode", "raw", "--workers", "1", "--splits", "val")
    from ffcv.reader import Reader
    r = Reader(str(raw / "ffcv" / "val.beton"))
    assert set(r.metadata["f0"]["mode"]) == {1} and r.num_samples == len(CLASSES)
    for i, val_file in enumerate(sorted((src / "val").rglob("*.JPEG"))):
        ptr, size = int(r.alloc_table["ptr"][i]), int(r.alloc_table["size"][i])
        with open(raw / "ffcv" / "val.beton", "rb") as f:
            f.seek(ptr)
            pixels = np.frombuffer(f.read(size), np.uint8).reshape(SIZE[1], SIZE[0], 3)
        assert np.array_equal(pixels, reference_rgb(val_file))  # raw: bit-exact reference pixels
        assert r.metadata["f1"][i] == i


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "{out}"], "source folder not found"),
    (["{src}", "{out}", "--formats", "ffcv,tfrecord"], "--formats: tfrecord is not one of ffcv, dali"),
    (["{src}", "{out}", "--classes", "n01000009"], "did you mean n01000001?"),
    (["{src}", "{out}", "--jpeg-quality", "0"], "--jpeg-quality must be in 1..100"),
    (["{empty}", "{out}"], "found neither train/ and val/ folders"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, argv, message):
    src = build_tree(tmp_path / "src", per_class=1, val_per_class=1, odd=False)
    (tmp_path / "empty").mkdir()
    fill = {"src": src, "out": tmp_path / "out", "missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    from tests.helpers.cli import run_main
    from tools.convert_imagenet import main
    proc = run_main(main, [*[a.format(**fill) for a in argv], "--quiet"])  # in process: the same main
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_changed_settings_on_same_out_refused(tmp_path):
    src = build_tree(tmp_path / "src", per_class=1, val_per_class=1, odd=False)
    run_tool(src, tmp_path / "out", "--formats", "dali", "--workers", "1")
    proc = run_tool(src, tmp_path / "out", "--formats", "dali", "--jpeg-quality", "80", "--workers", "1", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    run_tool(src, tmp_path / "out", "--formats", "dali", "--jpeg-quality", "80", "--workers", "1", "--overwrite")
    assert manifest(tmp_path / "out")["settings"]["jpeg_quality"] == 80


def test_progress_into_a_log_is_lines_not_carriage_returns(tmp_path):
    """Before: tqdm's bar wrote its \\r updates into a redirected stderr (a log file, a Slurm job's log)."""
    import subprocess
    import sys

    from tests.helpers.convert_tree import TOOL

    src = build_tree(tmp_path / "src", per_class=8, val_per_class=2, odd=False)
    proc = subprocess.run([sys.executable, str(TOOL), str(src), str(tmp_path / "out"), "--workers", "1",
                           "--shard-size", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("convert: ")]
    assert lines and all(" images" in ln for ln in lines) and len(lines) <= 2 * 21, proc.stderr
    assert any("%)" in ln and "img/s" in ln for ln in lines) and lines[-1].endswith(" s")
