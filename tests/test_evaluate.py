"""tools/evaluate.py: reproduces the engine's own final val top-1 exactly (training checkpoint with
EMA weights, and the safetensors export), flip TTA, ImageNet-V2 class-index folders, one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.engine_runs import evaluate

ROOT = Path(__file__).resolve().parents[1]


def evaluate_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def last_eval(run: Path) -> dict:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_top1" in r][-1]


def test_checkpoint_and_export_reproduce_the_engines_top1_exactly(tiny_runs, tmp_path):
    run = tiny_runs["ema"]
    engine = last_eval(run)
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    for weights, run_it in ((ckpt, evaluate_script), (run / "model.safetensors", evaluate)):
        out = tmp_path / f"{weights.stem}.json"
        proc = run_it(weights, "--json", out)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(out.read_text())
        assert (got["val_top1"], got["val_top5"], got["val_images"]) == \
            (engine["val_top1"], engine["val_top5"], engine["val_images"])
        assert got["val_loss"] == pytest.approx(engine["val_loss"], rel=1e-6)
        assert f"top-1 {engine['val_top1']:.2f}" in proc.stdout
    # data that is not there: one line, exit 2
    plain = evaluate(sorted(tiny_runs["plain"].glob("ckpt-*.pt"))[-1], "--data", tiny_runs["ema"] / "unused")
    assert plain.returncode == 2 and "no class-folder tree" in plain.stderr


def test_flip_tta_and_an_other_resolution_change_the_result(tiny_runs, tmp_path):
    run = tiny_runs["plain"]
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    base, tta, big = (json.loads((tmp_path / f"{n}.json").read_text()) if evaluate(ckpt, *a, "--json",
                      tmp_path / f"{n}.json").returncode == 0 else pytest.fail(n)
                      for n, a in (("base", ()), ("tta", ("--flip-tta",)), ("big", ("--res", "48"))))
    assert tta["flip_tta"] and base["val_images"] == tta["val_images"] == big["val_images"]
    assert tta["val_loss"] != base["val_loss"] and big["val_loss"] != base["val_loss"]
    assert big["res"] == 48


def test_imagenet_v2_class_index_folders(tiny_runs, fmnist_tree, tmp_path):
    """Folders named by class index (12 of them, so '10' and '11' sort before '2' as strings) map to
    int(name); the same images as the named tree give the same top-1 as the named-folder eval."""
    run = tiny_runs["plain"]
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    v2 = tmp_path / "v2"
    for c in range(10):
        shutil.copytree(fmnist_tree / "val" / f"c{c}", v2 / str(c))
    (v2 / "11").mkdir()  # an empty class folder: indices stay int(name), not positions
    named = evaluate(ckpt, "--json", tmp_path / "named.json")
    byindex = evaluate(ckpt, "--data", v2, "--imagenet-v2", "--json", tmp_path / "v2.json")
    assert named.returncode == 0 and byindex.returncode == 0, byindex.stderr
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("named.json", "v2.json"))
    assert (a["val_top1"], a["val_top5"], a["val_images"]) == (b["val_top1"], b["val_top5"], b["val_images"])
    # without the flag the tree is read as named class folders: the empty one is an error, one line
    wrong = evaluate(ckpt, "--data", v2)
    assert wrong.returncode == 2 and "classes 11" in wrong.stderr and wrong.stderr.count("\n") == 1
    # the flag is never ignored: a data root holding the class-index tree as val/ is read by index ...
    shutil.copytree(v2, tmp_path / "root" / "val")
    under_val = evaluate(ckpt, "--data", tmp_path / "root", "--imagenet-v2", "--json", tmp_path / "root.json")
    c = json.loads((tmp_path / "root.json").read_text())
    assert under_val.returncode == 0 and (c["val_top1"], c["val_images"]) == (b["val_top1"], b["val_images"])
    # ... and one whose val/ has named class folders is refused, not evaluated as if the flag were not there
    named_root = evaluate(ckpt, "--data", fmnist_tree, "--imagenet-v2")
    assert named_root.returncode == 2 and named_root.stderr.count("\n") == 1, named_root.stderr
    assert "class-index folders expected" in named_root.stderr and "'c0'" in named_root.stderr


def test_class_index_folders_label_by_number_not_by_sorted_name(fmnist_tree, tmp_path):
    from pipelines.reference import ReferencePipeline

    tree = tmp_path / "v2"
    for k in range(12):
        (tree / str(k)).mkdir(parents=True)
        shutil.copy(next((fmnist_tree / "val" / "c0").iterdir()), tree / str(k) / f"img{k}.jpg")
    by_index = ReferencePipeline(str(tmp_path), "val", batch_size=12, res=32, workers=0, split_dir=tree,
                                 class_index_folders=True)
    by_name = ReferencePipeline(str(tmp_path), "val", batch_size=12, res=32, workers=0, split_dir=tree)
    folder_of = [int(Path(p).parent.name) for p, _ in by_index.dataset.samples]
    assert [label for _, label in by_index.dataset.samples] == folder_of
    assert [label for _, label in by_name.dataset.samples] != folder_of  # "10" sorts before "2"
    assert by_index.num_classes == 12


@pytest.mark.parametrize("args, message", [
    (("missing.pt",), "not found"),
    (("{bogus}",), "bogus.pt is not a checkpoint: it is a text file (it starts 'not a checkpoint')"),
    (("{cut}",), "does not end like one (truncated, or another kind of file)\n"),  # a zip cut short: truncated
    (("{text_export}",), "notes.safetensors is not a checkpoint: it is a text file"),
    (("{ckpt}", "--recipe", "recipes/a3.toml"), "weights do not fit model.arch=resnet50 with 1000 classes: layer1.0.conv1.weight is [32, 64, 3, 3] in the "
     "file, [64, 64, 1, 1] in the model; pass the recipe the run used with --recipe (or none: the file's own config)\n"),
    (("{ckpt}", "--imagenet-v2", "--pipeline", "ffcv"), "--pipeline reference"),
])
def test_user_errors_are_one_line(tiny_runs, tmp_path, args, message):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    ckpt = sorted(tiny_runs["plain"].glob("ckpt-*.pt"))[-1]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    text_export = tmp_path / "notes.safetensors"
    text_export.write_text("# my notes\n")
    proc = evaluate(*(a.format(bogus=bogus, ckpt=ckpt, cut=cut, text_export=text_export) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "weights_only=False" not in proc.stderr, proc.stderr
