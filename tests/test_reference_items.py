"""ReferencePipeline on a converted data root: it reads exactly the converter's item list (a
``--classes`` subset, no skipped files), survives source images damaged after conversion (slot
reused, ``Batch.skipped``, one warning per path), and its DataLoader workers ignore SIGINT/SIGTERM."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipelines.base import DataError
from pipelines.convert.convert import Settings, convert
from pipelines.dataroot import decode_items
from pipelines.reference import ReferencePipeline, _Folder
from tests.helpers.fmnist import write_fmnist_tree
from tests.helpers.convert_tree import shard_samples

SUBSET = ("c1", "c3", "c5", "c7", "c9")  # every other class: labels must be re-indexed to 0..4
SETTINGS = Settings(formats=("dali",), classes=SUBSET, shard_size=16)
WARNING = "warning: skipped unreadable image"


def _convert(src: Path, out: Path, settings: Settings) -> dict:
    return convert(src, out, settings, workers=1, progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """10 classes x 8 train / 4 val, converted with 5 of them; odd files in c1 and c3."""
    base = tmp_path_factory.mktemp("subset")
    src = write_fmnist_tree(base / "src", 8, 4)
    (src / "train" / "c1" / "notes.jpg").write_text("not an image\n")  # the converter skips it
    shutil.copy(src / "train" / "c3" / "00000.jpg", src / "train" / "c3" / "tab\tname.jpg")  # listed fine
    shutil.copy(src / "train" / "c3" / "00000.jpg", src / "train" / "c3" / "line\nbreak.jpg")  # cannot be
    return src, base / "out", _convert(src, base / "out", SETTINGS)


def test_subset_conversion_reads_exactly_the_converted_items(subset):
    src, out, manifest = subset
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        p = ReferencePipeline(str(out), split, batch_size=4, res=32, workers=0)
        assert p.num_classes == 5 and p.classes == list(SUBSET) == entry["classes"]
        assert p.num_samples == entry["images"] == sum(entry["class_counts"])
        labels = [label for _, label in p.dataset.samples]
        assert Counter(labels) == {k: n for k, n in enumerate(entry["class_counts"])}
        # storage order: the DALI shards hold the same label sequence
        assert labels == [label for _, _, label in shard_samples(out, split)]
        names, listed = decode_items((out / entry["items"]["file"]).read_bytes())
        assert [path for path, _ in p.dataset.samples] == [str(src / n) for n in names] and listed == labels
        seen = torch.cat([b.labels for b in p])
        assert set(seen.tolist()) <= set(range(5)) and not any(b.skipped for b in p)
    train = [Path(p).relative_to(src) for p, _ in ReferencePipeline(str(out), "train", batch_size=4, res=32,
                                                                   workers=0).dataset.samples]
    assert {c.parts[1] for c in train} == set(SUBSET)
    assert Path("train/c3/tab\tname.jpg") in train and Path("train/c1/notes.jpg") not in train
    assert not any("\n" in str(c) for c in train)
    reasons = {s["path"]: s["reason"] for s in manifest["splits"]["train"]["skipped"]}
    assert "not an image" in reasons["train/c1/notes.jpg"] and "line break" in reasons["train/c3/line\nbreak.jpg"]
    assert manifest["splits"]["train"]["images"] == 5 * 8 + 1


def _copy_root(out: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_without_item_list_falls_back_with_one_warning(subset, tmp_path, capsys):
    src, out, _ = subset

    def old(m):
        for entry in m["splits"].values():
            del entry["items"]

    root = _copy_root(out, tmp_path / "old", old)
    p = ReferencePipeline(str(root), "train", batch_size=4, res=32, workers=0)
    assert p.num_classes == 10  # the whole source tree, as before item lists
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "rerun the converter" in lines[0]


def test_archive_conversion_is_a_one_line_error(subset, tmp_path):
    def tars(m):
        m["splits"]["train"]["source_kind"] = "archive"

    root = _copy_root(subset[1], tmp_path / "tars", tars)
    with pytest.raises(DataError, match="ILSVRC2012 tars") as e:
        ReferencePipeline(str(root), "train", batch_size=4, res=32, workers=0)
    assert "\n" not in str(e.value)


def test_rerun_adds_item_lists_to_an_older_conversion(subset, tmp_path):
    src, out, manifest = subset
    old = tmp_path / "old"
    shutil.copytree(out, old)
    m = json.loads((old / "manifest.json").read_text())
    for entry in m["splits"].values():
        del entry["items"]
    m["format"] = 1
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "items")
    got = _convert(src, old, SETTINGS)
    assert got["splits"]["train"]["items"] == manifest["splits"]["train"]["items"]
    for split in ("train", "val"):
        assert (old / "items" / f"{split}.tsv").read_bytes() == (out / "items" / f"{split}.tsv").read_bytes()


# ---------------------------------------------------------------- damaged source files

@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """5 classes x 8 train / 4 val, converted, then three train files and one val file damaged."""
    base = tmp_path_factory.mktemp("damaged")
    src = write_fmnist_tree(base / "src", 8, 4, classes=5)
    _convert(src, base / "out", Settings(formats=("dali",), shard_size=16))
    bad = {"train": [src / "train" / "c0" / "00001.jpg", src / "train" / "c2" / "00003.jpg",
                     src / "train" / "c4" / "00005.jpg"], "val": [src / "val" / "c1" / "00002.jpg"]}
    data = bad["train"][0].read_bytes()
    bad["train"][0].write_bytes(data[: len(data) // 2])  # truncated
    bad["train"][1].write_text("<html>404</html>\n")  # replaced by text
    bad["train"][2].unlink()  # deleted
    data = bad["val"][0].read_bytes()
    bad["val"][0].write_bytes(data[: len(data) // 2])
    return base / "out", {k: {str(p) for p in v} for k, v in bad.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_replaced_reported_and_warned_once(damaged, workers, capsys):
    out, bad = damaged
    for split, batch_size in (("train", 4), ("val", 4)):
        p = ReferencePipeline(str(out), split, batch_size=batch_size, res=32, workers=workers)
        for epoch in range(2):
            p.set_epoch(epoch)
            batches = list(p)
            assert len(batches) == len(p) and all(b.images.shape[0] == batch_size for b in batches)
            assert sum(len(b.labels) for b in batches) == p.num_samples  # 40 train, 20 val: no partial batch
            assert {path for b in batches for path, _ in b.skipped} == bad[split]
            for b in (b for b in batches if b.skipped):
                rows = [(bytes(x.contiguous().numpy()), int(y)) for x, y in zip(b.images, b.labels)]
                # a failed slot holds another image of the batch, with that image's label
                assert len(set(rows)) == batch_size - len(b.skipped)
                assert len({x for x, _ in rows}) == len(set(rows))
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(WARNING)]
        assert sorted(line.split()[4] for line in lines) == sorted(bad[split])  # once per path, both epochs


def test_batch_with_no_readable_image_is_a_one_line_error(tmp_path):
    for i in range(2):
        (tmp_path / "val" / "c0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "val" / "c0" / f"{i}.jpg").write_text("not an image\n")
    p = ReferencePipeline(str(tmp_path), "val", batch_size=2, res=32, workers=0)
    with pytest.raises(DataError, match="no image of a batch") as e:
        list(p)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- worker signals

class _SignalsItself(_Folder):
    """Each DataLoader worker sends SIGTERM, SIGINT and SIGUSR2 to itself before its first image, as
    a ``kill -- -PGID``, a Ctrl-C to the process group or Slurm's early signal to a job step would."""

    signalled = False

    def __getitem__(self, item):
        if not _SignalsItself.signalled:
            _SignalsItself.signalled = True  # per worker: each has its own copy of the class
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGUSR2)
        return super().__getitem__(item)


def test_workers_ignore_sigterm_sigint_and_sigusr2(damaged):
    out, _ = damaged
    p = ReferencePipeline(str(out), "train", batch_size=4, res=32, workers=2)
    p.dataset.__class__ = _SignalsItself
    assert sum(len(b.labels) for b in p) == p.num_samples  # no "DataLoader worker killed by signal"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the main process's handlers untouched


EXIT_WITH_LIVE_WORKERS = textwrap.dedent("""
    import signal, sys
    from pipelines.reference import ReferencePipeline
    signal.signal(signal.SIGTERM, lambda *a: None)  # as the engine's stop handler does
    it = iter(ReferencePipeline(sys.argv[1], "train", batch_size=4, res=32, workers=2))
    next(it)
    print("ok", flush=True)
""")  # exits with the loader's workers alive: multiprocessing terminates (SIGTERM) and joins them


GROUP_SIGNALS_THEN_A_NEW_LOADER = textwrap.dedent("""
    import os, signal, sys, time
    from pipelines.reference import ReferencePipeline
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR2):  # as the engine's stop handlers do
        signal.signal(s, lambda n, f: got.append(n))
    train = ReferencePipeline(sys.argv[1], "train", batch_size=4, res=32, workers=2)
    n = sum(len(b.labels) for b in train)
    for s in (signal.SIGUSR2, signal.SIGTERM):
        os.killpg(0, s)  # the whole group: the forkserver, the resource tracker, the workers
    time.sleep(0.5)
    val = ReferencePipeline(sys.argv[1], "val", batch_size=4, res=32, workers=2)  # needs the forkserver
    print(n == train.num_samples, sum(len(b.labels) for b in val) == val.num_samples, len(got), flush=True)
""")


def test_group_signals_spare_the_forkserver_and_the_resource_tracker(damaged):
    """Slurm's early signal and SIGTERM reach every process of a job step: the loader's helper
    processes must outlive them (a val loader made after them starts its workers), and say nothing."""
    out, _ = damaged
    proc = subprocess.run([sys.executable, "-c", GROUP_SIGNALS_THEN_A_NEW_LOADER, str(out)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    assert proc.returncode == 0 and proc.stdout == "True True 2\n", proc.stdout + proc.stderr[-3000:]
    assert "resource_tracker" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_main_process_still_ends_its_workers_at_exit(damaged):
    out, _ = damaged
    proc = subprocess.run([sys.executable, "-c", EXIT_WITH_LIVE_WORKERS, str(out)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr[-2000:]


KILLED_WITH_LIVE_WORKERS = textwrap.dedent("""
    import os, signal, sys
    from pipelines.reference import ReferencePipeline
    it = iter(ReferencePipeline(sys.argv[1], "train", batch_size=4, res=32, workers=2))
    next(it)
    print("ok", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, kill -9: no shutdown of anything
""")


def test_workers_and_the_forkserver_end_when_the_main_process_is_killed(damaged):
    """Before: a forkserver's workers are the server's children, so torch's parent check never fired,
    and they held the server's pipe open, so the server lived on too: both outlived a kill -9 of the
    training process for good, holding its stdout and stderr (a caller reading them never saw EOF)."""
    out, _ = damaged
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WITH_LIVE_WORKERS, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
                            start_new_session=True)
    stdout, _ = proc.communicate(timeout=60)  # EOF on both pipes: every process that held them has ended
    assert proc.returncode == -signal.SIGKILL and stdout == "ok\n"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _session_members(proc.pid):
        time.sleep(0.1)
    assert not _session_members(proc.pid)


def _session_members(sid: int) -> list[int]:
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc_dir.name)) == sid:
                found.append(int(proc_dir.name))
        except OSError:
            continue
    return found
