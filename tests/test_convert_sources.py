"""The three input kinds give the same dataset: a class-folder tree, Kaggle's layout (flat val +
LOC_val_solution.csv), the devkit's ground truth + meta.mat, and the original ILSVRC2012 tars
(a tar of per-class tars, read by byte ranges without extracting). Same files in -> byte-identical
shards and beton out."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.convert_tree import CLASSES, build_tree, manifest, run_tool, shard_samples

ARGS = ("--workers", "2", "--shard-size", "4", "--max-skip-frac", "0.5")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Folder tree with two bad train files, and its conversion (the expected result)."""
    base = tmp_path_factory.mktemp("sources")
    src = build_tree(base / "folders", per_class=2, val_per_class=2, odd=False)
    (src / "train" / CLASSES[0] / "zz_truncated.JPEG").write_bytes(
        (src / "train" / CLASSES[1] / f"{CLASSES[1]}_train_0.JPEG").read_bytes()[:300])
    (src / "train" / CLASSES[2] / "zz_empty.JPEG").write_bytes(b"")
    run_tool(src, base / "folders_out", *ARGS)
    return base, src


def _val_truth(src: Path) -> list[tuple[str, Path, str]]:
    """(flat name, source file, synset) for every val image, flat names in ImageNet style."""
    files = sorted((src / "val").rglob("*.JPEG"), key=lambda p: p.name)
    return [(f"ILSVRC2012_val_{i:08d}.JPEG", p, p.parent.name) for i, p in enumerate(files, start=1)]


def _flatten_val(src: Path, dst: Path) -> list[tuple[str, Path, str]]:
    truth = _val_truth(src)
    dst.mkdir(parents=True)
    for name, p, _ in truth:
        shutil.copy(p, dst / name)
    return truth


def _same_content(a: Path, b: Path, split: str) -> None:
    ma, mb = manifest(a)["splits"][split], manifest(b)["splits"][split]
    for k in ("images", "classes", "class_counts", "labels_sha256"):
        assert ma[k] == mb[k], k
    assert [lab for *_, lab in shard_samples(a, split)] == [lab for *_, lab in shard_samples(b, split)]
    assert ma["ffcv"]["sha256"] == mb["ffcv"]["sha256"]


def _labels_by_source(out: Path, split: str) -> dict[bytes, int]:
    return {jpeg: lab for _, jpeg, lab in shard_samples(out, split)}


def test_kaggle_layout_flat_val_with_csv(tree):
    base, src = tree
    kaggle = base / "kaggle"
    cls_loc = kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(src / "train", cls_loc / "train")
    truth = _flatten_val(src, cls_loc / "val")
    rows = ["ImageId,PredictionString"] + [f"{n[:-5]},{syn} 1 2 30 40 {syn} 5 6 70 80" for n, _, syn in reversed(truth)]
    (kaggle / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (cls_loc / "val" / "ILSVRC2012_val_99999999.JPEG").write_bytes(truth[0][1].read_bytes())  # no label
    run_tool(kaggle, base / "kaggle_out", *ARGS)
    _same_content(base / "folders_out", base / "kaggle_out", "train")
    val = manifest(base / "kaggle_out")["splits"]["val"]
    assert val["source_kind"] == "flat" and val["images"] == len(truth)
    assert val["skipped"] == [{"path": "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_99999999.JPEG",
                               "reason": "no label for this file in the label file"}]
    # same images, same labels as the class-folder val (order is class-major in both)
    assert _labels_by_source(base / "kaggle_out", "val") == _labels_by_source(base / "folders_out", "val")
    # the reference pipeline reads the flat val folder through the item list, in storage order
    from pipelines.reference import ReferencePipeline
    ref = ReferencePipeline(str(base / "kaggle_out"), "val", batch_size=4, res=32, workers=0)
    assert [lab for _, lab in ref.dataset.samples] == [lab for *_, lab in shard_samples(base / "kaggle_out", "val")]
    assert all(Path(p).parent == cls_loc / "val" for p, _ in ref.dataset.samples)
    assert sum(len(b.labels) for b in ref) == len(truth)


def _meta_mat(path: Path, leaf_ids: dict[str, int]) -> None:
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(ident, wnid, f"class {wnid}", 0) for wnid, ident in leaf_ids.items()]
    rows.append((len(rows) + 1, "n00000000", "a non-leaf synset", 3))  # must be ignored
    savemat(path, {"synsets": np.array(rows, dtype=dt).reshape(-1, 1)})


def test_devkit_ground_truth_and_meta_mat(tree):
    base, src = tree
    dev = base / "devkit"
    shutil.copytree(src / "train", dev / "train")
    truth = _flatten_val(src, dev / "val")
    ids = {"n03000003": 1, "n01000001": 2, "n02000002": 3}  # devkit ids are not in sorted order
    gt_dir = dev / "ILSVRC2012_devkit_t12" / "data"
    gt_dir.mkdir(parents=True)
    _meta_mat(gt_dir / "meta.mat", ids)
    (gt_dir / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[s]}\n" for _, _, s in truth))
    run_tool(dev, base / "devkit_out", *ARGS)
    _same_content(base / "folders_out", base / "devkit_out", "val")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_original_archives_read_without_extracting(tree):
    base, src = tree
    arch = base / "archives"
    arch.mkdir()
    with tarfile.open(arch / "ILSVRC2012_img_train.tar", "w") as outer:
        for c in sorted(CLASSES, reverse=True):  # member order must not matter
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for p in sorted((src / "train" / c).iterdir()):
                    _add_bytes(inner, p.name, p.read_bytes())
            _add_bytes(outer, f"{c}.tar", buf.getvalue())
    truth = _val_truth(src)
    with tarfile.open(arch / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, p, _ in truth:
            _add_bytes(tar, name, p.read_bytes())
    # the devkit as shipped: a tar.gz holding data/meta.mat and the ground truth
    ids = {c: i for i, c in enumerate(CLASSES, start=1)}
    _meta_mat(base / "meta.mat", ids)
    with tarfile.open(arch / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", (base / "meta.mat").read_bytes())
        _add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                   "".join(f"{ids[s]}\n" for _, _, s in truth).encode())
    before = sorted(p.name for p in arch.iterdir())
    run_tool(arch, base / "arch_out", *ARGS)
    assert sorted(p.name for p in arch.iterdir()) == before  # nothing extracted next to the tars
    m = manifest(base / "arch_out")["splits"]
    assert m["train"]["source_kind"] == "archive"
    assert m["train"]["images"] == manifest(base / "folders_out")["splits"]["train"]["images"]
    assert sorted(s["reason"][:9] for s in m["train"]["skipped"]) == ["empty fil", "truncated"]
    assert m["train"]["skipped"][0]["path"].startswith("ILSVRC2012_img_train.tar/")
    assert m["train"]["class_counts"] == manifest(base / "folders_out")["splits"]["train"]["class_counts"]
    assert _labels_by_source(base / "arch_out", "train") == _labels_by_source(base / "folders_out", "train")
    assert _labels_by_source(base / "arch_out", "val") == _labels_by_source(base / "folders_out", "val")
    proc = run_tool(arch, base / "arch_out", *ARGS, "--verify")
    assert "verify: ok" in proc.stdout
    from pipelines.base import DataError
    from pipelines.reference import ReferencePipeline
    with pytest.raises(DataError, match="converted from the ILSVRC2012 tars"):  # no source files to read
        ReferencePipeline(str(base / "arch_out"), "train", batch_size=4, res=32, workers=0)


def test_val_only_flat_without_labels_is_a_user_error(tmp_path):
    src = build_tree(tmp_path / "src", per_class=1, val_per_class=1, odd=False)
    shutil.rmtree(src / "val")
    _flatten_val(build_tree(tmp_path / "other", per_class=1, val_per_class=1, odd=False), src / "val")
    proc = run_tool(src, tmp_path / "out", check=False)
    assert proc.returncode == 2 and "--val-labels" in proc.stderr
