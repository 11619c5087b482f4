"""Adaptive sweeps: trials that report each epoch's evaluation to an Optuna study, which stops losing
ones early (ASHA, Hyperband, median) and, with TPE, proposes the next configuration.

Why Optuna (Akiba et al. 2019): its samplers (TPE, random, a grid of our own trials), pruners
(successive halving as ASHA, Li et al. 2020; Hyperband, Li et al. 2018; the median rule) and
storages that many workers share are what W&B sweeps and Ray Tune offer, in a library that needs no
server. The engine does not import it: a trial is still ``python -m engine.run`` in its own folder;
the trial runner (``workflows.sweep.run.run_trial``) follows the run's ``metrics.jsonl`` as it is
written, reports every evaluation (``val_top1`` at epoch ``e`` as step ``e + 1``, the epochs trained
so far) and, when the pruner says so, stops the run as a preemption stops it: SIGTERM, the agreed
stop, an ``interrupted`` checkpoint; the trial is recorded ``pruned`` at that epoch, its folder kept.

Each of our trials is bound to one study trial, remembered in its folder (``study.json``): a trial
resumed after a preemption, a crash of the sweep or a rerun reports to that same study trial. A
study trial still RUNNING whose runner is gone (no heartbeat in its folder for :data:`STALE_S`) is
taken over and resumed, never started again; a FAILED one is retried as a new study trial.

Storage: by default Optuna's journal file in the sweep folder (``OUT/study.journal``), meant for
shared file systems: appends under ``JournalFileOpenLock`` (a lock file made with ``open(O_CREAT |
O_EXCL)``, atomic on NFSv3 and later, Lustre and GPFS). ``--storage URL`` names a site's database
(``postgresql://``, ``mysql://``). SQLite on a shared file system is refused: its locking relies on
``fcntl``, which many NFS implementations break (Optuna's issues #815, #820, #1300, #6036).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workflows.sweep.plan import PRUNERS, Sweep, SweepError, TrialSpec, format_value

STALE_S = 120.0  # a RUNNING study trial whose folder's heartbeat is older than this has lost its runner
HEARTBEAT_S = 15.0  # how often a runner touches its trial's heartbeat
JOURNAL = "study.journal"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SweepError("[search] sampler = tpe and [prune] need Optuna: pip install -e '.[sweep]' "
                         "(or make setup)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_for(out: Path, url: str | None):
    """The study's storage: the journal file in ``out`` by default, else ``url`` (see the module doc)."""
    optuna = _optuna()
    if url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        out.mkdir(parents=True, exist_ok=True)
        path = str(out / JOURNAL)
        return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if url.startswith("sqlite:"):
        from workflows.slurm_launch import SHARED_FILE_SYSTEMS, file_system

        db = Path(url.split(":///", 1)[-1]) if ":///" in url else None
        found = file_system(db.parent if db is not None else Path.cwd())
        if found is not None and found[1] in SHARED_FILE_SYSTEMS:
            raise SweepError(f"--storage {url}: SQLite on a shared file system ({found[1]} at {found[0]}) loses or "
                             f"corrupts trials when several workers write (its fcntl locks are not reliable there); "
                             f"use the default journal file in the sweep folder, or a PostgreSQL/MySQL URL")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # a bad URL, a database that does not answer, a driver that is not installed
        raise SweepError(f"--storage {url}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def study_args(sweep: Sweep, out: Path, url: str | None) -> dict[str, Any]:
    """What a worker elsewhere (a Slurm array task) needs to open the sweep's study: JSON."""
    from dataclasses import asdict

    return {"name": sweep.path.stem, "out": str(out.resolve()), "storage": url, "sampler": sweep.sampler,
            "seed": sweep.random_seed, "epochs": sweep.epochs, "prune": asdict(sweep.prune)}


def open_study(sweep: Sweep, out: Path, url: str | None = None):
    """The sweep's study, created at its first run and continued by every later one (and by every
    worker of the same sweep)."""
    return open_study_from(study_args(sweep, out, url))


def open_study_from(args: dict[str, Any]):
    """:func:`open_study` from :func:`study_args` (a Slurm task reads them from its trial-spec.json)."""
    from workflows.sweep.plan import Prune

    optuna = _optuna()
    p = Prune(**args["prune"])
    if p.kind == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    elif p.kind == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=p.min_epochs, max_resource=args["epochs"],
                                                reduction_factor=p.reduction_factor)
    elif p.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_epochs - 1)
    else:
        pruner = optuna.pruners.NopPruner()
    assert p.kind in PRUNERS
    sampler = (optuna.samplers.TPESampler(seed=args["seed"]) if args["sampler"] == "tpe"
               else optuna.samplers.RandomSampler(seed=args["seed"]))  # grid/random: our trials, fixed
    return optuna.create_study(study_name=args["name"], storage=storage_for(Path(args["out"]), args["storage"]),
                               sampler=sampler, pruner=pruner, direction=p.direction, load_if_exists=True)


# --------------------------------------------------------------------------- one trial in the study
def _record_path(folder: Path) -> Path:
    return Path(folder) / "study.json"


def heartbeat(folder: Path) -> None:
    (Path(folder) / "heartbeat").write_text(f"{time.time():.0f} {os.getpid()}\n")


def alive(folder: Path) -> bool:
    """Some runner is running this trial now (its heartbeat is fresh)."""
    try:
        return time.time() - (Path(folder) / "heartbeat").stat().st_mtime < STALE_S
    except OSError:
        return False


@dataclass
class Bound:
    """Our trial and its study trial."""

    study: Any
    trial: Any  # optuna.Trial (RUNNING)
    spec: TrialSpec

    def report(self, epochs: int, value: float) -> bool:
        """Report the evaluation after ``epochs`` epochs; True when the pruner stops this trial."""
        if epochs in self.trial.storage_reported_steps():
            return False
        self.trial.report(value, epochs)
        return self.trial.should_prune()

    def finish(self, state: str, value: float | None = None) -> None:
        optuna = _optuna()
        states = {"done": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                  "failed": optuna.trial.TrialState.FAIL}
        self.study.tell(self.trial.number, value if state == "done" else None, state=states[state],
                        skip_if_finished=True)


def _existing(study, folder: Path):
    """The study trial recorded in ``folder`` and its state name, or (None, None)."""
    try:
        number = json.loads(_record_path(folder).read_text())["number"]
    except (OSError, ValueError, KeyError):
        return None, None
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return t, t.state.name
    return None, None


def bind(study, spec: TrialSpec, metric: str) -> Bound | None:
    """The study trial this trial reports to: the one recorded in its folder while it is RUNNING
    (a resumed trial keeps it), else a new one carrying the trial's values and its folder. None when
    the study has already finished it (complete or pruned: nothing to run)."""
    optuna = _optuna()
    folder = Path(spec.folder)
    found, state = _existing(study, folder)
    if state in ("COMPLETE", "PRUNED"):
        return None
    if state == "RUNNING":
        trial = optuna.trial.Trial(study, found._trial_id)
    else:  # never bound, or FAIL: a new study trial (a failed one is not continued)
        trial = study.ask()
        # our own values, as attributes (the pruners compare reports, not parameters; a parameter whose
        # choices change from trial to trial is refused by Optuna's distributions)
        trial.set_user_attr("swept", {k: v for k, v in spec.swept.items()})
        trial.set_user_attr("seed", spec.seed)
        trial.set_user_attr("folder", spec.folder)
        trial.set_user_attr("name", spec.name)
        folder.mkdir(parents=True, exist_ok=True)
        _record_path(folder).write_text(json.dumps({"number": trial.number, "metric": metric}) + "\n")
    return Bound(study, _Reported(trial), spec)


class _Reported:
    """An Optuna trial that knows which steps the storage already holds (a resumed trial reports only
    the epochs it had not reported; Optuna warns and ignores a step reported twice)."""

    def __init__(self, trial):
        self._trial = trial

    def __getattr__(self, name):
        return getattr(self._trial, name)

    def storage_reported_steps(self) -> set[int]:
        frozen = self._trial.study._storage.get_trial(self._trial._trial_id)
        return set(frozen.intermediate_values)


# --------------------------------------------------------------------------- TPE: the next configuration
def tpe_next(study, sweep: Sweep, make_spec, metric: str) -> Bound | None:
    """A new configuration from the sampler (the [random] space as its search space) and the seed of
    its turn; None when the study already holds ``[random] trials`` trials that are not FAILED."""
    optuna = _optuna()
    alive_trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    if len(alive_trials) >= sweep.random_trials * len(sweep.seeds):
        return None
    # a sampler seeded by the trial's turn: the same proposals in a fresh folder, and after a restart of
    # the sweep (one sampler for the whole sweep would start its random draws again in the new process)
    study.sampler = optuna.samplers.TPESampler(seed=sweep.random_seed + len(study.trials))
    trial = study.ask()
    swept = {}
    for key, spec in sweep.random_space.items():
        if isinstance(spec, list):
            swept[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            swept[key] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            value = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
            swept[key] = float(f"{value:.3g}")  # as [random] rounds: readable names, no false precision
    seed = sweep.seeds[trial.number % len(sweep.seeds)]
    trial.set_user_attr("seed", seed)
    spec = make_spec(swept, seed)
    trial.set_user_attr("folder", spec.folder)
    trial.set_user_attr("name", spec.name)
    Path(spec.folder).mkdir(parents=True, exist_ok=True)
    _record_path(Path(spec.folder)).write_text(json.dumps({"number": trial.number, "metric": metric}) + "\n")
    return Bound(study, _Reported(trial), spec)


def running_without_runner(study) -> list[str]:
    """Folders of RUNNING study trials whose runner is gone (a dead worker, a killed sweep): to resume."""
    optuna = _optuna()
    return [t.user_attrs["folder"] for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING and "folder" in t.user_attrs
            and not alive(Path(t.user_attrs["folder"]))]


def study_states(study) -> dict[str, dict[str, Any]]:
    """Per trial folder: its study trial's state, the epoch it was pruned at, and its reports."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        folder = t.user_attrs.get("folder")
        if folder is None:
            continue
        steps = sorted(t.intermediate_values)
        out[folder] = {"number": t.number, "state": t.state.name, "epochs_reported": steps[-1] if steps else 0,
                       "reports": {int(k): v for k, v in t.intermediate_values.items()},
                       "value": t.value if t.value is not None and math.isfinite(t.value) else None}
    return out


def best_command(row: dict[str, Any], base: str, fixed: dict[str, Any]) -> str:
    """The best trial as a ready command: the base recipe with the sweep's fixed keys and its values."""
    sets = {**fixed, **{k: v for k, v in row.get("swept", {}).items()}, "train.seed": row.get("seed")}
    return f"python -m engine.run {base} " + " ".join(f"--set {k}={format_value(v)}" for k, v in sets.items())
