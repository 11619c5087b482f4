"""The fault cases (what a multi-day run meets), shared by tests/test_faults.py and the benchmark
that records them all (benchmarks/faults.py, which lists the cases): each runs the real CLI on a
small real data set and returns a row (case, expected, observed, ok)."""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.helpers.engine_runs import TINY as ENGINE_TINY
from tests.helpers.engine_runs import metrics

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# the engine tests' tiny run (tests/helpers/engine_runs.py) with DataLoader workers, whose signal handling
# these cases are about, and no progress bar; the pipeline is each case's own (engine_cmd)
TINY = [s for s in ENGINE_TINY if s.split("=")[0] not in ("data.pipeline", "data.workers")] + \
    ["data.workers=2", "log.progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class Row:
    case: str
    expected: str
    observed: str
    ok: bool | None  # None: skipped

    @property
    def verdict(self) -> str:
        return "skip" if self.ok is None else ("pass" if self.ok else "FAIL")


def make_data(base: Path) -> Path:
    """A Fashion-MNIST tree (64 train / 16 val images per class, 32 px JPEGs), converted to FFCV
    and DALI: ``base/conv``; the source tree is ``base/src``."""
    from pipelines.convert.demo_data import make_demo_tree

    conv = base / "conv"
    if not (conv / "manifest.json").is_file():
        make_demo_tree(base / "src", size=32, train_per_class=64, val_per_class=16, workers=2)
        run([PY, "tools/convert_imagenet.py", str(base / "src"), str(conv), "--formats", "ffcv,dali", "--quiet",
             "--shard-size", "64"], check=True)
    return conv


def engine_cmd(data: Path, out: Path, *sets: str, pipeline: str = "reference", nproc: int = 0,
               port: int = 29620, args: tuple[str, ...] = ()) -> list[str]:
    allsets = [f"data.root={data}", f"data.pipeline={pipeline}", *TINY, *sets]
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)] \
        if nproc else [PY]
    return launcher + ["-m", "engine.run", "recipes/a3.toml", "--out", str(out), *args] + \
        [a for s in allsets for a in ("--set", s)]


def run(cmd: list[str], check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exit {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_record_per_step(out: Path) -> bool:
    keys = [(r["step"], "val_top1" in r) for r in metrics(out)]
    return len(keys) == len(set(keys))


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r.get("step", 0) >= step and "train_loss" in r for r in metrics(out)):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------- cases
class Faults:
    """The cases, sharing one work folder, one data set and the uninterrupted reference runs."""

    def __init__(self, work: Path):
        self.work = work
        self.data = make_data(work / "data")
        self._full: dict[tuple, dict] = {}
        self._finished: Path | None = None  # the plain single-process run's folder, copied by the cases

    def full(self, pipeline: str = "reference", nproc: int = 0, *sets: str) -> dict[str, torch.Tensor]:
        """Weights of an uninterrupted run with these settings (run once)."""
        key = (pipeline, nproc, sets)
        if key not in self._full:
            out = self.work / f"full-{pipeline}-{nproc}-{abs(hash(sets)) % 10**6}"
            run(engine_cmd(self.data, out, *sets, pipeline=pipeline, nproc=nproc, port=29650), check=True)
            self._full[key] = weights(out)
            self._finished = self._finished or (out if key == ("reference", 0, ()) else None)
        return self._full[key]

    def kill9(self, points: int = 5, seed: int = 0) -> Row:
        """kill -9 at random steps of a 2-epoch run (20 steps), each followed by --resume auto."""
        full = self.full("reference", 0, "checkpoint.every_minutes=1e-9")
        rng = random.Random(seed)
        steps = sorted(rng.sample(range(2, 19), points))
        bad = []
        for k in steps:
            out = self.work / f"kill9-{k}"
            proc = subprocess.Popen(engine_cmd(self.data, out, "checkpoint.every_minutes=1e-9"), cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            reached = _wait_for_step(out, k, proc)
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere: in a step, a checkpoint write, a log line
            proc.kill()
            proc.wait()
            resumed = run(engine_cmd(self.data, out, "checkpoint.every_minutes=1e-9", args=("--resume", "auto")))
            same = resumed.returncode == 0 and identical(weights(out), full)
            single = one_record_per_step(out)
            if not (reached and same and single):
                bad.append(f"step {k}: reached={reached} exit={resumed.returncode} weights "
                           f"{'identical' if same else 'DIFFER'}, one record per step: {single} "
                           f"{error_lines(resumed.stderr)[:1]}")
        return Row(f"kill -9 at {points} random points (after the log of steps {', '.join(map(str, steps))} plus "
                   "0-0.4 s), then --resume auto",
                   "final weights bit-identical to an uninterrupted run; one metrics record per step",
                   "all identical" if not bad else "; ".join(bad), not bad)

    # the reference 2-rank cases' recipe, their uninterrupted run shared: 20 eval batches per rank (a stop during
    # an evaluation meets the ranks' agreement, every 8 batches) and a checkpoint at every log point
    TWO_RANKS = ("eval.batch_size=4", "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=20")

    def sigterm(self, pipeline: str = "reference") -> Row:
        """torchrun, 2 ranks: SIGTERM to the process group in the middle of epoch 1; every backend
        (FFCV's crops come from a counter-based generator, pipelines/counter_rng.py) must resume
        to the uninterrupted run's weights."""
        exact = True
        sets = self.TWO_RANKS if pipeline == "reference" else ()
        full = self.full(pipeline, 2, *sets)
        out = self.work / f"sigterm-{pipeline}"
        proc = subprocess.Popen(engine_cmd(self.data, out, *sets, pipeline=pipeline, nproc=2, port=29660), cwd=ROOT,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        reached = _wait_for_step(out, 13, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        ckpts = sorted(p.name for p in out.glob("ckpt-*.pt"))
        tags = [torch.load(out / n, weights_only=True)["tag"] for n in ckpts]
        stops = [ln for ln in stderr.splitlines() if ln.startswith("stopped by SIGTERM")]
        worker_crash = "DataLoader worker" in stderr
        resumed = run(engine_cmd(self.data, out, *sets, pipeline=pipeline, nproc=2, port=29661,
                                 args=("--resume", "auto")))
        stop_step = int(ckpts[-1].split("-s")[1][:-3]) if ckpts else -1
        continued = f", step {stop_step}\n" in resumed.stdout + resumed.stderr and one_record_per_step(out)
        same = resumed.returncode == 0 and (identical(weights(out), full) if exact else continued)
        ok = (reached and tags.count("interrupted") == 1 and len(stops) == 1 and "(exit 143)" in stops[0]
              and not worker_crash and same and "final val top-1" not in stdout and one_record_per_step(out))
        observed = (f"{len(stops)} stop line ({stops[0] if stops else '-'}), checkpoints {tags}, "
                    f"torchrun's own exit {proc.returncode}, DataLoader worker "
                    f"crash: {'yes' if worker_crash else 'no'}; resumed exit {resumed.returncode}, "
                    + f"weights {'identical' if same else 'DIFFER'} to an uninterrupted torchrun run")
        return Row(f"torchrun 2 ranks ({pipeline}): SIGTERM to the process group mid-epoch, then --resume auto",
                   "one stop line, one 'interrupted' checkpoint at a step all ranks agree on, no worker crash; "
                   "resume bit-identical", observed, ok)

    def _two_checkpoints(self, name: str) -> Path:
        """A copy of the finished plain 2-epoch run (checkpoints after epochs 0 and 1), to damage."""
        self.full()
        out = self.work / name
        shutil.copytree(self._finished, out)
        return out

    def corrupt(self, truncate: bool = False) -> Row:
        full = self.full()
        out = self._two_checkpoints("truncated" if truncate else "corrupt")
        newest = sorted(out.glob("ckpt-*.pt"))[-1]
        data = bytearray(newest.read_bytes())
        if truncate:
            data = data[: len(data) // 2]
        else:
            mid = len(data) // 2
            data[mid:mid + 4096] = random.Random(1).randbytes(4096)
        newest.write_bytes(bytes(data))
        (out / "model.safetensors").unlink()
        resumed = run(engine_cmd(self.data, out, "train.epochs=2", args=("--resume", "auto")))
        said = [ln for ln in resumed.stderr.splitlines() if newest.name in ln and "unusable" in ln]
        same = resumed.returncode == 0 and identical(weights(out), full)
        what = "cut to half its size" if truncate else "4 KiB of random bytes in the middle (same size)"
        return Row(f"newest checkpoint {what}, then --resume auto",
                   "refused with the reason, the previous checkpoint used, final weights identical",
                   f"exit {resumed.returncode}; said: {said[0] if said else '(nothing)'}; weights "
                   f"{'identical' if same else 'DIFFER'}", bool(said) and same)

    def all_bad(self) -> Row:
        out = self._two_checkpoints("all-bad")
        for p in out.glob("ckpt-*.pt"):
            p.write_bytes(p.read_bytes()[:100])
        proc = run(engine_cmd(self.data, out, args=("--resume", "auto")))
        lines = error_lines(proc.stderr)
        named = len(lines) == 1 and all(p.name in lines[0] for p in out.glob("ckpt-*.pt"))
        fresh = run(engine_cmd(self.data, out, args=("--resume", "fresh")))
        moved = list(out.glob("previous-*/ckpt-*.pt"))
        ok = proc.returncode == 2 and named and "Traceback" not in proc.stderr and fresh.returncode == 0 and len(moved) == 2
        return Row("every checkpoint unusable, --resume auto; then --resume fresh",
                   "exit 2, one line naming each file and why; fresh start moves them aside",
                   f"exit {proc.returncode}, {len(lines)} line: {lines[0] if lines else '-'}; fresh: exit "
                   f"{fresh.returncode}, {len(moved)} moved into previous-*/", ok)

    def enospc(self) -> list[Row]:
        if os.geteuid() != 0:
            reason = "skipped: mounting a tmpfs needs root"
            return [Row("ENOSPC while training", "one line", reason, None),
                    Row("ENOSPC while converting", "one line", reason, None)]
        rows = []
        with tempfile.TemporaryDirectory() as mnt:
            self.full()
            size = max(p.stat().st_size for p in self._finished.glob("ckpt-*.pt"))
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6)}", "tmpfs", mnt]).returncode:
                return [Row("ENOSPC", "one line", "skipped: mount -t tmpfs failed here", None)]
            try:
                out = Path(mnt) / "run"
                proc = run(engine_cmd(self.data, out))
                lines = error_lines(proc.stderr)
                temps = [p.name for p in out.glob(".*tmp-*")]
                kept = sorted(out.glob("ckpt-*.pt"))
                from engine import checkpoint as ckpt

                loads = bool(kept) and isinstance(ckpt.load(kept[0]), dict)
                ok = (proc.returncode == 2 and len(lines) == 1 and "no space left" in lines[0] and str(out) in lines[0]
                      and "MiB needed" in lines[0] and not temps and loads and "Traceback" not in proc.stderr)
                rows.append(Row(f"training --out on a tmpfs of {size * 1.6 / 2**20:.1f} MiB (room for one checkpoint)",
                                "exit 2, one line with the folder and the bytes; no temp file; the earlier checkpoint loads",
                                f"exit {proc.returncode}: {lines[0] if lines else proc.stderr[-200:]}; temps {temps}; "
                                f"earlier checkpoint {'loads' if loads else 'MISSING'}", ok))
            finally:
                subprocess.run(["umount", mnt])
        rows.append(self._enospc_convert())
        return rows

    def _enospc_convert(self) -> Row:
        """The converter on a tmpfs of a third of what the conversion writes."""
        need = sum(p.stat().st_blocks * 512 for p in self.data.rglob("*") if p.is_file())  # FFCV files are sparse
        with tempfile.TemporaryDirectory() as mnt:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need // 3}", "tmpfs", mnt]).returncode:
                return Row("ENOSPC while converting", "one line", "skipped: mount -t tmpfs failed here", None)
            try:
                conv = Path(mnt) / "conv"
                proc = run([PY, "tools/convert_imagenet.py", str(self.data.parent / "src"), str(conv), "--quiet",
                            "--formats", "ffcv,dali"])
                lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
                ok = (proc.returncode == 2 and len(lines) == 1 and "no space left" in lines[0] and str(conv) in lines[0]
                      and "MiB" in lines[0] and "Traceback" not in proc.stderr)
                return Row(f"converter OUT on a tmpfs of {need / 3 / 2**20:.1f} MiB (a third of the output)",
                           "exit 2, one line with the folder and the bytes",
                           f"exit {proc.returncode}: {lines[0] if lines else proc.stderr[-300:]}", ok)
            finally:
                subprocess.run(["umount", mnt])

    def diverge(self, nan: bool = False) -> Row:
        """LAMB at a learning rate that blows the weights up (its trust ratio makes each update a
        multiple of the weight norm), checkpoints at every log point. ``nan``: with
        ``train.loss_limit=0`` the run goes on until weights overflow; else the loss limit stops it."""
        out = self.work / ("diverge-nan" if nan else "diverge")
        limit = ["optim.lr=1000", "train.loss_limit=0"] if nan else ["optim.lr=20", "train.log_every=1"]
        proc = run(engine_cmd(self.data, out, *limit, "optim.warmup_epochs=0", "augment.rand_augment=",
                              "checkpoint.every_minutes=1e-9", "train.epochs=3"))
        lines = error_lines(proc.stderr)
        from engine import checkpoint as ckpt

        usable = ckpt.newest_usable(out, log=lambda m: None) if ckpt.list_checkpoints(out) else None
        finite = usable is None or all(torch.isfinite(v).all() for v in usable[1]["model"].values()
                                       if torch.is_tensor(v) and v.is_floating_point())
        named = bool(lines) and usable is not None and f"the last good checkpoint is {usable[0].name}" in lines[0]
        ok = proc.returncode == 3 and len(lines) == 1 and named and finite and "precision=fp32" not in lines[0]
        what = ("LAMB lr 1000, train.loss_limit=0: weights overflow" if nan else
                "LAMB lr 20: mean loss passes train.loss_limit")
        return Row(f"diverging learning rate ({what}), checkpoints at every log point",
                   "exit 3, one line naming the last good checkpoint, no fp32 advice (already fp32); "
                   "--resume auto finds only finite weights",
                   f"exit {proc.returncode}: {lines[0] if lines else proc.stderr[-200:]}; usable checkpoint "
                   f"{usable[0].name if usable else 'none'} finite: {finite}", ok)

    def stale_temp(self) -> Row:
        out = self.work / "stale"
        out.mkdir(parents=True, exist_ok=True)
        temp = out / ".ckpt-e0000-s000000004.pt.tmp-999999"
        temp.write_bytes(b"\0" * 4096)
        proc = run(engine_cmd(self.data, out, "train.epochs=1"))
        ok = proc.returncode == 0 and not temp.exists() and "removed 1 temporary file" in proc.stdout + proc.stderr
        return Row("a temp file left by a killed save", "removed at the next start, with a line",
                   f"exit {proc.returncode}, temp {'gone' if not temp.exists() else 'STILL THERE'}", ok)

    def bad_resume(self) -> Row:
        text = self.work / "notes.txt"
        text.write_text("not a checkpoint\n")
        out = self._two_checkpoints("bad-resume")
        cut = out / "cut.pt"
        cut.write_bytes(sorted(out.glob("ckpt-*.pt"))[-1].read_bytes()[:5000])
        seen = []
        for f in (text, cut):
            proc = run(engine_cmd(self.data, self.work / "bad-resume-2", args=("--resume", str(f))))
            lines = error_lines(proc.stderr)
            seen.append((proc.returncode, len(lines), "Traceback" in proc.stderr, "weights_only=False" in proc.stderr,
                         lines[0] if lines else ""))
        ok = all(code == 2 and n == 1 and not tb and not wo for code, n, tb, wo, _ in seen)
        return Row("--resume of a text file; of a truncated checkpoint", "exit 2, one line each, never weights_only=False",
                   "; ".join(f"exit {c}: {msg}" for c, _, _, _, msg in seen), ok)

    def rank_error(self) -> Row:
        """torchrun, 2 ranks, reference pipeline on a copy of the source tree in which every image of
        rank 1's third batch is unreadable (a node's damaged copy of the data): rank 1 alone raises,
        while rank 0 waits in the gradient all-reduce."""
        from pipelines.reference import folder_items
        from pipelines.sampler import epoch_indices

        tree = self.work / "rank-error-src"
        if not tree.exists():
            shutil.copytree(self.data.parent / "src", tree)
        items, _ = folder_items(tree / "train", False)
        per_device = 32  # global batch 64 over 2 ranks
        for i in epoch_indices(len(items), epoch=0, seed=0, rank=1, world_size=2)[2 * per_device:3 * per_device]:
            Path(items[i][0]).write_bytes(b"not a jpeg")
        t0 = time.perf_counter()
        proc = run(engine_cmd(tree, self.work / "rank-error", "train.epochs=1", "data.workers=0",
                              "augment.rand_augment=", nproc=2, port=29680))
        took = time.perf_counter() - t0
        lines = error_lines(proc.stderr)
        ours = any(f'File "{ROOT / pkg}' in proc.stderr for pkg in ("engine", "pipelines"))
        ok = (len(lines) == 1 and lines[0].startswith("error: rank 1 of 2: no image of a batch") and not ours
              and "exitcode: 2" in proc.stderr and "exitcode: 1" not in proc.stderr and took < 120)
        return Row("torchrun 2 ranks: every image of rank 1's third batch unreadable (rank 0 is in the all-reduce)",
                   "one line naming rank 1, every rank ends with its status (2) within seconds, no traceback of ours",
                   f"{len(lines)} line(s): {lines[0] if lines else proc.stderr[-300:]}; torchrun exit {proc.returncode}, "
                   f"ranks' exit codes {sorted(set(re.findall(r'exitcode: (-?[0-9]+)', proc.stderr)))}, run ended "
                   f"{took:.0f} s after its start", ok)

    def resume_4_ranks(self) -> Row:
        """torchrun, 4 gloo ranks, checkpoints at every log point; a copy cut back to its step-4
        checkpoint (what a kill at step 5 leaves) resumed with --resume auto."""
        from safetensors.torch import load_file

        sets = ("train.epochs=1", "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=20", "data.workers=0",
                "augment.rand_augment=")
        full, cut = self.work / "four-full", self.work / "four-cut"
        run(engine_cmd(self.data, full, *sets, nproc=4, port=29690), check=True)
        shutil.copytree(full, cut)
        for p in cut.iterdir():
            if p.name.startswith("ckpt-") and int(p.name.split("-s")[1][:9]) > 4 or p.suffix == ".safetensors":
                p.unlink()
        resumed = run(engine_cmd(self.data, cut, *sets, nproc=4, port=29691, args=("--resume", "auto")))
        a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
        differ = [k for k in a if not torch.equal(a[k], b.get(k, torch.empty(0)))] if resumed.returncode == 0 else list(a)
        ok = resumed.returncode == 0 and ", step 4\n" in resumed.stderr and not differ
        return Row("torchrun 4 ranks (gloo): resumed from the step-4 checkpoint of a 10-step run",
                   "final weights bit-identical to the uninterrupted 4-rank run",
                   f"resumed exit {resumed.returncode}; " + ("weights identical" if not differ else
                                                             f"{len(differ)} of {len(a)} tensors DIFFER"), ok)

    def torchrun_config(self) -> Row:
        cmd = engine_cmd(self.data, self.work / "cfg", "optim.lrr=1", nproc=2, port=29670)
        proc = run(cmd)
        lines = error_lines(proc.stderr)
        return Row("config error (a typo'd key) under torchrun, 2 ranks", "printed once",
                   f"{len(lines)} line(s): {lines[0] if lines else '-'}", len(lines) == 1)

    # ------------------------------------------------------------------ stops during evaluation, output kept
    # every val image read 100 ms late: an evaluation of seconds, so a signal sent when it starts lands
    # inside it on a loaded machine too (two ranks agree on a stop only every few batches)
    SLOW_VAL = "rank=*,slow=*/val/*,seconds=0.1"

    def _signal_during_eval(self, out: Path, epoch: int, sig: int, nproc: int, port: int, resume: bool,
                            ) -> tuple[int, str, float]:
        """Start the run with slow val reads, send ``sig`` (to the process group) as soon as the
        evaluation of ``epoch`` starts; (exit status, stderr, seconds from the signal to the exit)."""
        import threading

        args = ("--resume", "auto") if resume else ()
        sets = self.TWO_RANKS if nproc else ()
        proc = subprocess.Popen(engine_cmd(self.data, out, *sets, nproc=nproc, port=port, args=args), cwd=ROOT,
                                env=self._fault_env(self.SLOW_VAL, self.work / "slow-val.faults"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        lines, sent = [], {}

        def read():
            for line in proc.stderr:
                lines.append(line)
                if not sent and f"epoch {epoch}: evaluating" in line:
                    sent["t"] = time.perf_counter()
                    os.killpg(proc.pid, sig)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        proc.stdout.read()
        proc.wait(timeout=600)
        reader.join(timeout=30)
        took = time.perf_counter() - sent["t"] if sent else float("nan")
        return proc.returncode, "".join(lines), took

    def stop_during_eval(self, nproc: int = 0) -> Row:
        """SIGTERM while epoch 0 is evaluated, then ``--resume auto``; a lone process also gets SIGINT
        while the final epoch is evaluated, then ``--resume auto`` again: the run must end as an
        uninterrupted one (weights and every logged metric)."""
        sets = self.TWO_RANKS if nproc else ()  # the uninterrupted runs the other cases use too
        full = self.full("reference", nproc, *sets)
        full_out = self.work / f"full-reference-{nproc}-{abs(hash(sets)) % 10**6}"
        out = self.work / f"eval-stop-{nproc}"
        port = 29700 + 10 * nproc
        code, err, took = self._signal_during_eval(out, 0, signal.SIGTERM, nproc, port, resume=False)
        stops = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM during the evaluation of epoch 0")]
        tags = [torch.load(p, weights_only=True)["tag"] for p in sorted(out.glob("ckpt-*.pt"))]
        seen = [f"SIGTERM in epoch 0's evaluation: exit {code} after {took:.1f} s, {len(stops)} stop line(s), "
                f"checkpoints {tags}"]
        ok = ((code == 143 if nproc == 0 else code != 0 and "(exit 143)" in "".join(stops))
              and took < 30 and len(stops) == 1 and tags.count("interrupted") == 1 and tags[-1] == "interrupted")
        if nproc == 0:  # one Ctrl-C during the final evaluation: never exit 0
            code, err, took = self._signal_during_eval(out, 1, signal.SIGINT, nproc, port + 1, resume=True)
            stops = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGINT during the evaluation of epoch 1")]
            redone = "the evaluation of epoch 0 is redone" in err
            ok = ok and code == 130 and took < 30 and len(stops) == 1 and redone and "Traceback" not in err
            seen.append(f"SIGINT in the final evaluation: exit {code} after {took:.1f} s, {len(stops)} stop line(s), "
                        f"epoch 0's evaluation redone first: {redone}")
        resumed = run(engine_cmd(self.data, out, *sets, nproc=nproc, port=port + 2, args=("--resume", "auto")))
        from tests.helpers.engine_runs import comparable, newest_per_point

        same = resumed.returncode == 0 and identical(weights(out), full)
        same_metrics = comparable(newest_per_point(metrics(out))) == comparable(newest_per_point(metrics(full_out)))
        ok = ok and same and same_metrics and one_record_per_step(out)
        seen.append(f"resumed: exit {resumed.returncode}, weights {'identical' if same else 'DIFFER'}, metrics "
                    f"{'identical' if same_metrics else 'DIFFER'} to an uninterrupted run")
        who = "one process" if nproc == 0 else f"torchrun {nproc} ranks"
        what = "SIGTERM during epoch 0's evaluation" + (", SIGINT during the final one," if nproc == 0 else "")
        return Row(f"{who}: {what} then --resume auto",
                   "each stop within seconds: exit 128 + signal, one line, an 'interrupted' checkpoint with the "
                   "evaluation pending; the resumed run redoes it and ends as an uninterrupted one",
                   "; ".join(seen), ok)

    def resume_auto_without_checkpoint(self) -> Row:
        """A finished --max-steps run (metrics and exports, no checkpoint), then the same folder with
        --resume auto: there is nothing to continue, and nothing of the first run may be lost."""
        out = self.work / "no-checkpoint"
        first = run(engine_cmd(self.data, out, "train.log_every=1", args=("--max-steps", "4")))
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} if out.is_dir() else {}
        again = run(engine_cmd(self.data, out, "train.log_every=1", args=("--max-steps", "2", "--resume", "auto")))
        moved = list(out.glob("previous-*"))
        kept = len(moved) == 1 and {p.name: p.read_bytes() for p in moved[0].iterdir()} == before
        said = [ln for ln in again.stderr.splitlines() if ln.startswith("--resume auto:") and "moved its files" in ln]
        fresh = (out / "metrics.jsonl").is_file() and len(metrics(out)) == 3  # 2 steps and the evaluation
        ok = first.returncode == 0 and again.returncode == 0 and kept and bool(said) and fresh and len(before) >= 2
        return Row("--resume auto on a folder with a --max-steps run's output and no checkpoint",
                   "the old run's files moved into previous-<time>/ (byte for byte), one line saying where; the new "
                   "run starts fresh",
                   f"exit {again.returncode}; {said[0] if said else 'no line'}; {len(before)} file(s) "
                   f"{'kept in ' + moved[0].name if kept else 'NOT KEPT'}; new metrics.jsonl "
                   f"{'fresh' if fresh else 'NOT FRESH'}", ok)

    # ------------------------------------------------------------------ one rank unlike the others (issue: 64 ranks)
    def _fault_env(self, rules: str, log: Path) -> dict[str, str]:
        """ENV with the rank-local fault injector (tests/helpers/fault_inject/sitecustomize.py) active."""
        inject = str(ROOT / "tests" / "helpers" / "fault_inject")
        return {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [inject, ENV.get("PYTHONPATH", "")])),
                "RSB_FAULT": rules, "RSB_FAULT_LOG": str(log)}

    def unreadable_on_one_rank(self) -> Row:
        """torchrun, 2 ranks, a copy of the finished 2-epoch run without its exports: rank 1 alone gets
        EIO reading the newest checkpoint (its node's view of the shared folder)."""
        full = self.full("reference", 2, *self.TWO_RANKS)
        src = self.work / f"full-reference-2-{abs(hash(self.TWO_RANKS)) % 10**6}"
        out = self.work / "unreadable-rank1"
        shutil.copytree(src, out)
        for name in ("model.safetensors", "best.safetensors"):
            (out / name).unlink(missing_ok=True)
        newest = sorted(out.glob("ckpt-*.pt"))[-1]
        log = self.work / "unreadable-rank1.faults"
        env = self._fault_env(f"rank=1,open={newest.name}", log)
        cmd = engine_cmd(self.data, out, *self.TWO_RANKS, nproc=2, port=29720, args=("--resume", "auto"))
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        hit = log.read_text() if log.exists() else ""
        said = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"checkpoint {newest.name} is unusable (rank 1:")]
        same = proc.returncode == 0 and (out / "model.safetensors").exists() and identical(weights(out), full)
        ok = bool(hit) and len(said) == 1 and "every rank takes an older one" in said[0] and same
        return Row("torchrun 2 ranks: rank 1 alone cannot read the newest checkpoint (EIO), --resume auto",
                   "every rank resumes from the same (older) checkpoint, one line naming rank 1 and why; final "
                   "weights identical to the uninterrupted run",
                   f"fault hit: {'yes' if hit else 'NO'}; {said[0] if said else 'no line'}; exit {proc.returncode}; "
                   f"weights {'identical' if same else 'DIFFER'}" + (f"; {error_lines(proc.stderr)[:1]}"
                                                                     if proc.returncode else ""), ok)

    def _srun_like(self, out: Path, env: dict, *sets: str, world: int = 2, job: int = 4242) -> list[subprocess.Popen]:
        """``world`` engine processes as the tasks of an ``srun`` step on this machine (Slurm's variables
        set by hand): rank 0 hosts the store, as under srun, which torchrun does not show."""
        procs = []
        for r in range(world):
            task = {"SLURM_STEP_ID": "0", "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NODEID": "0",
                    "SLURM_STEP_NUM_TASKS": str(world), "SLURM_STEP_TASKS_PER_NODE": str(world),
                    "SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost"}
            procs.append(subprocess.Popen(engine_cmd(self.data, out, *sets), cwd=ROOT, env={**env, **task},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        return procs

    def export_fails_on_rank_0(self) -> Row:
        """srun-style 2 ranks: rank 0's final export hits a full disk while rank 1 waits at the end."""
        out = self.work / "export-fails"
        log = self.work / "export-fails.faults"
        env = self._fault_env("rank=0,replace=model.safetensors", log)
        t0 = time.perf_counter()
        procs = self._srun_like(out, env, "train.epochs=1")
        results = [p.communicate(timeout=600) for p in procs]
        took = time.perf_counter() - t0
        codes = [p.returncode for p in procs]
        err = "".join(e for _, e in results)
        lines = error_lines(err)
        ok = (bool(log.exists()) and codes == [2, 2] and len(lines) == 1 and lines[0].startswith("error: rank 0 of 2: ")
              and "no space left" in lines[0] and "Traceback" not in err and took < 120)
        return Row("srun-style 2 ranks (rank 0 hosts the store): rank 0's final export finds the disk full",
                   "one line naming rank 0, both ranks end with exit 2 within seconds",
                   f"exit codes {codes}; {len(lines)} error line(s): {lines[0] if lines else err[-300:]}; traceback: "
                   f"{'yes' if 'Traceback' in err else 'no'}; ended {took:.0f} s after the start", ok)

    def silent_death(self) -> Row:
        """torchrun, 2 ranks, checkpoints at every log point: kill -9 of rank 1 at step 8 of 20 (what the
        OOM killer does); then --resume auto."""
        sets = self.TWO_RANKS
        full = self.full("reference", 2, *sets)
        out = self.work / "silent-death"
        proc = subprocess.Popen(engine_cmd(self.data, out, *sets, nproc=2, port=29730), cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        victim = _process_with_env(proc.pid, "RANK", "1")
        reached = _wait_for_step(out, 8, proc)
        t0 = time.perf_counter()
        if victim:
            os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        took = time.perf_counter() - t0
        lines = error_lines(err)
        resumed = run(engine_cmd(self.data, out, *sets, nproc=2, port=29731, args=("--resume", "auto")))
        same = resumed.returncode == 0 and identical(weights(out), full)
        ok = (reached and victim is not None and len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 stopped "
              "without a word") and took < 30 and same)
        return Row("torchrun 2 ranks: kill -9 of rank 1 mid-run (no error of its own reaches anyone), then "
                   "--resume auto",
                   "the survivor ends within seconds with one line naming rank 1; the resumed run ends bit-identical",
                   f"killed pid {victim}; survivor ended {took:.1f} s later; {len(lines)} error line(s): "
                   f"{lines[0] if lines else err[-300:]}; resumed exit {resumed.returncode}, weights "
                   f"{'identical' if same else 'DIFFER'}", ok)

    def stuck_rank(self) -> Row:
        """torchrun, 2 ranks, no DataLoader workers: rank 1's read of an image never returns (its
        process alive, beating its heartbeat) while rank 0 waits in the gradient all-reduce."""
        out = self.work / "stuck-rank"
        log = self.work / "stuck-rank.faults"
        env = self._fault_env("rank=1,hang=*.jpg,after=150", log)
        t0 = time.perf_counter()
        proc = subprocess.run(engine_cmd(self.data, out, "data.workers=0", "train.dist_timeout_s=8", nproc=2,
                                         port=29740), cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        took = time.perf_counter() - t0
        lines = error_lines(proc.stderr)
        hung = log.exists() and "hang at" in log.read_text()
        ok = (hung and len(lines) == 1 and lines[0].startswith("error: rank 1 of 2: no progress for ")
              and "waiting for its next batch" in lines[0] and "train.dist_timeout_s = 8 s" in lines[0] and took < 90)
        return Row("torchrun 2 ranks: rank 1's image read never returns (alive, its watcher beating), "
                   "train.dist_timeout_s=8",
                   "one line naming rank 1 and where it waits, every rank ends shortly after the timeout",
                   f"hang injected: {hung}; {len(lines)} error line(s): {lines[0] if lines else proc.stderr[-300:]}; "
                   f"torchrun exit {proc.returncode}; ended {took:.0f} s after the start", ok)

    def world_size_change(self) -> Row:
        """A 2-rank run's mid-epoch checkpoint resumed on 4 ranks, and a 4-rank one's on 2: refused with
        one line naming the epoch-boundary checkpoint to use; that one continues on the new count."""
        sets = self.TWO_RANKS
        self.full("reference", 2, *sets)
        two = self.work / f"full-reference-2-{abs(hash(sets)) % 10**6}"
        seen, ok = [], True
        for src, nproc in ((two, 4), (self._four_ranks(), 2)):
            out = self.work / f"resize-{nproc}"
            shutil.copytree(src, out)
            for p in list(out.iterdir()):  # cut back to a mid-epoch checkpoint of the last epoch
                m = re.fullmatch(r"ckpt-e(\d+)-s(\d+)\.pt", p.name)
                if (m and int(m.group(2)) > (14 if src == two else 4)) or p.suffix == ".safetensors":
                    p.unlink()
                    Path(f"{p}.json").unlink(missing_ok=True)
            epochs = "train.epochs=2" if src == two else "train.epochs=1"
            tail = sets + (("data.workers=0", "augment.rand_augment=") if src != two else ())
            refused = run(engine_cmd(self.data, out, *tail, epochs, nproc=nproc, port=29750 + nproc,
                                     args=("--resume", "auto")))
            lines = error_lines(refused.stderr)
            boundary = re.search(r"--resume (\S+ckpt-e\d+-s\d+\.pt) \(the end of epoch", lines[0]) if lines else None
            good = refused.returncode != 0 and len(lines) == 1 and "in the middle of epoch" in lines[0]
            if src == two:  # 2 epochs: the end of epoch 0 is there and is named (from there any composition goes on)
                good = good and boundary is not None and Path(boundary.group(1)).name.startswith("ckpt-e0000-")
            else:  # 1 epoch: no boundary before it; fresh is what is left
                good = good and "--resume fresh" in lines[0]
            ok = ok and good
            seen.append(f"{'2 -> 4' if src == two else '4 -> 2'}: exit {refused.returncode}, "
                        f"{lines[0] if lines else refused.stderr[-200:]}")
        return Row("a mid-epoch checkpoint resumed on another process count (2 -> 4 and 4 -> 2 gloo ranks)",
                   "refused with one line that names the epoch-boundary checkpoint to resume from (or --resume "
                   "fresh when there is none)",
                   "; ".join(seen), ok)

    def _four_ranks(self) -> Path:
        """The 4-rank 1-epoch run with a checkpoint at every log point (resume_4_ranks's), made once."""
        full = self.work / "four-full"
        if not (full / "model.safetensors").exists():
            run(engine_cmd(self.data, full, "train.epochs=1", "checkpoint.every_minutes=1e-9", "checkpoint.keep_last=20",
                           "data.workers=0", "augment.rand_augment=", nproc=4, port=29690), check=True)
        return full


def _process_with_env(root: int, key: str, value: str, timeout: float = 300) -> int | None:
    """The pid of an engine process below ``root`` (torchrun starts its ranks in sessions of their
    own) whose environment holds ``key=value``: a rank, by its RANK."""
    want = f"{key}={value}".encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        parent = {}
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                parent[int(proc_dir.name)] = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        for pid in parent:
            up = pid
            while up in parent and up != root and up > 1:
                up = parent[up]
            if up != root or pid == root:
                continue
            try:
                env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            if want in env and b"engine.run" in cmdline:
                return pid
        time.sleep(0.2)
    return None
