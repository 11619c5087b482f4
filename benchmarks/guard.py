"""The throughput guard: this working tree (head) against a base commit, the same workloads, interleaved.

    python -m benchmarks.guard --base origin/main            # at the end of every change to a hot path
    python -m benchmarks.guard --base 2e12bd0 --rounds 3 --write benchmarks/results/guard.md
    python -m benchmarks.guard --base HEAD~3 --only e2e-ffcv,parts
    python -m benchmarks.guard --base ff77b6e --only e2e-ffcv --rounds 5 --e2e-epochs 5

Why: correctness has tests, speed had nothing that runs twice. A change that makes any backend slower
is a defect even with every test green (docs/design.md), and on a shared 2-core machine one timing
says little: this runs base and head back to back, many times, and compares their spreads.

How:
* The base commit and the head, this working tree as it is at the start (uncommitted and untracked
  files included: a commit made through a temporary index, :func:`snapshot`), are checked out into
  two temporary git worktrees (removed at the end), so both sides load their code from the same
  kind of place and an edit made while the guard runs changes nothing. Both run with this
  interpreter (the same venv): each workload is a process of ``benchmarks/guard_work.py`` (always
  this tree's copy) started in a side's tree with that tree first on ``PYTHONPATH``, so it
  measures that tree's code.
* Data, made once and kept in ``--data`` (default ``/tmp/rsb-guard-data``): a Fashion-MNIST subset
  written as the demo writes it (10 classes x 512 train / 100 val, 64 px JPEGs) and 512 ImageNet-like
  photo crops (500x375 / 375x500 JPEGs, as benchmarks/bench_pipelines.py makes them). Each tree
  converts them with its own converter; when the two converters are the same files the conversion
  is shared.
* Workloads (guard_work.py says exactly what each runs): e2e training images/s per backend
  (``recipes/demo.toml``, 2 epochs at 32 px, the second epoch's figure; ``--e2e-epochs N``: N epochs,
  the mean of epochs 2..N, steadier on a noisy machine); stage 1 alone per backend at
  224 px; FFCV's and DALI's own stock pipelines on the same files (the anchors: ours / stock says
  what our fidelity, PIL's filters and timm's crop sampler, costs or saves against the library as
  it comes); stage 2 per batch; the bare step; evaluation images/s per backend; the converter.
* Rounds: ``--rounds`` (at least 3) times every workload for base and head, adjacent in time, the
  order swapped every round (base first, then head first), so a machine that slows down or speeds
  up over the run weighs on both sides alike.

Verdict per figure (a higher figure is better: every one is images/s): the spread of a side is
(max - min) / median over its rounds. Head is **slower** when every head round is below every base
round (with 3 rounds each, a chance of 1 in 20 under no change) *and* the medians' drop is larger
than the larger of the two spreads; **faster** the same way up; else **same** (within the rounds'
spread). The stock pipelines do not run our code, so theirs is a check of the machine (a verdict
there means it drifted), not of the change. The guard exits 1 when any figure of ours is slower,
0 otherwise, 2 on a usage error. It prints one table and writes it (``--write``) with the command,
the commits, the machine and its load average before and after.

A figure is ``-`` where a tree cannot give it (a base older than a backend or an entry point).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("benchmarks") / "guard_work.py"  # the head's copy runs every workload (see the module doc)
WORKLOADS = ("e2e-reference", "e2e-ffcv", "e2e-dali", "parts", "convert")
CONVERTER_FILES = ("tools/convert_imagenet.py", "pipelines/dataroot.py", "pipelines/convert")
STOCK = "stock "  # figures of the libraries' own pipelines: a check of the machine, not of the change
ANCHORS = (("stage 1 at 224 px, ffcv", "stock FFCV Loader at 224 px"),
           ("stage 1 at 224 px, dali", "stock DALI pipeline at 224 px"))


class GuardError(RuntimeError):
    """A usage problem: one line, exit 2."""


# ----------------------------------------------------------------------------- the verdict
def spread(values: list[float]) -> float:
    """(max - min) / median of one side's rounds."""
    return (max(values) - min(values)) / statistics.median(values)


def verdict(base: list[float], head: list[float]) -> str:
    """``slower``, ``faster`` or ``same`` for a figure where more is better (see the module doc)."""
    if not base or not head:
        return "-"
    ratio = statistics.median(head) / statistics.median(base)
    margin = max(spread(base), spread(head))
    if max(head) < min(base) and 1.0 - ratio > margin:
        return "slower"
    if min(head) > max(base) and ratio - 1.0 > margin:
        return "faster"
    return "same"


# ----------------------------------------------------------------------------- trees and data
def git(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuardError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


def snapshot() -> str:
    """A commit of this working tree as it is now (uncommitted and untracked files included, ignored
    ones not), made through a temporary index: the head is measured from its own worktree, so it
    is what the tree held when the guard started, whatever is edited while it runs."""
    with tempfile.TemporaryDirectory(prefix="rsb-guard-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}

        def run(*args: str) -> str:
            proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise GuardError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
            return proc.stdout.strip()

        run("read-tree", "HEAD")
        run("add", "-A")
        tree = run("write-tree")
        return run("commit-tree", tree, "-p", "HEAD", "-m", "throughput guard: the working tree")


def converter_key(tree: Path) -> str:
    """A digest of a tree's converter files: two trees with the same one convert alike."""
    h = hashlib.sha256()
    for name in CONVERTER_FILES:
        path = tree / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(tree)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def make_sources(data: Path) -> None:
    """The demo subset and the photo crops as JPEG class-folder trees (once; kept in ``data``)."""
    demo, photos = data / "demo-src", data / "photos-src"
    if not (demo / ".done").exists():
        from pipelines.convert.demo_data import FMNIST_DIR, make_demo_tree

        if not FMNIST_DIR.is_dir():
            raise GuardError(f"{FMNIST_DIR} is missing: apt-get install dataset-fashion-mnist (make setup does it)")
        shutil.rmtree(demo, ignore_errors=True)
        make_demo_tree(demo, FMNIST_DIR, 64, 512, 100, 90, 2)
        (demo / ".done").touch()
    if not (photos / ".done").exists():
        from tests.helpers.photos import photo_crops

        shutil.rmtree(photos, ignore_errors=True)
        crops = photo_crops(256, (500, 375), seed=11) + photo_crops(256, (375, 500), seed=12)
        for i, img in enumerate(crops):
            for split in ("train", "val") if i < 16 else ("train",):
                folder = photos / split / f"c{i % 10}"
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{i:05d}.jpg", quality=90)  # JPEG, as ImageNet's own files
        (photos / ".done").touch()


def side_data(tree: Path, data: Path) -> Path:
    """``data/conv-<key>/``: both data sets converted by ``tree``'s converter, with the sources
    linked beside them, as guard_work.py expects (``demo/converted``, ``photos/{src,converted}``)."""
    folder = data / f"conv-{converter_key(tree)}"
    for name in ("demo", "photos"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        src = folder / name / "src"
        if not src.exists():
            src.symlink_to(data / f"{name}-src")
        out = folder / name / "converted"
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run([sys.executable, "tools/convert_imagenet.py", str(src), str(out), "--formats",
                                   "ffcv,dali", "--workers", "2", "--quiet"], cwd=tree, capture_output=True,
                                  text=True, env=_env(tree))
            if proc.returncode != 0:
                raise GuardError(f"the converter of {tree} failed on {src}: {proc.stderr.strip()[-300:]}")
    return folder


def _env(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    return env


def run_workload(name: str, tree: Path, work: Path, data: Path, scratch: Path,
                 e2e_epochs: int = 2) -> tuple[dict, float, str]:
    """One workload in ``tree`` by the script ``work``: (figures, seconds, error line or "")."""
    result = scratch / f"{name}.json"
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(work), name, "--data", str(data), "--out", str(result),
                           "--scratch", str(scratch), "--e2e-epochs", str(e2e_epochs)], cwd=tree,
                          capture_output=True, text=True, env=_env(tree))
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not result.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {}, seconds, lines[-1] if lines else f"exit {proc.returncode}"
    return json.loads(result.read_text()), seconds, ""


# ----------------------------------------------------------------------------- the run
def measure(base_tree: Path, head_tree: Path, data: Path, rounds: int, workloads: list[str], log=print,
            e2e_epochs: int = 2):
    """{side: {figure: [rounds...]}}, and the errors met."""
    make_sources(data)
    trees = {"base": base_tree, "head": head_tree}
    inputs = {side: side_data(tree, data) for side, tree in trees.items()}
    figures: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rsb-guard-") as tmp:
        for r in range(rounds):
            order = ("base", "head") if r % 2 == 0 else ("head", "base")
            for name in workloads:
                for side in order:
                    scratch = Path(tmp) / side
                    scratch.mkdir(exist_ok=True)
                    got, seconds, error = run_workload(name, trees[side], head_tree / WORK, inputs[side], scratch,
                                                       e2e_epochs)
                    if error:
                        errors[f"{side} {name}"] = error
                    for figure, value in got.items():
                        if value is not None:
                            figures[side].setdefault(figure, []).append(float(value))
                    log(f"round {r + 1}/{rounds} {side:4} {name:13} {seconds:5.1f} s  "
                        + (error or ", ".join(f"{k}: {v:,.0f}" for k, v in got.items() if v is not None)))
    return figures, errors


def table(figures: dict[str, dict[str, list[float]]]) -> tuple[list[str], list[str]]:
    """The markdown table and the figures of ours that are slower."""
    names = list(dict.fromkeys([*figures["base"], *figures["head"]]))
    lines = ["| figure (images/s) | base | head | head/base | spread base / head | verdict |",
             "|---|---|---|---|---|---|"]
    slower = []
    for name in names:
        b, h = figures["base"].get(name, []), figures["head"].get(name, [])
        med = {k: statistics.median(v) if v else None for k, v in (("b", b), ("h", h))}
        ratio = f"{med['h'] / med['b']:.3f}" if med["b"] and med["h"] else "-"
        spreads = " / ".join(f"{spread(v):.1%}" if v else "-" for v in (b, h))
        v = verdict(b, h)
        stock = name.startswith(STOCK)
        if v == "slower" and not stock:
            slower.append(name)
        shown = f"{v} (machine)" if stock and v in ("slower", "faster") else v
        fmt = lambda x: f"{x:,.0f}" if x is not None else "-"  # noqa: E731
        lines.append(f"| {name} | {fmt(med['b'])} | {fmt(med['h'])} | {ratio} | {spreads} | "
                     f"{'**' + shown + '**' if v == 'slower' and not stock else shown} |")
    anchors = []
    for ours, stock in ANCHORS:
        for side in ("base", "head"):
            a, s = figures[side].get(ours), figures[side].get(stock)
            if a and s:
                anchors.append(f"{side}: {ours} / {stock} = {statistics.median(a) / statistics.median(s):.2f}")
    if anchors:
        lines += ["", "Anchors (ours / the library's stock pipeline on the same files, same process, same round):", ""]
        lines += [f"- {a}" for a in anchors]
    return lines, slower


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {len(os.sched_getaffinity(0))} usable, no GPU used"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guard", description=__doc__.split("\n")[0],
                                epilog="The module docstring (python -m pydoc benchmarks.guard) says how the "
                                       "verdict is decided.")
    p.add_argument("--base", default="origin/main", help="the commit to compare against (default origin/main)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every workload per side (at least 3; default 3)")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"workloads, comma-separated (default all: "
                                                                f"{','.join(WORKLOADS)})")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "rsb-guard-data",
                   help="where the data sets are made and kept between runs")
    p.add_argument("--e2e-epochs", type=int, default=2,
                   help="epochs of each e2e training run, the first not measured (default 2; at least 2): more "
                        "epochs give a steadier e2e figure on a noisy machine, at ~3 s per epoch and run here")
    p.add_argument("--write", type=Path, default=ROOT / "benchmarks" / "results" / "guard.md",
                   help="the results file (default benchmarks/results/guard.md)")
    a = p.parse_args(argv)
    workloads = [w for w in a.only.split(",") if w]
    try:
        if a.e2e_epochs < 2:
            raise GuardError(f"--e2e-epochs {a.e2e_epochs}: at least 2 (the first epoch is not measured)")
        if a.rounds < 3:
            raise GuardError(f"--rounds {a.rounds}: at least 3 rounds, so that a spread means something")
        unknown = [w for w in workloads if w not in WORKLOADS]
        if unknown:
            raise GuardError(f"--only: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
        base_sha = git("rev-parse", "--verify", f"{a.base}^{{commit}}")
        head_sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
        tree_sha = snapshot()
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    started = time.time()
    trees = {side: Path(tempfile.mkdtemp(prefix=f"rsb-guard-{side}-")) for side in ("base", "head")}
    try:
        for side, sha in (("base", base_sha), ("head", tree_sha)):
            git("worktree", "add", "--detach", "--force", str(trees[side]), sha)
        print(f"guard: base {a.base} = {base_sha[:10]}, head {head_sha[:10]}{' + uncommitted changes' if dirty else ''}"
              f" (this tree, as of now); each in a worktree of its own; {a.rounds} rounds of {', '.join(workloads)}",
              flush=True)
        figures, errors = measure(trees["base"], trees["head"], a.data, a.rounds, workloads,
                                  log=lambda line: print(line, flush=True), e2e_epochs=a.e2e_epochs)
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            shutil.rmtree(tree, ignore_errors=True)
    load_after = os.getloadavg()
    lines, slower = table(figures)
    command = "python -m benchmarks.guard " + " ".join(sys.argv[1:] if argv is None else argv)
    head = [f"# Throughput guard: {head_sha[:10]}{' (+ uncommitted changes)' if dirty else ''} against {a.base} "
            f"({base_sha[:10]})", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, `{command}`, {(time.time() - started) / 60:.1f} min.",
            f"Machine: {machine()}; load average {' / '.join(f'{v:.1f}' for v in load_before)} before, "
            f"{' / '.join(f'{v:.1f}' for v in load_after)} after (1 / 5 / 15 min).",
            f"{a.rounds} rounds, base and head adjacent in each, the order swapped every round; the median of the "
            f"rounds per side. Verdict: benchmarks/guard.py's docstring (slower: every head round below every base "
            f"round and the drop larger than both spreads).", ""]
    verdict_line = (f"**slower: {', '.join(slower)}**" if slower else "no figure of ours is slower than the base "
                                                                     "beyond its spread")
    text = "\n".join(head + lines + ["", verdict_line] + [f"\nerror: {k}: {v}" for k, v in errors.items()]) + "\n"
    print("\n" + text, end="")
    if a.write:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(text)
        print(f"written to {a.write}")
    return 1 if slower or errors else 0


if __name__ == "__main__":
    sys.exit(main())
