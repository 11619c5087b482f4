"""Running a sweep's trials: each trial is an ordinary ``python -m engine.run`` process, run locally N
at a time or on Slurm as one array job (one array task per trial, ``[run] parallel`` at a time).

On Slurm each trial is a run like any other launched by :mod:`workflows.slurm_launch`: the same
generated job script, so a trial stops with a checkpoint at the early signal before its time limit
and requeues itself, stops with one at preemption and is requeued by Slurm, and resumes from its
checkpoints at every start; its array task runs :func:`run_trial` on the compute node
(``python -m workflows.slurm_task trial FOLDER``, reading ``trial-spec.json``), which is why this logic
lives in ``workflows`` and not in ``tools/sweep.py``. The sweep waits for the tasks, following each
trial's current job (``slurm/job``: a requeued task keeps its id, a successor job has its own), and
can be left: ``--report-only`` collects what is done at any time (:mod:`workflows.sweep.report`).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from common.fileio import commit
from common.stop_signals import STOP_SIGNALS
from workflows.sweep.plan import SweepError, TrialSpec, format_value

STOPPED_WITH_CHECKPOINT = tuple(128 + sig for sig in STOP_SIGNALS)  # the engine's exit after a stop: 130, 143, 140
POLL_S = 5.0  # how often the sweep looks at Slurm's queue and the trials' records


# --------------------------------------------------------------------------- one trial
def read_trial(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "trial.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_trial(folder: Path, record: dict[str, Any]) -> None:
    tmp = folder / "trial.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    commit(tmp, folder / "trial.json")


def final_eval(metrics_path: Path) -> dict[str, Any] | None:
    """The run's final evaluation: the last record of metrics.jsonl when it is an eval record (the engine
    logs the final eval last; a run that died after an intermediate eval ends with train records)."""
    try:
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return None
    try:
        last = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # a line cut by a kill
        return None
    return last if "val_top1" in last else None


def run_trial(spec: TrialSpec, gpu: str | None = None, env: dict[str, str] | None = None, bound=None,
              metric: str = "val_top1", budget_epochs: int | None = None) -> dict[str, Any]:
    """Run one trial to the end (resuming its own checkpoints) and write ``trial.json``.

    Done means: the engine exited 0 and metrics.jsonl ends with the final eval record. A done trial
    is returned as is (a requeued Slurm job does not train it twice). ``interrupted``: the engine
    stopped with a checkpoint (Ctrl-C, SIGTERM, the early signal before a time limit) and the next
    launch continues it.

    ``bound`` (``workflows.sweep.study.Bound``): the study trial it reports to. Every evaluation the
    run writes is reported as it appears (``metric`` after its epoch); when the pruner stops the
    trial before ``budget_epochs``, the run is stopped as a preemption stops it (SIGTERM: the agreed
    stop and an ``interrupted`` checkpoint) and the trial is ``pruned`` at that epoch."""
    folder = Path(spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    prev = read_trial(folder) or {}
    if prev.get("status") in FINISHED:
        return prev
    resume = any(folder.glob("ckpt-*.pt"))
    metrics = folder / "metrics.jsonl"
    if not resume and metrics.exists():  # a restart from scratch: keep the old records out of the results
        metrics.rename(folder / f"metrics.attempt{prev.get('launches', 0)}.jsonl")
    cmd = spec.command(resume=resume)
    record = {"name": spec.name, "swept": spec.swept, "seed": spec.seed, "overrides": list(spec.overrides),
              "max_steps": spec.max_steps, "command": cmd, "cwd": spec.cwd, "status": "running",
              "launches": prev.get("launches", 0) + 1, "wall_s": prev.get("wall_s", 0.0), "metrics": None,
              "returncode": None, "error": None}
    if bound is not None:
        record["study_trial"] = bound.trial.number
    _write_trial(folder, record)
    child_env = {**os.environ, **(env or {})}
    if gpu is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = gpu
    log_path = folder / "log.txt"
    start = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.monotonic()
    pruned_at = None
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        if bound is None:
            rc = proc.wait()
        else:
            pruned_at = _follow(proc, bound, metrics, metric, budget_epochs, folder)
            rc = proc.returncode
    final = final_eval(metrics)
    done = rc == 0 and final is not None
    if pruned_at is not None and final is not None and budget_epochs is not None \
            and int(final["epoch"]) + 1 >= budget_epochs:
        pruned_at, done = None, True  # the pruner spoke after the run had finished its last epoch: it is complete
    lines = log_path.read_text(errors="replace")[start:].splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    stops = [ln for ln in lines if ln.startswith("stopped by ")]
    interrupted = not done and not errors and rc in STOPPED_WITH_CHECKPOINT
    if pruned_at is not None and interrupted:
        status, error = "pruned", None
    else:
        status = "done" if done else "interrupted" if interrupted else "failed"
        error = None if done else (stops[-1] if interrupted and stops else errors[-1] if errors
                                   else f"exit status {rc}; see {log_path}")
    record.update(status=status, returncode=rc, metrics=final if done else None, error=error,
                  wall_s=round(record["wall_s"] + time.monotonic() - t0, 2),
                  **({"pruned_at_epoch": pruned_at - 1} if status == "pruned" else {}))  # its last evaluated epoch
    _write_trial(folder, record)
    if bound is not None:
        (folder / "heartbeat").unlink(missing_ok=True)  # no runner any more: the next sweep may take it over
        if status != "interrupted":  # an interrupted trial stays RUNNING: its resume reports on
            bound.finish(status, final.get(metric) if done else None)
    return record


FINISHED = ("done", "pruned")  # a trial in these states is never run again


def _follow(proc: subprocess.Popen, bound, metrics: Path, metric: str, budget_epochs: int | None,
            folder: Path) -> int | None:
    """While the run goes: report each evaluation to the study, keep the trial's heartbeat, stop the
    run when the pruner says so; the epoch it was pruned at, or None."""
    from workflows.sweep.study import HEARTBEAT_S, heartbeat

    pruned_at, beat = None, 0.0
    while True:
        finished = proc.poll() is not None
        if time.monotonic() - beat >= HEARTBEAT_S:
            heartbeat(folder)
            beat = time.monotonic()
        for rec in _eval_records(metrics):
            epochs = int(rec["epoch"]) + 1
            if metric not in rec or pruned_at is not None:
                continue
            if bound.report(epochs, float(rec[metric])) and not finished and \
                    (budget_epochs is None or epochs < budget_epochs):
                pruned_at = epochs
                proc.send_signal(signal.SIGTERM)  # the engine's agreed stop: an interrupted checkpoint, exit 143
        if finished:
            return pruned_at
        time.sleep(FOLLOW_S)


FOLLOW_S = 1.0  # how often a running trial's metrics are read for new evaluations


def _eval_records(metrics: Path) -> list[dict[str, Any]]:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        if "val_top1" in rec:
            out.append(rec)
    return out


# --------------------------------------------------------------------------- executors
def visible_gpus() -> list[str]:
    """GPU ids a local slot can be pinned to (CUDA_VISIBLE_DEVICES entries, else 0..n-1); [] on CPU."""
    import torch

    n = torch.cuda.device_count()
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def local_slots(parallel: int) -> tuple[list[str], dict[str, str]]:
    """(the GPU of each of the ``parallel`` slots, the trials' environment): one GPU per trial; on CPU
    each of the processes gets an equal share of the cores."""
    gpus = visible_gpus()
    if gpus and parallel > len(gpus):
        raise SweepError(f"[run] parallel = {parallel} but {len(gpus)} GPU(s) are visible; one trial per GPU, "
                         f"so set parallel <= {len(gpus)}")
    env = {}
    if not gpus and parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return gpus, env


def run_local(trials: list[TrialSpec], parallel: int, on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    """N trials at a time as subprocesses; slot i owns GPU i (one GPU per trial), on CPU each of the N
    processes gets an equal share of the cores."""
    gpus, env = local_slots(parallel)
    slots: queue.Queue[int] = queue.Queue()
    for i in range(parallel):
        slots.put(i)

    def work(trial: TrialSpec) -> dict[str, Any]:
        slot = slots.get()
        try:
            record = run_trial(trial, gpu=gpus[slot] if gpus else None, env=env)
        finally:
            slots.put(slot)
        on_done(record)
        return record

    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        futures = [pool.submit(work, t) for t in trials]
        return [f.result() for f in futures]
    except KeyboardInterrupt:  # Ctrl-C reached the running engines too: they checkpoint and stop
        pool.shutdown(wait=True, cancel_futures=True)  # and no queued trial starts
        raise
    finally:
        pool.shutdown(wait=True)


def run_study_local(sweep, trials: list[TrialSpec], out: Path, parallel: int, url: str | None,
                    on_done: Callable[[dict], None], make_spec) -> list[dict[str, Any]]:
    """An adaptive sweep here: ``parallel`` workers, each taking the next trial (the plan's, in order, for
    grid and random; the sampler's proposal for TPE, after any trial a dead worker left RUNNING) and
    running it bound to its study trial (:func:`run_trial`). Stops asking for trials at a Ctrl-C."""
    import threading

    from workflows.sweep import study as st

    study = st.open_study(sweep, out, url)
    gpus, env = local_slots(parallel)
    lock, stop = threading.Lock(), threading.Event()
    todo = list(trials) if sweep.sampler != "tpe" else []
    orphans = st.running_without_runner(study) if sweep.sampler == "tpe" else []
    results: list[dict[str, Any]] = []
    metric = sweep.prune.metric

    def next_trial():
        with lock:
            while todo:
                spec = todo.pop(0)
                bound = st.bind(study, spec, metric)
                if bound is not None:
                    return bound
            while orphans:
                spec_file = Path(orphans.pop(0)) / "trial-spec.json"
                if spec_file.is_file():
                    bound = st.bind(study, TrialSpec.from_json(json.loads(spec_file.read_text())), metric)
                    if bound is not None:
                        return bound
            if sweep.sampler == "tpe" and not stop.is_set():
                return st.tpe_next(study, sweep, make_spec, metric)
            return None

    def worker(slot: int) -> None:
        while not stop.is_set():
            bound = next_trial()
            if bound is None:
                return
            folder = Path(bound.spec.folder)
            st.heartbeat(folder)
            (folder / "trial-spec.json").write_text(json.dumps(bound.spec.to_json(), indent=1) + "\n")
            record = run_trial(bound.spec, gpu=gpus[slot] if gpus else None, env=env, bound=bound, metric=metric,
                               budget_epochs=sweep.epochs)
            if record["status"] == "interrupted":  # Ctrl-C reached the engines: ask for no more trials
                stop.set()
            with lock:
                results.append(record)
            on_done(record)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(parallel)]
    for t in threads:
        t.start()
    # Waiting by polling, not Thread.join: a KeyboardInterrupt inside a join can leave the thread's
    # lock so that a later join returns at once, and the sweep would exit before its trials' records
    try:
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
    except KeyboardInterrupt:  # the engines got it too: they checkpoint and stop; their trials stay RUNNING
        stop.set()
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
        raise
    return results


def study_trials(out: Path) -> list[TrialSpec]:
    """The trials an adaptive sweep has run or is running (their folders' trial-spec.json), oldest
    first: a TPE sweep's list, which its plan cannot know in advance."""
    specs = []
    for spec_file in sorted((out / "trials").glob("*/trial-spec.json"), key=lambda p: p.stat().st_mtime):
        try:
            specs.append(TrialSpec.from_json(json.loads(spec_file.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return specs


def slurm_job(trials: list[TrialSpec], folder: Path, parallel: int, options: dict[str, Any]):
    """The array job of ``trials`` (task i runs trial i) from the [run.slurm] table."""
    from common.config import ConfigError, load_config
    from workflows.slurm_launch import (DEFAULT_LEAD_S, DEFAULT_MAX_REQUEUES, Job, LaunchError, Resources, RunEntry,
                                        choose_cpus_and_memory, node_shape)

    extra = options.get("sbatch_args", [])
    if isinstance(extra, str) or not all(isinstance(a, str) for a in extra):
        raise SweepError('[run.slurm] sbatch_args must be a list of sbatch options, e.g. ["--qos=high"]')
    try:
        resources = Resources(nodes=1, tasks_per_node=1, gpus_per_node=int(options.get("gpus_per_node", 1)),
                              cpus_per_task=options.get("cpus_per_task"), time=str(options.get("time", "24:00:00")),
                              partition=options.get("partition"), account=options.get("account"),
                              sbatch_args=tuple(extra), mem=options.get("mem"))
        workers = max(load_config(t.base, t.overrides).data.workers for t in trials)  # validated by the plan
        resources = choose_cpus_and_memory(resources, workers, node_shape(resources.partition))
        job = Job(name=f"sweep-{folder.parent.name}", folder=folder,
                  runs=[RunEntry(Path(t.folder), ["trial", t.folder]) for t in trials], resources=resources,
                  signal_lead_s=int(options.get("signal_lead_s", DEFAULT_LEAD_S)),
                  max_requeues=int(options.get("max_requeues", DEFAULT_MAX_REQUEUES)), array=True, parallel=parallel)
        job.check()
    except (LaunchError, ConfigError, TypeError, ValueError) as e:
        raise SweepError(f"[run.slurm]: {e}") from None
    return job


def check_executor(executor: str) -> None:
    """Before anything is made (a data subset, trial folders): the executor can run here. Slurm: sbatch
    on PATH and a controller that answers squeue; one line otherwise."""
    if executor != "slurm":
        return
    if shutil.which("sbatch") is None:
        raise SweepError("executor slurm: sbatch is not on PATH; run the sweep on a Slurm login node, or use "
                         "--executor local")
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SweepError(f"executor slurm: squeue did not answer ({e}); run the sweep where a Slurm controller is "
                         f"reachable, or use --executor local") from None
    if proc.returncode != 0:
        said = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip()), f"exit {proc.returncode}")
        raise SweepError(f"executor slurm: squeue cannot reach a Slurm controller ({said}); run the sweep on a Slurm "
                         f"login node, or use --executor local")


def run_study_slurm(sweep, trials: list[TrialSpec], out: Path, parallel: int, url: str | None,
                    on_done: Callable[[dict], None], make_spec) -> list[dict[str, Any]]:
    """An adaptive sweep on Slurm: every array task is a worker of the same study (its trial-spec.json
    names the study, the journal in the sweep folder is shared). Grid and random: one array job of
    the plan's trials. TPE: rounds of ``parallel`` proposals, each an array job, the next round
    proposed from what the study knows by then (a trial left RUNNING by a dead job is resumed first)."""
    from workflows.sweep import study as st

    study = st.open_study(sweep, out, url)
    args = st.study_args(sweep, out, url)
    if sweep.sampler != "tpe":
        return run_slurm(trials, out / "slurm", parallel, sweep.slurm, on_done, study=args)
    results: list[dict[str, Any]] = []
    orphans = [f for f in st.running_without_runner(study) if (Path(f) / "trial-spec.json").is_file()]
    while True:
        batch = [TrialSpec.from_json(json.loads((Path(f) / "trial-spec.json").read_text())) for f in orphans[:parallel]]
        orphans = orphans[parallel:]
        while len(batch) < parallel and (bound := st.tpe_next(study, sweep, make_spec, sweep.prune.metric)):
            batch.append(bound.spec)
        if not batch:
            return results
        results += run_slurm(batch, out / "slurm", parallel, sweep.slurm, on_done, study=args)


def run_slurm(trials: list[TrialSpec], folder: Path, parallel: int, options: dict[str, Any],
              on_done: Callable[[dict], None], poll_s: float = POLL_S, study: dict | None = None) -> list[dict[str, Any]]:
    """Submit the trials as one array job (``parallel`` tasks at a time) and wait until Slurm lists
    none of them any more. A trial whose job is still queued or running (a sweep started before and
    left) is waited for, not submitted again. A trial whose job ended without a final record (the
    node died, a hard kill) is recorded ``failed`` with its log's last line."""
    from workflows.slurm_launch import LaunchError

    try:
        return _run_slurm(trials, folder, parallel, options, on_done, poll_s, study)
    except LaunchError as e:  # sbatch refused, squeue failed: one line
        raise SweepError(str(e)) from None


def _run_slurm(trials: list[TrialSpec], folder: Path, parallel: int, options: dict[str, Any],
               on_done: Callable[[dict], None], poll_s: float, study: dict | None = None) -> list[dict[str, Any]]:
    from workflows import slurm_launch

    if shutil.which("sbatch") is None:
        raise SweepError("executor slurm: sbatch is not on PATH; run the sweep on a Slurm login node, or use "
                         "--executor local")
    listed = slurm_launch.queue_states()
    todo = [t for t in trials if slurm_launch.current_job(Path(t.folder)) not in listed]
    if len(todo) < len(trials):
        print(f"sweep: {len(trials) - len(todo)} trial(s) already queued or running in Slurm: waiting for them",
              flush=True)
    if todo:
        job = slurm_job(todo, folder, parallel, options)
        for t in todo:
            Path(t.folder, "slurm").mkdir(parents=True, exist_ok=True)
            spec = {**t.to_json(), **({"study": study} if study else {})}  # a worker of the study, on its node
            (Path(t.folder) / "trial-spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        array = slurm_launch.submit(job)
        for i, t in enumerate(todo):
            (Path(t.folder) / "slurm" / "job").write_text(f"{array}_{i}\n")
            prev = read_trial(t.folder) or {"name": t.name, "swept": t.swept, "seed": t.seed, "launches": 0}
            _write_trial(Path(t.folder), {**prev, "status": "queued", "job": f"{array}_{i}"})
        print(f"sweep: submitted array job {array} ({len(todo)} trial(s), {parallel} at a time); each trial's "
              f"log: <trial>/slurm/job.log; watch with squeue -j {array}", flush=True)
    waiting, results = {t.name: t for t in trials}, {}
    while waiting:
        listed = slurm_launch.queue_states()
        for name, t in list(waiting.items()):
            job_id = slurm_launch.current_job(Path(t.folder))
            if job_id in listed:
                continue
            record = read_trial(t.folder) or {"name": t.name, "swept": t.swept, "seed": t.seed}
            if record.get("status") not in ("done", "pruned", "failed", "interrupted"):
                record.update(status="failed", error=f"job {job_id} ended without a result: "
                                                     f"{_last_line(Path(t.folder) / 'slurm' / 'job.log')}")
                _write_trial(Path(t.folder), record)
            del waiting[name]
            results[name] = record
            on_done(record)
        if waiting:
            time.sleep(poll_s)
    return [results[t.name] for t in trials]


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return f"no log at {path}"
    return lines[-1] if lines else f"{path} is empty"


def pending(trials: list[TrialSpec]) -> list[TrialSpec]:
    """Trials not yet finished (never run, failed, interrupted, or cut short); pruned ones are finished."""
    return [t for t in trials if (read_trial(t.folder) or {}).get("status") not in FINISHED]


def trial_summary(record: dict[str, Any]) -> str:
    swept = ", ".join(f"{k}={format_value(v)}" for k, v in record.get("swept", {}).items()) or "base"
    head = f"{swept} seed {record.get('seed')}"
    if record.get("status") == "done":
        m = record["metrics"]
        return f"{head}: val top-1 {m['val_top1']:.2f} (step {m['step']}, {record['wall_s']:.0f} s)"
    if record.get("status") == "pruned":
        return f"{head}: pruned after epoch {record['pruned_at_epoch']} ({record['wall_s']:.0f} s)"
    return f"{head}: {record.get('status')} - {record.get('error')}"


def run_adaptive(sweep, todo: list[TrialSpec], executor: str, parallel: int, out: Path, storage: str | None,
                 on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    """An adaptive sweep's trials through the chosen executor (:func:`run_study_local`,
    :func:`run_study_slurm`); TPE's trials are made as proposed (``trial_spec`` of each proposal)."""
    from workflows.sweep.plan import subset_folder, trial_spec

    subset_root = subset_folder(sweep.subset, out, sweep.path)[1] if sweep.subset is not None else None
    make = lambda swept, seed: trial_spec(sweep, out, subset_root, swept, seed)  # noqa: E731
    if executor == "local":
        return run_study_local(sweep, todo, out, parallel, storage, on_done, make)
    return run_study_slurm(sweep, todo, out, parallel, storage, on_done, make)


def run_trials(todo: list[TrialSpec], executor: str, parallel: int, out: Path, slurm: dict[str, Any],
               on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    """``todo`` through the chosen executor (see :data:`EXECUTORS`); Slurm's job script is OUT/slurm/job.sh."""
    if executor == "local":
        return run_local(todo, parallel, on_done)
    return run_slurm(todo, out / "slurm", parallel, slurm, on_done)
