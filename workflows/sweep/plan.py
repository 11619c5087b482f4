"""A sweep's plan: read a sweep file, expand it into trials (each an ordinary ``python -m engine.run``
command, checked by the engine's own config validation before anything starts), make the data
subset once, and name each trial's folder. Nothing here runs a trial (:mod:`workflows.sweep.run`).

A sweep file (TOML)::

    base = "../recipes/a3.toml"     # relative to the sweep file, else to the current folder
    seeds = [0, 1]                  # every configuration runs once per seed (train.seed)
    [budget]                        # a cheap version of the recipe
    epochs = 4                      # train.epochs: the lr schedule is shortened to fit
    max_steps = 200                 # --max-steps: the run is cut (the schedule is not shortened)
    [budget.subset]                 # optional: a class/limit subset made once by the converter
    src = "data/demo/src"           # a class-folder tree the converter reads
    classes = ["0_tshirt", "8_bag"] # or "@file" with one name per line; sets data.num_classes
    limit_per_class = 500
    formats = ["dali"]              # the trials' data.pipeline must read one of them (not "reference")
    [set]                           # fixed overrides, as --set
    "model.arch" = "resnet_tiny"
    [grid]                          # every combination; or [random] below, not both
    "optim.lr" = [0.004, 0.008]
    [random]
    trials = 8                      # configurations drawn; each runs once per seed
    seed = 0                        # the draw's seed: the same file gives the same trials
    "optim.lr" = {low = 1e-3, high = 2e-2, log = true}
    "optim.weight_decay" = [0.01, 0.02, 0.05]
    [search]                        # optional
    sampler = "grid"                # grid ([grid]) | random ([random]) | tpe (Optuna's TPE over [random]'s
                                    # space: [random] trials configurations proposed one after another)
    [prune]                         # optional: stop losing trials early (needs [budget] epochs)
    kind = "asha"                   # none | asha (successive halving) | hyperband | median
    metric = "val_top1"             # each epoch's evaluation reports it (val_top1, val_top5, val_loss)
    direction = "maximize"
    min_epochs = 1                  # the first rung: no trial stops before this many epochs
    reduction_factor = 3            # asha, hyperband: 1 in 3 goes on at each rung (at 1, 3, 9 ... epochs)
    startup_trials = 5              # median: trials that finish before any is stopped
    [run]
    parallel = 2                    # trials at a time (one GPU each where GPUs exist)
    executor = "local"              # local | slurm
    [run.slurm]                     # one trial's Slurm job (see SLURM_KEYS)
    partition = "gpu"
    time = "4:00:00"                # per start; the trial requeues itself before the limit

A worked example, the demo's learning rates with ASHA (sweeps/a3_lr_asha_demo.toml): 7 lr x 2 seeds, 4
epochs each at most; after its first epoch a trial goes on only if its val top-1 is in the best third of
those evaluated at that rung so far, after 3 epochs again; a stopped trial keeps its checkpoint and its
folder, and the report counts the trial-epochs saved. Adaptive sweeps (a [prune] kind, or sampler tpe)
keep their study in OUT/study.journal (workflows/sweep/study.py).

A trial is identified by its whole command (base, overrides, budget, seed): its folder name is a
readable slug of the swept values plus a hash of that command, so a rerun finds finished trials and
skips them, and a changed budget or fixed override starts new trials instead of mixing results.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.config import ConfigError, load_config, toml_value

EXECUTORS = ("local", "slurm")
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "asha", "hyperband", "median")
KEYS = {
    "": ("base", "seeds", "budget", "set", "grid", "random", "search", "prune", "run"),
    "budget": ("epochs", "max_steps", "subset"),
    "budget.subset": ("src", "classes", "limit_per_class", "formats", "workers"),
    "search": ("sampler",),
    "prune": ("kind", "metric", "direction", "min_epochs", "reduction_factor", "startup_trials"),
    "run": ("parallel", "executor", "slurm"),
}
# [run.slurm]: what each trial's job asks for (workflows.slurm_launch.Resources and the requeue policy)
SLURM_KEYS = {"time": "time limit per start, Slurm's format (default 24:00:00)",
              "partition": "partition", "account": "account",
              "gpus_per_node": "GPUs per trial (default 1; 0 on CPU nodes)",
              "cpus_per_task": "CPUs per trial (default: the node's CPUs per GPU from sinfo, else data.workers + 1)",
              "mem": "memory per trial's node, sbatch's --mem (default: the trial's share of a node, from sinfo)",
              "signal_lead_s": "the early signal this many seconds before the time limit (default 300)",
              "max_requeues": "time-limit requeues per trial (default 20)",
              "sbatch_args": 'other sbatch options, e.g. ["--qos=high"]'}
SKIP_LIMIT = 0.001  # a subset may skip at most this fraction of its files (the converter CLI's --max-skip-frac)
DEMO_DATA = ("data/demo/src", "data/demo/converted")  # what `make demo` writes (tools/demo.py), repository-relative


def _demo_hint(path: str | Path) -> str:
    """A pointer to `make demo` when a missing ``path`` is the demo's data (a fresh clone has none)."""
    posix = Path(path).as_posix().rstrip("/")
    if any(posix == d or posix.endswith("/" + d) for d in DEMO_DATA):
        return "; it is the demo's data: run `make demo` first (it writes data/demo/src and data/demo/converted)"
    return ""


class SweepError(ValueError):
    """A user-caused problem with a sweep (file, keys, values, executor); its message is one line."""


# --------------------------------------------------------------------------- the sweep file
@dataclass
class Subset:
    src: str
    classes: list[str] = field(default_factory=list)
    limit_per_class: int = 0
    formats: list[str] = field(default_factory=lambda: ["dali"])
    workers: int = 2


@dataclass
class Prune:
    """[prune]: how losing trials stop early (workflows/sweep/study.py). Rungs and reports in epochs."""

    kind: str = "none"  # none | asha | hyperband | median
    metric: str = "val_top1"  # the evaluation record's key each epoch reports
    direction: str = "maximize"
    min_epochs: int = 1  # the first rung (asha, hyperband: min_resource); median: no stop before it
    reduction_factor: int = 3  # asha, hyperband: 1 in this many goes on at each rung
    startup_trials: int = 5  # median: trials that finish before any is stopped


@dataclass
class Sweep:
    path: Path
    base: Path
    seeds: list[int]
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    random_space: dict[str, Any]
    random_trials: int
    random_seed: int
    epochs: int | None
    max_steps: int | None
    subset: Subset | None
    parallel: int
    executor: str
    slurm: dict[str, Any]
    sampler: str = "grid"  # grid | random (our own trials) | tpe (Optuna's proposals over [random]'s space)
    prune: Prune = field(default_factory=Prune)

    @property
    def swept_keys(self) -> list[str]:
        return list(self.grid or self.random_space)

    @property
    def adaptive(self) -> bool:
        """Trials report to an Optuna study (a pruner, or TPE proposing them)."""
        return self.sampler == "tpe" or self.prune.kind != "none"


def _check_keys(table: dict[str, Any], where: str, path: Path) -> None:
    allowed = KEYS[where]
    for key in table:
        if key not in allowed:
            guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.0)
            section = f"[{where}] " if where else ""
            raise SweepError(f"{path}: unknown key {section}{key}; did you mean {guess[0]}?")


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and "low" in value and "high" in value


def _flatten(table: dict[str, Any], prefix: str = "", leaf: Callable[[Any], bool] = lambda v: False) -> dict[str, Any]:
    """``{"optim": {"lr": x}}`` (TOML's dotted keys) and ``{"optim.lr": x}`` both become ``{"optim.lr": x}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and not leaf(value):
            out.update(_flatten(value, f"{prefix}{key}.", leaf))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _int(value: Any, name: str, path: Path, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(f"{path}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve_base(base: Any, path: Path) -> Path:
    if not isinstance(base, str):
        raise SweepError(f'{path}: base must name a recipe file, e.g. base = "recipes/a3.toml"')
    for candidate in (path.parent / base, Path(base)):
        if candidate.is_file():
            return candidate.resolve()
    raise SweepError(f"{path}: base recipe {base} not found next to the sweep file or in {Path.cwd()}")


def read_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file (structure only; recipe keys are checked by :func:`plan`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path} (e.g. sweeps/a3_lr_demo.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"{path}: not valid TOML ({e})") from None
    _check_keys(data, "", path)
    if "base" not in data:
        raise SweepError(f'{path}: missing base = "recipes/<recipe>.toml"')
    base = _resolve_base(data["base"], path)

    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise SweepError(f"{path}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1]")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds repeat a value: {seeds}")

    budget = data.get("budget", {})
    _check_keys(budget, "budget", path)
    epochs = _int(budget["epochs"], "[budget] epochs", path, 1) if "epochs" in budget else None
    max_steps = _int(budget["max_steps"], "[budget] max_steps", path, 1) if "max_steps" in budget else None
    subset = _read_subset(budget["subset"], path) if "subset" in budget else None

    fixed = _flatten(data.get("set", {}))
    grid = _flatten(data.get("grid", {}))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: [grid] {key} must be a non-empty list of values, got {values!r}")
    rand_table = dict(data.get("random", {}))
    if grid and rand_table:
        raise SweepError(f"{path}: use [grid] or [random], not both")
    random_trials = _int(rand_table.pop("trials", 1), "[random] trials", path, 1)
    random_seed = _int(rand_table.pop("seed", 0), "[random] seed", path, 0)
    space = _flatten(rand_table, leaf=_is_distribution)
    if data.get("random") is not None and not space:
        raise SweepError(f"{path}: [random] names no key to draw, e.g. \"optim.lr\" = {{low = 1e-3, high = 1e-2}}")
    for key, spec in space.items():
        _check_distribution(key, spec, path)
    for key in (*fixed, *grid, *space):
        if key == "train.seed":
            raise SweepError(f"{path}: train.seed is set by seeds = [...]; remove it from the tables")
        if key in fixed and (key in grid or key in space):
            raise SweepError(f"{path}: {key} is both fixed in [set] and swept")
    if subset is not None and "data.root" in (*fixed, *grid, *space):
        raise SweepError(f"{path}: [budget.subset] sets data.root; remove data.root from the other tables")

    search = data.get("search", {})
    _check_keys(search, "search", path)
    sampler = search.get("sampler", "random" if space else "grid")
    if sampler not in SAMPLERS:
        raise SweepError(f"{path}: [search] sampler = {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if sampler == "grid" and space:
        raise SweepError(f"{path}: [search] sampler = grid takes a [grid] table; [random] is for random and tpe")
    if sampler in ("random", "tpe") and not space:
        raise SweepError(f"{path}: [search] sampler = {sampler} draws from a [random] table, e.g. "
                         f"\"optim.lr\" = {{low = 1e-3, high = 1e-2, log = true}}")
    prune = _read_prune(data.get("prune", {}), path, epochs, max_steps)

    run = data.get("run", {})
    _check_keys(run, "run", path)
    parallel = _int(run.get("parallel", 1), "[run] parallel", path, 1)
    executor = run.get("executor", "local")
    if executor not in EXECUTORS:
        raise SweepError(f"{path}: [run] executor = {executor!r} is not one of {', '.join(EXECUTORS)}")
    slurm = run.get("slurm", {})
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: [run.slurm] must be a table, e.g. partition = \"gpu\"")
    for key in slurm:
        if key not in SLURM_KEYS:
            guess = difflib.get_close_matches(key, SLURM_KEYS, n=1, cutoff=0.0)
            raise SweepError(f"{path}: unknown key [run.slurm] {key}; did you mean {guess[0]}?")
    return Sweep(path=path, base=base, seeds=seeds, fixed=fixed, grid=grid, random_space=space,
                 random_trials=random_trials if space else 0, random_seed=random_seed, epochs=epochs,
                 max_steps=max_steps, subset=subset, parallel=parallel, executor=executor, slurm=dict(slurm),
                 sampler=sampler, prune=prune)


def _read_prune(table: Any, path: Path, epochs: int | None, max_steps: int | None) -> Prune:
    if not isinstance(table, dict):
        raise SweepError(f'{path}: [prune] must be a table, e.g. kind = "asha"')
    _check_keys(table, "prune", path)
    prune = Prune(kind=table.get("kind", "none"), metric=table.get("metric", "val_top1"),
                  direction=table.get("direction", "maximize"))
    if prune.kind not in PRUNERS:
        raise SweepError(f"{path}: [prune] kind = {prune.kind!r} is not one of {', '.join(PRUNERS)}")
    if prune.direction not in ("maximize", "minimize"):
        raise SweepError(f"{path}: [prune] direction = {prune.direction!r} is not one of maximize, minimize")
    if prune.metric not in ("val_top1", "val_top5", "val_loss"):
        raise SweepError(f"{path}: [prune] metric = {prune.metric!r} is not one of val_top1, val_top5, val_loss")
    prune.min_epochs = _int(table.get("min_epochs", 1), "[prune] min_epochs", path, 1)
    prune.reduction_factor = _int(table.get("reduction_factor", 3), "[prune] reduction_factor", path, 2)
    prune.startup_trials = _int(table.get("startup_trials", 5), "[prune] startup_trials", path, 0)
    if prune.kind != "none":
        if epochs is None or max_steps is not None:
            raise SweepError(f"{path}: [prune] compares trials at whole epochs: give [budget] epochs (and no "
                             f"max_steps)")
        if prune.min_epochs >= epochs:
            raise SweepError(f"{path}: [prune] min_epochs = {prune.min_epochs} leaves no rung before the budget's "
                             f"{epochs} epochs; lower it or raise [budget] epochs")
    return prune


def _read_subset(table: Any, path: Path) -> Subset:
    if not isinstance(table, dict):
        raise SweepError(f"{path}: [budget.subset] must be a table with src, classes and/or limit_per_class")
    _check_keys(table, "budget.subset", path)
    if not isinstance(table.get("src"), str):
        raise SweepError(f'{path}: [budget.subset] needs src = "<class-folder tree the converter reads>"')
    classes = table.get("classes", [])
    if isinstance(classes, str):
        if not classes.startswith("@"):
            raise SweepError(f"{path}: [budget.subset] classes is a list of names or \"@file\", got {classes!r}")
        classes_file = Path(classes[1:]) if Path(classes[1:]).is_absolute() else path.parent / classes[1:]
        if not classes_file.is_file():
            raise SweepError(f"{path}: [budget.subset] classes file {classes_file} not found")
        classes = [ln.strip() for ln in classes_file.read_text().splitlines() if ln.strip()]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise SweepError(f"{path}: [budget.subset] classes must be a list of class folder names")
    formats = table.get("formats", ["dali"])
    if not isinstance(formats, list) or not formats or not set(formats) <= {"ffcv", "dali"}:
        raise SweepError(f"{path}: [budget.subset] formats is a list of ffcv and/or dali, got {formats!r}")
    limit = _int(table.get("limit_per_class", 0), "[budget.subset] limit_per_class", path, 0)
    if not classes and not limit:
        raise SweepError(f"{path}: [budget.subset] names neither classes nor limit_per_class; remove it or set one")
    return Subset(src=table["src"], classes=classes, limit_per_class=limit, formats=formats,
                  workers=_int(table.get("workers", 2), "[budget.subset] workers", path, 1))


def _check_distribution(key: str, spec: Any, path: Path) -> None:
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{path}: [random] {key} is an empty list")
        return
    if not _is_distribution(spec) or not set(spec) <= {"low", "high", "log"}:
        raise SweepError(f"{path}: [random] {key} must be a list of choices or {{low = ..., high = ..., log = true}}")
    low, high = spec["low"], spec["high"]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) or not low < high:
        raise SweepError(f"{path}: [random] {key} needs numbers low < high, got {low!r} and {high!r}")
    if spec.get("log", False) and low <= 0:
        raise SweepError(f"{path}: [random] {key} log = true needs low > 0, got {low!r}")


# --------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs; ``overrides`` are ``key=value`` texts. Written as JSON into the
    trial folder for a Slurm task (:meth:`to_json`, :meth:`from_json`)."""

    name: str
    folder: str
    base: str
    cwd: str
    swept: dict[str, Any]
    seed: int
    overrides: tuple[str, ...]
    max_steps: int | None

    def command(self, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "engine.run", self.base, "--out", self.folder]
        for text in self.overrides:
            cmd += ["--set", text]
        if self.max_steps is not None:
            cmd += ["--max-steps", str(self.max_steps)]
        return cmd + (["--resume", "auto"] if resume else [])

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrialSpec":
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}  # "study" rides along for Slurm
        return cls(**{**fields, "overrides": tuple(data["overrides"])})


def format_value(value: Any) -> str:
    """A value as ``--set`` reads it: bare text for a string, TOML for numbers, booleans and lists."""
    if isinstance(value, str):
        return value
    try:
        return toml_value(value)
    except TypeError:
        raise SweepError(f"cannot pass {value!r} as a --set value") from None


def _draw(spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    integer = isinstance(low, int) and isinstance(high, int)
    if log:
        x = math.exp(rng.uniform(math.log(low), math.log(high)))
        return round(x) if integer else float(f"{x:.3g}")  # 3 digits: readable names, no false precision
    return rng.randint(low, high) if integer else float(f"{rng.uniform(low, high):.3g}")


def configurations(sweep: Sweep) -> list[dict[str, Any]]:
    """The swept values of each configuration: the grid's product in file order, or the random draws."""
    if sweep.grid:
        keys = list(sweep.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    if sweep.random_space:
        rng = random.Random(sweep.random_seed)
        return [{k: _draw(s, rng) for k, s in sweep.random_space.items()} for _ in range(sweep.random_trials)]
    return [{}]


def slug(swept: dict[str, Any], seed: int) -> str:
    """Readable part of a trial folder name: the last part of each swept key with its value."""
    short = [k.rsplit(".", 1)[-1] for k in swept]
    names = short if len(set(short)) == len(short) else list(swept)
    parts = [f"{n}={format_value(v)}" for n, v in zip(names, swept.values())] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9.=+_-]+", "-", "_".join(parts))[:80]


def plan(sweep: Sweep, out: Path, subset_root: Path | None = None) -> list[TrialSpec]:
    """Expand the sweep into trials and check every trial's recipe with the engine's own validation,
    so a bad key or value stops the sweep before anything is launched. TPE's trials are proposed as
    the sweep runs (workflows/sweep/study.py): here one configuration per draw of the space stands
    for them, so that every value the sampler may propose is checked before anything starts."""
    return [trial_spec(sweep, out, subset_root, swept, seed) for swept in configurations(sweep)
            for seed in sweep.seeds]


def trial_spec(sweep: Sweep, out: Path, subset_root: Path | None, swept: dict[str, Any], seed: int) -> TrialSpec:
    """One trial: the base recipe with the fixed keys, the budget, ``swept`` and the seed; its recipe
    checked by the engine's validation; its folder named by its whole command."""
    cwd = Path.cwd()
    budget: dict[str, Any] = {}
    if sweep.epochs is not None:
        budget["train.epochs"] = sweep.epochs
    if sweep.prune.kind != "none":
        budget["train.eval_every"] = 1  # every epoch reports to the pruner
    if subset_root is not None:
        budget["data.root"] = str(subset_root)
        if sweep.subset and sweep.subset.classes:
            n = len(sweep.subset.classes)
            if sweep.fixed.get("data.num_classes", n) != n:
                raise SweepError(f"{sweep.path}: [budget.subset] keeps {n} classes but [set] says data.num_classes = "
                                 f"{sweep.fixed['data.num_classes']}; remove it (the subset sets it)")
            budget["data.num_classes"] = n
    values = {**sweep.fixed, **budget, **swept, "train.seed": seed}
    overrides = tuple(f"{k}={format_value(v)}" for k, v in values.items())
    try:
        cfg = load_config(sweep.base, overrides)
    except ConfigError as e:
        raise SweepError(f"{sweep.path}: {e}") from None
    if subset_root is not None and cfg.data.pipeline == "reference":
        raise SweepError(f"{sweep.path}: [budget.subset] needs data.pipeline = ffcv or dali (the reference "
                         f"pipeline reads the converter's source tree, all of it); set it in [set]")
    identity = json.dumps([os.path.relpath(sweep.base, cwd), overrides, sweep.max_steps])
    name = f"{slug(swept, seed)}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"
    return TrialSpec(name=name, folder=str((out / "trials" / name).resolve()), base=str(sweep.base), cwd=str(cwd),
                     swept=dict(swept), seed=seed, overrides=overrides, max_steps=sweep.max_steps)


def check_data(trial: TrialSpec) -> None:
    """The engine's own data-root check, once before launching: a missing dataset is one error, not N."""
    from pipelines.build import DataError, check_data_root  # imports torch: only when about to launch

    cfg = load_config(trial.base, trial.overrides)
    if cfg.data.pipeline == "synthetic":
        return
    try:
        check_data_root(cfg.data)
    except DataError as e:
        raise SweepError(f"{e}{_demo_hint(cfg.data.root)}") from None


def subset_folder(subset: Subset, out: Path, sweep_path: Path) -> tuple[Path, Path]:
    """(source tree, ``OUT/subset-<hash of the converter settings>``): known without converting, so
    --dry-run and --report-only name the same trials as the run that made the subset."""
    src = Path(subset.src)
    if not src.is_absolute() and not src.is_dir():
        src = sweep_path.parent / subset.src
    if not src.is_dir():
        raise SweepError(f"[budget.subset] src {subset.src} is not a folder (give the class-folder tree to convert)"
                         f"{_demo_hint(subset.src)}")
    settings = json.dumps([str(src.resolve()), subset.classes, subset.limit_per_class, sorted(subset.formats)])
    return src, (out / f"subset-{hashlib.sha1(settings.encode()).hexdigest()[:8]}").resolve()


def prepare_subset(subset: Subset, out: Path, sweep_path: Path) -> Path:
    """Run the converter once into :func:`subset_folder`; reruns reuse a finished one."""
    src, dest = subset_folder(subset, out, sweep_path)
    if (dest / "manifest.json").is_file():
        return dest
    from pipelines.convert.convert import FORMATS, Settings, convert, skip_problems
    from pipelines.convert.sources import SourceError
    from pipelines.convert.state import StateError

    settings = Settings(formats=tuple(f for f in FORMATS if f in subset.formats), classes=tuple(subset.classes) or None,
                        limit_per_class=subset.limit_per_class or None)
    print(f"sweep: making the data subset: {src} -> {dest} ({', '.join(settings.formats)}"
          + (f"; classes {', '.join(subset.classes)}" if subset.classes else "")
          + (f"; {subset.limit_per_class} per class" if subset.limit_per_class else "") + ")", flush=True)
    try:
        manifest = convert(src, dest, settings, subset.workers, progress=False, log=lambda msg: None)
    except (ValueError, SourceError, StateError, OSError) as e:
        raise SweepError(f"[budget.subset] the converter failed: {e}") from None
    problems = skip_problems(manifest, SKIP_LIMIT)
    if problems:
        raise SweepError(f"[budget.subset] the converter failed: {problems[0]}")
    return dest


# --------------------------------------------------------------------------- before launching
def default_out(sweep_path: str | Path) -> Path:
    """The sweep folder when none is given: runs/sweeps/<sweep file name>."""
    return Path("runs") / "sweeps" / Path(sweep_path).stem


def plan_sweep(sweep: Sweep, out: Path, prepare: bool = True) -> list[TrialSpec]:
    """The trials of ``sweep`` in ``out``. With a ``[budget.subset]``, ``prepare`` makes the subset
    once (the converter) before planning; without it (dry run, report only) only its folder is named."""
    if sweep.subset is None:
        return plan(sweep, out, None)
    # the subset's folder is known without converting (a missing source stops here), so every trial's
    # recipe is checked before the converter runs: a typo in [set] costs nothing on ImageNet
    trials = plan(sweep, out, subset_folder(sweep.subset, out, sweep.path)[1])
    if prepare:
        out.mkdir(parents=True, exist_ok=True)
        prepare_subset(sweep.subset, out, sweep.path)
    return trials


def start_sweep(sweep: Sweep, todo: list[TrialSpec], out: Path) -> None:
    """Before launching: the data root is checked once and the sweep file copied to OUT/sweep.toml
    (what produced these results)."""
    check_data(todo[0])
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sweep.path, out / "sweep.toml")


def budget_text(sweep: Sweep) -> str:
    """The sweep's budget in words, for the tables' title: seeds, epochs, steps, subset."""
    parts = [f"{len(sweep.seeds)} seed{'s' if len(sweep.seeds) > 1 else ''}"]
    if sweep.epochs is not None:
        parts.append(f"{sweep.epochs} epoch{'s' if sweep.epochs > 1 else ''}")
    if sweep.max_steps is not None:
        parts.append(f"max {sweep.max_steps} steps")
    if sweep.subset is not None:
        parts.append(" x ".join(filter(None, [f"{len(sweep.subset.classes)} classes" if sweep.subset.classes else "",
                                              f"<= {sweep.subset.limit_per_class}/class"
                                              if sweep.subset.limit_per_class else ""])))
    return ", ".join(parts)
