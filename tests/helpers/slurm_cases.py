"""The Slurm cases (a-f of the cluster issue) on the throwaway two-node cluster
(tests/helpers/slurm_cluster.py), shared by tests/test_slurm.py and benchmarks/slurm.py (which
runs them all and records the figures)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import torch

from tests.helpers.engine_runs import metrics
from tests.helpers.faults import ENV, PY, ROOT, TINY, Row, engine_cmd, identical, one_record_per_step, weights
from tests.helpers.slurm_cluster import SlurmCluster

SETS = [*TINY, "train.log_every=1", "data.pipeline=reference"]  # a log point (a stop decision) every step


# case d: long enough (80 steps) that the early signal, which reaches the job 1-6 s after its start,
# lands while it trains also on a quiet machine (2 epochs can be over in 5 s)
D_EPOCHS = "train.epochs=8"
POLL_S = 0.2
WAIT_S = 600  # generous: a loaded 2-core machine; every wait polls and ends as soon as it can


def _time_of(line: str) -> float:
    """Unix time of a job-script line ``launch: [YYYY-mm-dd HH:MM:SS.mmm] ...``."""
    stamp = line.split("[", 1)[1].split("]", 1)[0]
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


class SlurmCases:
    """The cases on one cluster and one data set; the one-machine reference runs once."""

    def __init__(self, cluster: SlurmCluster, work: Path, data: Path, overlap: bool = True):
        self.cluster, self.work, self.data = cluster, Path(work), Path(data)
        self.overlap = overlap  # train a case's reference while the case waits on Slurm (False: timed figures)
        self._references: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        self.figures: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------ helpers
    def sets(self, *extra: str) -> list[str]:
        return [f"data.root={self.data}", *SETS, *extra]

    def reference(self, *extra: str) -> dict[str, torch.Tensor]:
        """torchrun, 2 ranks on this machine, same recipe (and ``extra``): what the 2-node job must end with."""
        if extra not in self._references:
            out = self.work / ("reference" + "".join(f"-{e.split('=')[-1]}" for e in extra))
            cmd = engine_cmd(self.data, out, "train.log_every=1", *extra, nproc=2, port=29790)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=WAIT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"the one-machine reference failed: {proc.stderr[-1500:]}")
            self._references[extra] = weights(out)
        return self._references[extra]

    def launch(self, name: str, *extra: str, launcher: str = "srun", time_limit: str = "10", lead: int = 60,
               sbatch_args: tuple[str, ...] = ()) -> tuple[str, Path]:
        from workflows.slurm_launch import Launch, Resources, launch_run

        out = self.work / name
        res = Resources(nodes=2, tasks_per_node=1, time=time_limit, sbatch_args=sbatch_args)
        done = launch_run(Launch(recipe=str(ROOT / "recipes" / "a3.toml"), out=out, overrides=self.sets(*extra),
                                 resources=res, launcher=launcher, signal_lead_s=lead))
        return done["job_id"], out

    def wait_end(self, job_id: str, timeout: float = WAIT_S) -> str:
        """Wait until Slurm no longer lists the job; its final state (scontrol keeps it MinJobAge)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and job_id in self.cluster.active_jobs():
            time.sleep(0.5)
        return self.cluster.job_state(job_id)

    def _poll(self, look, job: str | None, timeout: float):
        """``look()`` until it finds something, the job has ended (one last look), or the time is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = job is not None and job not in self.cluster.active_jobs()
            found = look()
            if found is not None or ended:
                return found
            time.sleep(POLL_S)
        return None

    def wait_step(self, out: Path, step: int, job: str | None = None, timeout: float = WAIT_S) -> dict | None:
        """The first train record at ``step`` or later."""
        def look():
            try:
                recs = metrics(out)
            except (OSError, ValueError):
                return None
            return next((r for r in recs if "train_loss" in r and r["step"] >= step), None)
        return self._poll(look, job, timeout)

    def wait_log(self, out: Path, text: str, job: str | None = None, timeout: float = WAIT_S) -> str | None:
        """The first whole line (its newline written) of the job log that holds ``text``."""
        return self._poll(lambda: next((ln for ln in self.log(out).split("\n")[:-1] if text in ln), None), job,
                          timeout)

    @staticmethod
    def log(out: Path) -> str:
        path = out / "slurm" / "job.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def starts(out: Path) -> list[str]:
        return [ln for ln in SlurmCases.log(out).splitlines() if ln.startswith("launch:") and "] start " in ln]

    @staticmethod
    def interrupted(out: Path) -> list[Path]:
        return [p for p in sorted(out.glob("ckpt-*.pt"))
                if torch.load(p, weights_only=True, map_location="cpu")["tag"] == "interrupted"]

    def wait_stop(self, out: Path, signal_name: str, job: str) -> tuple[str | None, list[Path], float]:
        """The engine's stop line, the interrupted checkpoints and the named one's mtime, read as soon
        as the line is out (the next start prunes old checkpoints: keep_last)."""
        line = self.wait_log(out, f"stopped by {signal_name}", job)
        if line is None:
            return None, [], float("nan")
        found = self.interrupted(out)
        named = Path(line.split("; checkpoint ")[1].split(";")[0])
        return line, found, named.stat().st_mtime if named.exists() else float("nan")

    @staticmethod
    def stop_step(line: str | None) -> int:
        return int(line.split(" step ")[1].split(";")[0]) if line else -1

    @staticmethod
    def first_step_after(out: Path, step: int) -> float:
        """Unix time of the first train record past ``step``: the next start's first step (a log
        point every step)."""
        recs = [r for r in metrics(out) if "train_loss" in r and r["step"] > step]
        return recs[0]["time"] if recs else float("nan")

    # ------------------------------------------------------------ cases
    def srun_two_nodes(self) -> Row:
        job, out = self.launch("a-srun")
        state = self.wait_end(job)
        same = (out / "model.safetensors").exists() and identical(weights(out), self.reference())
        starts = self.starts(out)
        ok = state == "COMPLETED" and same and len(starts) == 1 and "the run finished" in self.log(out)
        self.srun_out = out
        return Row("a: 2-node job through the launcher, srun mode (one task per node, ranks from Slurm)",
                   "COMPLETED after one start; weights bit-identical to torchrun 2 ranks on one machine",
                   f"{state}, {len(starts)} start(s); weights {'identical' if same else 'DIFFER'}", ok)

    def torchrun_two_nodes(self) -> Row:
        job, out = self.launch("b-torchrun", launcher="torchrun")
        state = self.wait_end(job)
        same = (out / "model.safetensors").exists() and identical(weights(out), self.reference())
        agents = [ln for ln in self.log(out).splitlines() if ln.startswith("slurm: torchrun on 2 node(s)")]
        ok = state == "COMPLETED" and same and len(agents) == 1
        return Row("b: the same with --launcher torchrun (2 agents, --nnodes 2, c10d on 127.0.0.1)",
                   "COMPLETED; weights bit-identical to one agent with 2 ranks",
                   f"{state}; {agents[0] if agents else 'no torchrun line'}; weights "
                   f"{'identical' if same else 'DIFFER'}", ok)

    def preempt(self) -> Row:
        job, out = self.launch("c-preempt")
        reached = self.wait_step(out, 4, job)
        signal_t = time.time()
        self.cluster.run("scontrol", "requeue", job)  # what a preempting site does (PreemptMode=REQUEUE)
        stop, saved, saved_t = self.wait_stop(out, "SIGTERM", job)
        state = self.wait_end(job)
        log = self.log(out)
        stops = [ln for ln in log.splitlines() if ln.startswith("stopped by ")]
        resumed = [ln for ln in log.splitlines() if ln.startswith("resumed from ")]
        step = self.stop_step(stop)
        same = (out / "model.safetensors").exists() and identical(weights(out), self.reference())
        starts = self.starts(out)
        restarts = self.cluster.job_field(job, "Restarts")
        ok = (reached is not None and state == "COMPLETED" and len(stops) == 1 and len(saved) == 1
              and len(starts) == 2 and bool(resumed) and f"step {step}\n" in log and same
              and one_record_per_step(out) and restarts == "1")
        figures = {"signal_to_checkpoint_s": round(saved_t - signal_t, 2),
                   "requeue_to_first_step_s": round(self.first_step_after(out, step) - signal_t, 2)}
        self.figures["c"] = figures
        return Row("c: preemption by the site: scontrol requeue at step 4 of 20",
                   "agreed stop, one interrupted checkpoint, Slurm restarts the job, the second start resumes at "
                   "that step and finishes bit-identical to a",
                   f"{state}, restarts {restarts}, starts {len(starts)}; {stop or 'no stop line'}; "
                   f"{resumed[0] if resumed else 'not resumed'}; weights {'identical' if same else 'DIFFER'}; "
                   f"{_figures_text(figures)}", ok)

    def time_limit(self) -> Row:
        """``--time 2 --signal-lead 89``: Slurm sends the signal at its first time-limit check 1 s or
        more after the start. Released from hold 6 s before such a check (so the job may take up to
        5 s to start), the job gets it 1-6 s after its start, while its ranks start up (they ignore
        it until the engine listens; the job script repeats it every 2 s): the stop comes at one of
        the first log points. 8 epochs (:data:`D_EPOCHS`) keep a fast machine training past then."""
        job, out = self.launch("d-time-limit", D_EPOCHS, time_limit="2", lead=89, sbatch_args=("--hold",))
        check = self.cluster.next_limit_check(min_ahead=7.0)
        # the one-machine reference of the same 8 epochs trains meanwhile: the wait for the check is idle
        # CPU (up to 30 s), and the job's stop does not depend on how fast its ranks start
        reference = threading.Thread(target=self.reference, args=(D_EPOCHS,), daemon=True)
        if self.overlap:
            reference.start()
        time.sleep(max(0.0, check - 6.0 - time.time()))
        self.cluster.run("scontrol", "release", job)
        stop, saved, saved_t = self.wait_stop(out, "SIGUSR2", job)
        requeued = self.wait_log(out, "] requeued (time-limit requeue 1", job)
        if requeued:  # the next start (after cred_expire) gets a limit long enough to finish
            self.cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
        state = self.wait_end(job)
        if reference.is_alive():
            reference.join(timeout=WAIT_S)  # (if it failed, self.reference below runs it again and says why)
        log = self.log(out)
        early = [ln for ln in log.splitlines() if "] early signal (USR2)" in ln]
        stops = [ln for ln in log.splitlines() if ln.startswith("stopped by ")]
        resumed = [ln for ln in log.splitlines() if ln.startswith("resumed from ")]
        step = self.stop_step(stop)
        same = (out / "model.safetensors").exists() and identical(weights(out), self.reference(D_EPOCHS))
        starts = self.starts(out)
        ok = (bool(requeued) and state == "COMPLETED" and len(early) == 1 and len(stops) == 1 and len(saved) == 1
              and 0 < step < 80 and len(starts) == 2 and bool(resumed) and f"step {step}\n" in log and same
              and one_record_per_step(out) and (out / "slurm" / "requeues").read_text().strip() == "1")
        figures = {}
        if early and requeued:
            figures = {"signal_to_checkpoint_s": round(saved_t - _time_of(early[0]), 2),
                       "requeue_to_first_step_s": round(self.first_step_after(out, step) - _time_of(requeued), 2)}
        self.figures["d"] = figures
        return Row("d: time limit: --time 2 with the early signal (SIGUSR2, --signal-lead 89 s)",
                   "agreed stop with one interrupted checkpoint, the job requeues itself, the next start finishes "
                   "bit-identical to a 2-rank torchrun run of the same 8 epochs",
                   f"{state}, starts {len(starts)}; {stop or 'no stop line'}; {requeued or 'no requeue line'}; "
                   f"weights {'identical' if same else 'DIFFER'}; {_figures_text(figures)}", ok)

    def cancel(self) -> Row:
        job, out = self.launch("e-scancel")
        reached = self.wait_step(out, 4, job)
        self.cluster.run("scancel", job)
        state = self.wait_end(job)
        time.sleep(3)  # a requeue would list it again at once
        listed = job in self.cluster.active_jobs()
        stops = [ln for ln in self.log(out).splitlines() if ln.startswith("stopped by SIGTERM")]
        ok = (reached is not None and state == "CANCELLED" and not listed and len(stops) == 1 and "(exit 143)" in stops[0]
              and len(self.interrupted(out)) == 1 and len(self.starts(out)) == 1 and "the run stopped" in self.log(out)
              and self.cluster.job_field(job, "Restarts") == "0")
        return Row("e: scancel mid-run", "stop with one interrupted checkpoint (exit 143), CANCELLED, no requeue",
                   f"{state}, listed again: {listed}, starts {len(self.starts(out))}; "
                   f"{stops[0] if stops else 'no stop line'}", ok)

    def config_error(self) -> Row:
        job, out = self.launch("e-config", "data.num_classes=5")
        state = self.wait_end(job)
        lines = [ln for ln in self.log(out).splitlines() if ln.strip()]
        # the job script repeats the reason at the end when other lines followed it (here c10d's warning
        # from the other rank, whose store went away with the failing one)
        errors = list(dict.fromkeys(ln for ln in lines if ln.startswith("error:")))
        ok = (state == "FAILED" and len(errors) == 1 and lines[-1] == errors[0] and "data.num_classes=10" in errors[0]
              and len(self.starts(out)) == 1 and self.cluster.job_field(job, "ExitCode").startswith("2:"))
        return Row("e: a recipe error found at run time (data.num_classes = 5 for a 10-class data set)",
                   "one line, the job log's last; exit 2; no requeue",
                   f"{state}, exit {self.cluster.job_field(job, 'ExitCode')}, {len(errors)} error line(s), last line: "
                   f"{lines[-1] if lines else '-'}", ok)

    def sweep(self) -> Row:
        """4 trials (2 learning rates x 2 seeds) with ASHA pruning, 2 at a time, every array task a worker
        of the same study (the journal in the sweep folder); trial 0 is preempted at its step 3."""
        self.work.mkdir(parents=True, exist_ok=True)
        sweep_file = self.work / "sweep.toml"
        sets = {s.split("=", 1)[0]: s.split("=", 1)[1] for s in self.sets()}
        del sets["optim.lr"]  # swept
        lines = [f'base = "{ROOT / "recipes" / "a3.toml"}"', "seeds = [0, 1]", "[budget]", "epochs = 2", "[set]"]
        lines += [f'"{k}" = {json.dumps(v)}' for k, v in sets.items()]
        lines += ["[grid]", '"optim.lr" = [0.002, 0.008]', "[prune]", 'kind = "asha"', "min_epochs = 1", "[run]",
                  "parallel = 2", 'executor = "slurm"', "[run.slurm]", "gpus_per_node = 0", 'time = "10"',
                  "signal_lead_s = 60"]
        sweep_file.write_text("\n".join(lines) + "\n")
        out = self.work / "sweep"
        proc = subprocess.Popen([PY, "tools/sweep.py", str(sweep_file), "--out", str(out)], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = None
        deadline = time.monotonic() + WAIT_S
        while first is None and time.monotonic() < deadline and proc.poll() is None:
            trials = sorted((out / "trials").glob("*/slurm/job")) if (out / "trials").is_dir() else []
            first = next((t.parent.parent for t in trials if t.read_text().strip().endswith("_0")), None)
            time.sleep(POLL_S)
        preempted = first is not None and self.wait_step(
            first, 3, job=(first / "slurm" / "job").read_text().strip()) is not None
        number = json.loads((first / "study.json").read_text())["number"] if preempted else None
        if preempted:
            self.cluster.run("scontrol", "requeue", (first / "slurm" / "job").read_text().strip())
        stdout, stderr = proc.communicate(timeout=WAIT_S)
        results = out / "results.csv"
        rows = results.read_text().splitlines()[1:] if results.exists() else []
        finished = sum(",done," in r or ",pruned," in r for r in rows)
        resumed = first is not None and "resumed from" in (first / "log.txt").read_text()
        launches = json.loads((first / "trial.json").read_text())["launches"] if first is not None else 0
        from workflows.sweep.study import study_states

        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        study = optuna.load_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
        states = study_states(study)
        same_trial = first is not None and json.loads((first / "study.json").read_text())["number"] == number and \
            states.get(str(first), {}).get("state") in ("COMPLETE", "PRUNED")
        ok = (proc.returncode == 0 and len(rows) == 4 and finished == 4 and preempted and resumed and launches == 2
              and same_trial and len(study.trials) == 4)
        return Row("f: a 4-trial ASHA sweep on Slurm (array job, 2 at a time, one study in the sweep folder's journal); "
                   "trial 0 preempted (scontrol requeue) at its step 3",
                   "every trial complete or pruned, the preempted one resumed from its checkpoint into the same study "
                   "trial; the study holds 4 trials, the report lists 4",
                   f"sweep exit {proc.returncode}; report rows {len(rows)}, finished {finished}; study trials "
                   f"{len(study.trials)} ({', '.join(sorted(v['state'] for v in states.values()))}); preempted trial "
                   f"resumed: {resumed} (launches {launches}), same study trial: {same_trial}"
                   f"{'; ' + stderr.strip()[-300:] if proc.returncode else ''}", ok)


def _rank_pid(conf: Path, rank: int, timeout: float = 120) -> int | None:
    """The pid of the engine process of ``rank`` in a job of the cluster whose SLURM_CONF is ``conf``."""
    want = {f"SLURM_CONF={conf}".encode(), f"SLURM_PROCID={rank}".encode()}
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                env = set((proc_dir / "environ").read_bytes().split(b"\0"))
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if want <= env and b"engine.run" in cmdline:
                return int(proc_dir.name)
        time.sleep(0.2)
    return None


def silent_death(cases: "SlurmCases") -> Row:
    """h: kill -9 of rank 1 (on node n2) at step 12 of a 2-epoch 2-node job, after the end-of-epoch-0
    checkpoint (what the OOM killer does: no error of its own reaches anyone); then the same launch again."""
    job, out = cases.launch("h-kill9")
    victim = _rank_pid(cases.cluster.conf, 1)
    reached = cases.wait_step(out, 12, job)
    killed_at = time.time()
    if victim:
        os.kill(victim, 9)
    state = cases.wait_end(job)
    ended = time.time() - killed_at
    lines = [ln for ln in SlurmCases.log(out).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    again, _ = cases.launch("h-kill9")
    state2 = cases.wait_end(again)
    same = (out / "model.safetensors").exists() and identical(weights(out), cases.reference())
    resumed = [ln for ln in SlurmCases.log(out).splitlines() if ln.startswith("resumed from ")]
    # the job script repeats the reason at the end when other lines (multiprocessing's own warnings) followed it
    errors = list(dict.fromkeys(errors))
    ok = (victim is not None and reached is not None and state == "FAILED" and len(errors) == 1
          and errors[0].startswith("error: rank 1 of 2 stopped without a word") and lines[-1] == errors[0]
          and ended < 60 and state2 == "COMPLETED" and bool(resumed) and same)
    return Row("h: kill -9 of rank 1 of a 2-node srun job at step 12 of 20, then the same launch again",
               "the job ends within seconds, its log's last line (the only error line) names rank 1; the next "
               "launch resumes and ends bit-identical to a 2-rank torchrun run",
               f"killed pid {victim}; {state} {ended:.0f} s after the kill (Slurm's own polling included); "
               f"{len(errors)} error line(s): {errors[0] if errors else '-'}; then {state2}, "
               f"{resumed[0] if resumed else 'not resumed'}; weights {'identical' if same else 'DIFFER'}", ok)


def _figures_text(figures: dict[str, float]) -> str:
    if not figures:
        return "no figures"
    return (f"signal to checkpoint on disk {figures['signal_to_checkpoint_s']:.2f} s, requeue to the next first "
            f"step {figures['requeue_to_first_step_s']:.1f} s")


def cpu_binding(work: Path, data: Path) -> Row:
    """g: CPUs per rank on a cluster that binds tasks to CPUs (``task/affinity``, nodes of 2 CPUs): a
    one-node job of 2 ranks through the launcher, which chooses the CPUs per rank from sinfo (the
    node's 2 / 2 ranks) and gives them to srun too; each rank's engine names the CPUs it may use.

    What one 2-CPU host cannot show: the starvation itself (a node of 8 ranks each given one CPU
    where it asked for more) needs nodes with more CPUs than ranks; here every CPU is someone's."""
    from workflows.slurm_launch import Launch, Resources, launch_run

    work = Path(work)
    with SlurmCluster(work / "cluster", kill_wait=10, cpus=2, task_plugin="task/affinity") as cluster:
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            out = work / "g-cpus"
            done = launch_run(Launch(recipe=str(ROOT / "recipes" / "a3.toml"), out=out,
                                     overrides=[f"data.root={data}", *SETS, "train.epochs=1", "data.workers=0"],
                                     resources=Resources(nodes=1, tasks_per_node=2, time="10")))
            job = done["job_id"]
            deadline = time.monotonic() + WAIT_S
            while job in cluster.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
            state = cluster.job_state(job)
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
    log = SlurmCases.log(out)
    line = next((ln for ln in log.splitlines() if ln.startswith("cpus: ")), "")
    script = (out / "slurm" / "job.sh").read_text()
    ok = (state == "COMPLETED" and "#SBATCH --cpus-per-task=1\n" in script and " --cpus-per-task=1 " in script
          and "rank 0 on " in line and "rank 1 on " in line
          and line.count(": 1 usable (") == 2 and "1 usable (0)" in line and "1 usable (1)" in line)
    return Row("g: CPUs per rank where the site binds (task/affinity, a node of 2 CPUs, 2 ranks)",
               "the launcher asks for the node's share (1 CPU per rank) in sbatch and srun; each rank's line names "
               "the CPU it was bound to (0 and 1)",
               f"{state}; {line or 'no cpus line'}; why: {'; '.join(done['job'].resources.why)}", ok)
