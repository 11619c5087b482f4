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
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from common.fileio import commit
from workflows.sweep.plan import SweepError, TrialSpec, format_value

STOPPED_WITH_CHECKPOINT = (130, 140, 143)  # the engine's exit after SIGINT, SIGUSR2, SIGTERM
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


def run_trial(spec: TrialSpec, gpu: str | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one trial to the end (resuming its own checkpoints) and write ``trial.json``.

    Done means: the engine exited 0 and metrics.jsonl ends with the final eval record. A done trial
    is returned as is (a requeued Slurm job does not train it twice). ``interrupted``: the engine
    stopped with a checkpoint (Ctrl-C, SIGTERM, the early signal before a time limit) and the next
    launch continues it."""
    folder = Path(spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    prev = read_trial(folder) or {}
    if prev.get("status") == "done":
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
    _write_trial(folder, record)
    child_env = {**os.environ, **(env or {})}
    if gpu is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = gpu
    log_path = folder / "log.txt"
    start = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    final = final_eval(metrics)
    done = rc == 0 and final is not None
    lines = log_path.read_text(errors="replace")[start:].splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    stops = [ln for ln in lines if ln.startswith("stopped by ")]
    interrupted = not done and not errors and rc in STOPPED_WITH_CHECKPOINT
    error = None if done else (stops[-1] if interrupted and stops else errors[-1] if errors
                               else f"exit status {rc}; see {log_path}")
    record.update(status="done" if done else "interrupted" if interrupted else "failed", returncode=rc,
                  metrics=final if done else None, wall_s=round(record["wall_s"] + time.monotonic() - t0, 2),
                  error=error)
    _write_trial(folder, record)
    return record


# --------------------------------------------------------------------------- executors
def visible_gpus() -> list[str]:
    """GPU ids a local slot can be pinned to (CUDA_VISIBLE_DEVICES entries, else 0..n-1); [] on CPU."""
    import torch

    n = torch.cuda.device_count()
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def run_local(trials: list[TrialSpec], parallel: int, on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    """N trials at a time as subprocesses; slot i owns GPU i (one GPU per trial), on CPU each of the N
    processes gets an equal share of the cores."""
    gpus = visible_gpus()
    if gpus and parallel > len(gpus):
        raise SweepError(f"[run] parallel = {parallel} but {len(gpus)} GPU(s) are visible; one trial per GPU, "
                         f"so set parallel <= {len(gpus)}")
    env = {}
    if not gpus and parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
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


def run_slurm(trials: list[TrialSpec], folder: Path, parallel: int, options: dict[str, Any],
              on_done: Callable[[dict], None], poll_s: float = POLL_S) -> list[dict[str, Any]]:
    """Submit the trials as one array job (``parallel`` tasks at a time) and wait until Slurm lists
    none of them any more. A trial whose job is still queued or running (a sweep started before and
    left) is waited for, not submitted again. A trial whose job ended without a final record (the
    node died, a hard kill) is recorded ``failed`` with its log's last line."""
    from workflows.slurm_launch import LaunchError

    try:
        return _run_slurm(trials, folder, parallel, options, on_done, poll_s)
    except LaunchError as e:  # sbatch refused, squeue failed: one line
        raise SweepError(str(e)) from None


def _run_slurm(trials: list[TrialSpec], folder: Path, parallel: int, options: dict[str, Any],
               on_done: Callable[[dict], None], poll_s: float) -> list[dict[str, Any]]:
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
            (Path(t.folder) / "trial-spec.json").write_text(json.dumps(t.to_json(), indent=1) + "\n")
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
            if record.get("status") not in ("done", "failed", "interrupted"):
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
    """Trials not yet done (never run, failed, interrupted, or cut short)."""
    return [t for t in trials if (read_trial(t.folder) or {}).get("status") != "done"]


def trial_summary(record: dict[str, Any]) -> str:
    swept = ", ".join(f"{k}={format_value(v)}" for k, v in record.get("swept", {}).items()) or "base"
    head = f"{swept} seed {record.get('seed')}"
    if record.get("status") == "done":
        m = record["metrics"]
        return f"{head}: val top-1 {m['val_top1']:.2f} (step {m['step']}, {record['wall_s']:.0f} s)"
    return f"{head}: {record.get('status')} - {record.get('error')}"


def run_trials(todo: list[TrialSpec], executor: str, parallel: int, out: Path, slurm: dict[str, Any],
               on_done: Callable[[dict], None]) -> list[dict[str, Any]]:
    """``todo`` through the chosen executor (see :data:`EXECUTORS`); Slurm's job script is OUT/slurm/job.sh."""
    if executor == "local":
        return run_local(todo, parallel, on_done)
    return run_slurm(todo, out / "slurm", parallel, slurm, on_done)
