"""A throwaway two-node Slurm cluster on this one machine, for the launcher and sweep cases
(benchmarks/slurm.py, tests/test_slurm.py).

``munged`` (its own key and socket), ``slurmctld`` and two ``slurmd -N n1|n2`` run in the foreground
as children of the calling process, so each one's PID is known and it is stopped by that PID
(SIGTERM, then SIGKILL) in :meth:`SlurmCluster.stop`, also when a case fails, and a job process
Slurm's clean-up missed is killed by its environment (:meth:`SlurmCluster._kill_strays`). Both nodes live on
127.0.0.1 with a port each (``NodeAddr``/``Port``: Slurm's way to run several slurmd on one host),
one CPU each (``cpus``), no cgroups (``proctrack/linuxproc``), no CPU binding (``task/none``; a cluster
made with ``task_plugin="task/affinity"`` binds each task to the CPUs it was given), no accounting (``sacct`` does
not work), every state, spool, log and PID file in one temporary folder. Clients (sbatch, squeue,
scontrol, srun) find it through ``SLURM_CONF``.

Settings that differ from a production site, and why: ``cred_expire=10`` (default 120) because a
requeued job waits that long before it may start again; ``sched_interval=2`` (default 60) so a
requeued job starts as soon as it may; ``KillWait=60`` (default 30) for a loaded 2-core machine;
``SlurmctldDebug=debug2`` so that the time of Slurm's time-limit checks (every 30 s, hard-coded)
can be read from its log (:meth:`SlurmCluster.next_limit_check`).

Only root can start it (slurmd runs job steps as the submitting user). :func:`unavailable` says
in one line why it cannot run here.
"""
from __future__ import annotations

import datetime
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
NODES = ("n1", "n2")
LIMIT_CHECK_S = 30.0  # slurmctld's PERIODIC_TIMEOUT: how often it looks at time limits and sends --signal


def unavailable() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    missing = [d for d in (*DAEMONS, *CLIENTS) if shutil.which(d) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} not on PATH); as root: apt-get install slurm-wlm munge "
                f"(make setup does it)")
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs job steps as the submitting user)"
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent); ``with SlurmCluster(w) as c:``
    stops it however the block ends."""

    def __init__(self, work: Path, kill_wait: int = 60, cpus: int = 1, task_plugin: str = "task/none"):
        self.work = Path(work)
        self.kill_wait = kill_wait
        self.cpus, self.task_plugin = cpus, task_plugin  # per node; task/affinity binds each task to its CPUs
        self.procs: dict[str, subprocess.Popen] = {}
        self.strays: list[tuple[int, str]] = []  # (pid, command) :meth:`stop` had to SIGKILL
        self.conf = self.work / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        return (f"Slurm {self._run(['sinfo', '-V']).stdout.strip() or '?'}, 2 nodes (n1, n2) of {self.cpus} CPU(s) on "
                f"127.0.0.1, {self.task_plugin}, cred_expire=10, sched_interval=2, KillWait={self.kill_wait}")

    # ---------------------------------------------------------------- set-up
    def _write_config(self) -> None:
        w = self.work
        for d in ("state", "spool-n1", "spool-n2", "log", "munge"):
            (w / d).mkdir(parents=True, exist_ok=True)
        os.chmod(w / "munge", 0o700)
        key = w / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        ctld, *node_ports = free_ports(1 + len(NODES))
        self.socket = w / "munge" / "munge.socket"
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} RealMemory=1000 "
                          f"State=UNKNOWN" for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=rsbtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool-%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmctldDebug=debug2
SlurmdLogFile={w}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin={self.task_plugin}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.work / "log" / f"{name}.out", "ab") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env, start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            self._write_config()
            m = self.work / "munge"
            self._spawn("munged", ["munged", "-F", "-f", f"--key-file={m / 'munge.key'}", f"--socket={self.socket}",
                                   f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                                   f"--seed-file={m / 'munged.seed'}"])
            self._wait(lambda: self.socket.exists(), timeout, "munged did not create its socket")
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self._run(["scontrol", "ping"]).stdout, timeout, "slurmctld does not answer")
            for n in NODES:
                self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, "the nodes did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)

    def _nodes_idle(self) -> bool:
        return self._run(["sinfo", "-h", "-N", "-o", "%t"]).stdout.split().count("idle") == len(NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited with status {self.procs[dead[0]].returncode}: "
                                   f"{self.log_tail(dead[0])}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout:.0f} s: {self.log_tail('slurmctld')}")

    def log_tail(self, name: str, lines: int = 5) -> str:
        texts = []
        for path in (self.work / "log" / f"{name}.out", self.work / "log" / f"{name}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return " | ".join(texts) or "(no log)"

    # ---------------------------------------------------------------- use
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = self._run(list(cmd), timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job_field(self, job_id: str, name: str) -> str:
        """A field of ``scontrol show job`` (JobState, Restarts, ExitCode, ...); '' once Slurm forgot the job."""
        for field in self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return ""

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState")

    def active_jobs(self) -> list[str]:
        """Jobs and array tasks Slurm lists (pending, running, completing)."""
        return self._run(["squeue", "-h", "-r", "-o", "%i"]).stdout.split()

    def limit_checks(self) -> list[float]:
        """Unix times of slurmctld's time-limit checks so far (its debug2 log)."""
        times = []
        for line in (self.work / "log" / "slurmctld.log").read_text(errors="replace").splitlines():
            if "Testing job time limits" in line:
                stamp = line[1:line.index("]")]
                times.append(datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp())
        return times

    def next_limit_check(self, min_ahead: float = 4.0, timeout: float = 90) -> float:
        """When slurmctld will next check time limits (and send ``--signal``), at least ``min_ahead``
        seconds from now: the last check seen in its log plus a multiple of its 30 s period."""
        deadline = time.monotonic() + timeout
        while not self.limit_checks():
            if time.monotonic() > deadline:
                raise RuntimeError("slurmctld logged no time-limit check (SlurmctldDebug=debug2)")
            time.sleep(1)
        t = self.limit_checks()[-1]
        while t < time.time() + min_ahead:
            t += LIMIT_CHECK_S
        return t

    # ---------------------------------------------------------------- tear-down
    def stop(self) -> None:
        """Cancel every job, wait for its processes to end, stop each daemon by its PID, then kill
        any job process Slurm missed (:meth:`_kill_strays`)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self._run(["scancel", "--full", "--user", "root"], timeout=20)
                deadline = time.monotonic() + 2 * self.kill_wait + 30
                while self.active_jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self._kill_strays()

    def _kill_strays(self, timeout: float = 30) -> None:
        """SIGKILL what Slurm's own clean-up missed: with ``proctrack/linuxproc`` a job is tracked by
        its process tree, so a child forked while scancel walks that tree (a job cancelled just after
        it started, as a failing test does) is reparented to init and escapes the kill. Only job
        processes (``SLURM_JOB_ID`` in their environment) and slurmstepd are touched; each one
        killed is kept in :attr:`strays` and printed, so a test can tell Slurm's clean-up from this one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [(pid, cmd) for pid, cmd, env in self._marked()
                     if any(v.startswith(b"SLURM_JOB_ID=") for v in env) or cmd.startswith("slurmstepd")]
            if not found or time.monotonic() > deadline:
                return
            for pid, cmd in found:
                if (pid, cmd) not in self.strays:
                    self.strays.append((pid, cmd))
                    print(f"slurm test cluster: killed a process Slurm left running: {cmd[:80]} (pid {pid})")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def _marked(self) -> list[tuple[int, str, list[bytes]]]:
        """(pid, command line, environment) of every other process with this cluster's SLURM_CONF in
        its environment. A process that has exited (a zombie too) shows an empty environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for proc_dir in Path("/proc").glob("[0-9]*"):
            if int(proc_dir.name) == os.getpid():
                continue
            try:
                environ = (proc_dir / "environ").read_bytes().split(b"\0")
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if marker in environ:
                found.append((int(proc_dir.name), cmdline or "?", environ))
        return found

    def leftovers(self) -> list[str]:
        """Processes still running that this cluster started: its daemons (by PID) and anything with
        its SLURM_CONF in the environment (slurmstepd and job processes, which slurmd started)."""
        left = [f"{n} (pid {p.pid})" for n, p in self.procs.items() if p.poll() is None]
        return left + [f"{cmd[:80]} (pid {pid})" for pid, cmd, _ in self._marked()]


def skip_or_fail(why: str):
    """Skip a Slurm test with the reason; under CI (``RSB_REQUIRE_SLURM=1``, set by .ci/run) fail
    instead, so that a CI run where Slurm is missing cannot pass with those tests skipped."""
    if os.environ.get("RSB_REQUIRE_SLURM"):
        pytest.fail(f"the Slurm tests must run here (RSB_REQUIRE_SLURM is set): {why}", pytrace=False)
    pytest.skip(f"Slurm tests skipped: {why}")
