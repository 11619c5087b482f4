"""Training runs and sweep trials as Slurm jobs that survive time limits and preemption.

A run is submitted as one batch job whose script we generate (``OUT/slurm/job.sh``) and keep in the
run folder with the frozen recipe (``OUT/slurm/recipe.toml``: the recipe with every ``--set``
applied, so that an edit of ``recipes/`` never changes a run half-way) and ``launch.json`` (what
was submitted, when, as which job). Every start of the job runs the script from the top and the
engine with ``--resume auto``: the first start finds no checkpoint and starts fresh, every later one
continues. What the script does at each way a start can end:

* **the early signal** (``--signal=B:USR2@LEAD``: Slurm sends SIGUSR2 to the batch shell LEAD to
  LEAD + 30 s before the time limit, as it checks limits every 30 s; not SIGUSR1, which NCCL may
  use): the shell forwards it to the
  step (``srun`` passes it to every process of every task), every rank's ``StopRequest`` turns it
  into the engine's agreed stop at the next log point, one ``interrupted`` checkpoint, exit 140;
  the shell then requeues the job (``scontrol requeue``), or, where the site forbids that, submits
  a job that depends on this one; at most ``max_requeues`` times, and never after a start that
  wrote no checkpoint (no progress: a restart loop);
* **SIGTERM** (``scancel``, preemption, the hard time limit): the engine stops the same way, exit
  143, and the job does not requeue itself: a preempting site requeues it (``--requeue``), and the
  next start resumes; ``scancel`` ends it for good;
* **the run finished** (exit 0): the job ends;
* **the run failed on its own** (exit 2: config, data, no usable checkpoint; exit 3: divergence;
  a crash): no requeue, and the one-line reason is the log's last line (the engine's ``error:``
  line, repeated at the end when something was printed after it, or one of ours when the engine
  printed none).

Tasks run ``python -m workflows.slurm_task`` (see there): one task per GPU with the engine taking its
rank from Slurm (``launcher="srun"``), or one ``torchrun`` agent per node (``launcher="torchrun"``,
c10d rendezvous on the job's first node, an id per start). ``srun`` writes the tasks' output
straight into the log (``--output``) and its own messages into ``OUT/slurm/srun.log``, so that
nothing of the launcher's comes after the engine's last line.

Why not submitit (our sweep's former Slurm path; DeiT, ConvNeXt and DINO launch with it): its
signal handler (``submitit/core/job_environment.py``, ``SignalHandler``) acts on rank 0 alone. On
SIGUSR2 rank 0 calls the callable's ``checkpoint()`` from inside the signal handler, wherever the
training loop is, requeues the job and ``sys.exit``s; the other ranks log "not checkpointing nor
requeuing since I am a slave" and train on until they block in a collective with rank 0 gone. That
is not an agreed stop at one step on every rank, and our checkpoints need every rank (each stores
its own data-loader state and BatchNorm statistics). It also ignores SIGTERM ("bypass"), so
``scancel`` and preemption would never reach the engine's stop while submitit's handlers are the
ones installed, tells a time limit from a preemption by guessing from the elapsed time, and offers
neither one torchrun per node nor a dependent job where requeue is forbidden. A generated script
(about 100 lines of bash) does each of these explicitly and shows the user what runs.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

EARLY_SIGNAL = "USR2"
DEFAULT_LEAD_S = 300  # the stop needs a log interval plus a checkpoint write; Slurm may signal up to 30 s early
DEFAULT_MAX_REQUEUES = 20
LAUNCHERS = ("srun", "torchrun")


class LaunchError(ValueError):
    """A user-caused problem with a launch (options, run folder, Slurm missing); one line."""


def parse_time(text: str) -> int:
    """Slurm's --time formats in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"--time {text!r} is not a Slurm time (e.g. 24:00:00, 2-00:00:00 or 90 for minutes)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:  # H:M:S
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


@dataclass
class Resources:
    """What one job asks Slurm for. ``tasks_per_node``: processes per node (one per GPU; on CPU nodes
    the number of ranks per node)."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # CPUs per rank; None: chosen by :func:`choose_cpus_and_memory`
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch_args: tuple[str, ...] = ()  # anything else, e.g. ("--qos=high",)
    mem: str | None = None  # sbatch --mem per node (e.g. "200G", "0" = all of it); None: chosen
    why: tuple[str, ...] = ()  # what was chosen for the CPUs and memory, and why (the launch summary)

    def check(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1 or self.gpus_per_node < 0:
            raise LaunchError(f"--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0, got "
                              f"{self.nodes}, {self.tasks_per_node}, {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise LaunchError(f"--mem {self.mem!r} is not a Slurm memory size (e.g. 200G, 64000M, or 0 for all of "
                              f"each node's memory)")
        parse_time(self.time)


@dataclass
class NodeShape:
    """The smallest node of a partition as ``sinfo`` describes it: what one node can give a job."""

    cpus: int
    memory_mb: int
    gpus: int


def _gres_gpus(gres: str) -> int:
    """GPUs in sinfo's ``%G`` (``gpu:8``, ``gpu:a100:4(S:0-1),gpu:h100:4``, ``(null)``)."""
    return sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def node_shape(partition: str | None) -> NodeShape | None:
    """The partition's (else the default partition's) smallest node from ``sinfo``; None where Slurm
    cannot be asked (a dry run on a laptop) or describes no node."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-N", "-o", "%c|%m|%G|%P"] + (["-p", partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    shapes = []
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        try:
            cpus, mem, gres, part = line.strip().split("|")
            if partition or part.endswith("*"):  # without -p: the default partition's nodes
                shapes.append(NodeShape(int(cpus.rstrip("+")), int(mem.rstrip("+")), _gres_gpus(gres)))
        except ValueError:
            continue
    if not shapes:
        return None
    return NodeShape(min(s.cpus for s in shapes), min(s.memory_mb for s in shapes), min(s.gpus for s in shapes))


def choose_cpus_and_memory(r: Resources, data_workers: int, shape: NodeShape | None) -> Resources:
    """``r`` with the CPUs per rank and the memory per node filled in, and why (``r.why``).

    CPUs: what the user asked for; else the node's share per rank (its CPUs / the ranks on it, or
    / its GPUs where it has some: a node's cores idle beside its GPUs help nobody); else, where Slurm
    cannot be asked, what the recipe needs: ``data.workers`` decoding threads or processes plus one
    for the rank's own training loop. A share below that need is said (the ranks will decode on
    CPUs their step also uses). Without a request Slurm gives every task one CPU, and since Slurm
    22.05 ``srun`` does not inherit the batch job's ``--cpus-per-task``: the job script passes it to
    srun too (:func:`job_script`).

    Memory per node (``--mem``): what the user asked for; else all of each node's (``--mem=0``)
    when the job takes whole nodes (every GPU, or every CPU, of a node), else the node's memory in
    proportion to the share of its GPUs (or CPUs) the job takes; else (no sinfo) none: the site's
    default."""
    need = data_workers + 1
    why = []
    cpus = r.cpus_per_task
    if cpus is not None:
        why.append(f"CPUs per rank: {cpus}, as asked (--cpus-per-task)")
    elif shape is not None:
        by_gpu = bool(r.gpus_per_node and shape.gpus)
        cpus = max(1, shape.cpus // (max(shape.gpus, r.tasks_per_node) if by_gpu else r.tasks_per_node))
        what = f"{shape.gpus} GPUs" if by_gpu else f"{r.tasks_per_node} rank(s)"
        why.append(f"CPUs per rank: {cpus}, the node's share (sinfo: {shape.cpus} CPUs per node / {what}); the "
                   f"recipe needs {need} (data.workers {data_workers} + 1 for the training loop)")
    else:
        cpus = need
        why.append(f"CPUs per rank: {cpus}, what the recipe needs (data.workers {data_workers} + 1 for the training "
                   f"loop); sinfo did not describe the nodes (--cpus-per-task sets it)")
    if cpus < need:
        why.append(f"warning: {cpus} CPUs per rank is less than the recipe's {need}: decoding will share the CPUs "
                   f"of the step; lower data.workers or give --cpus-per-task")
    mem = r.mem
    if mem is not None:
        why.append(f"memory per node: --mem={mem}, as asked")
    elif shape is not None:
        if r.gpus_per_node and shape.gpus:
            fraction = r.gpus_per_node / shape.gpus
        else:
            fraction = r.tasks_per_node * cpus / max(1, shape.cpus)
        if fraction >= 1:
            mem = "0"
            why.append(f"memory per node: all of it (--mem=0; the job takes whole nodes of {shape.memory_mb:,} MB)")
        else:
            mem = f"{int(shape.memory_mb * fraction)}M"
            why.append(f"memory per node: --mem={mem}, the job's share ({fraction:.0%}) of a node's "
                       f"{shape.memory_mb:,} MB")
    else:
        why.append("memory: no request, the site's default (sinfo did not describe the nodes; --mem sets it)")
    return replace(r, cpus_per_task=cpus, mem=mem, why=tuple(why))


@dataclass
class RunEntry:
    """One run of a job (an array job has one per array task): its folder and what its tasks run
    (the arguments of ``python -m workflows.slurm_task``)."""

    out: Path
    task: list[str]


@dataclass
class Job:
    name: str
    folder: Path  # job.sh and jobs.txt (a run's OUT/slurm; a sweep's OUT/slurm)
    runs: list[RunEntry]
    resources: Resources
    launcher: str = "srun"
    signal_lead_s: int = DEFAULT_LEAD_S
    max_requeues: int = DEFAULT_MAX_REQUEUES
    array: bool = False  # an array job, task i running runs[i] (a sweep; also with one trial)
    parallel: int | None = None  # array jobs: tasks at a time
    cwd: Path = field(default_factory=Path.cwd)
    python: str = sys.executable

    @property
    def script_path(self) -> Path:
        return self.folder / "job.sh"

    def check(self) -> None:
        self.resources.check()
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"--launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        limit = parse_time(self.resources.time)
        if self.signal_lead_s < 30 or self.signal_lead_s + 30 >= limit:
            raise LaunchError(f"--signal-lead {self.signal_lead_s} s does not fit --time {self.resources.time} "
                              f"({limit} s): it must be >= 30 and leave more than 30 s (Slurm checks time "
                              f"limits every 30 s and sends the signal up to that much earlier)")
        if self.max_requeues < 0:
            raise LaunchError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if not self.runs or (len(self.runs) > 1 and not self.array):
            raise LaunchError(f"a job runs one run, or an array job one per task; got {len(self.runs)} runs")


# file systems every node of a cluster mounts alike; anything else (ext4, xfs, tmpfs, overlay...) is
# taken as this node's own
SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs", "fuse.glusterfs",
                       "cifs", "smb3", "panfs", "wekafs", "afs", "orangefs", "pvfs2", "quobyte", "fuse.quobyte",
                       "fuse.juicefs", "fuse.sshfs", "fuse.gcsfuse", "fuse.s3fs", "virtiofs", "9p")


def file_system(path: Path, mounts: str | None = None) -> tuple[str, str] | None:
    """(mount point, type) of the file system ``path`` (or its nearest existing parent) is on, from
    ``/proc/mounts`` (``mounts``: its text, for tests); None where it cannot be read."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    path = Path(path).absolute()
    best = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) > len(best[0])):
            best = (point, fields[2])
    return best


def out_warning(out: Path, nodes: int, mounts: str | None = None) -> str | None:
    """A warning when a job of several nodes would keep its run folder on a file system of this node
    alone: rank 0 writes the checkpoints there and every start's ``--resume auto`` reads them, from
    whichever nodes Slurm gives the job next time."""
    found = file_system(out, mounts)
    if nodes < 2 or found is None or found[1] in SHARED_FILE_SYSTEMS:
        return None
    point, kind = found
    return (f"warning: --out {out} is on {point} (file system type {kind}), this node's own as far as it can tell: "
            f"with {nodes} nodes every node must see the run folder (checkpoints, --resume auto); use a shared file "
            f"system (NFS, Lustre, GPFS, BeeGFS...) unless {point} is shared on your cluster")


# --------------------------------------------------------------------------- the job script
def sbatch_options(job: Job) -> list[str]:
    r = job.resources
    per_node = r.tasks_per_node if job.launcher == "srun" else 1  # torchrun: one agent per node
    opts = [f"--job-name={job.name}", f"--nodes={r.nodes}", f"--ntasks-per-node={per_node}"]
    if r.gpus_per_node:
        opts.append(f"--gpus-per-node={r.gpus_per_node}")
    if r.cpus_per_task:
        opts.append(f"--cpus-per-task={cpus_per_task(job)}")
    if r.mem is not None:
        opts.append(f"--mem={r.mem}")
    opts += [f"--time={r.time}", f"--signal=B:{EARLY_SIGNAL}@{job.signal_lead_s}", "--requeue", "--open-mode=append"]
    if not job.array:
        opts.append(f"--output={job.runs[0].out / 'slurm' / 'job.log'}")
    else:  # each array task writes its run's own log (the script redirects); these get Slurm's few lines
        opts.append(f"--output={job.folder / 'array-%A_%a.out'}")
        opts.append(f"--array=0-{len(job.runs) - 1}" + (f"%{job.parallel}" if job.parallel else ""))
    opts.append(f"--chdir={job.cwd}")
    if r.partition:
        opts.append(f"--partition={r.partition}")
    if r.account:
        opts.append(f"--account={r.account}")
    return opts + list(r.sbatch_args)


def cpus_per_task(job: Job) -> int:
    """CPUs per Slurm task: a rank's under srun; under torchrun one task (the agent) per node runs
    every rank of the node, so it gets all of theirs."""
    r = job.resources
    return r.cpus_per_task * (r.tasks_per_node if job.launcher == "torchrun" else 1)


def job_script(job: Job) -> str:
    """The batch script (bash). ``job.runs[i]`` is array task i (one run: task 0)."""
    q = shlex.quote
    # --wait: a rank that died (a crash, the OOM killer) leaves the others blocked in a collective; 60 s
    # after the first task ends srun ends the rest. Not --kill-on-bad-exit: it would kill the ranks
    # still printing or exiting after an agreed stop or error, and their status would hide the engine's.
    srun = ["srun", "--wait=60", '--output="$LOG"', "--open-mode=append"]
    if job.launcher == "torchrun":
        srun.append("--ntasks-per-node=1")
    if job.resources.cpus_per_task:
        # since Slurm 22.05 srun does not inherit the job's --cpus-per-task: without it each task is
        # bound to one CPU wherever the site binds (task/affinity, task/cgroup)
        srun.append(f"--cpus-per-task={cpus_per_task(job)}")
    cases = "\n".join(f"  {i}) OUT={q(str(run.out))}\n     TASK=({' '.join(q(a) for a in [job.python, '-m', 'workflows.slurm_task', *run.task])}) ;;"
                      for i, run in enumerate(job.runs))
    header = "\n".join(f"#SBATCH {opt}" for opt in sbatch_options(job))
    return f"""#!/bin/bash
# Written by rsb-launch (workflows/slurm_launch.py); every start of the job runs it from the top.
# The engine continues from its newest checkpoint (--resume auto). SIGUSR2, {job.signal_lead_s} s before the
# time limit: the run stops with a checkpoint and the job requeues itself (at most {job.max_requeues} times).
# SIGTERM (scancel, preemption): the run stops with a checkpoint; a preempted job is requeued by Slurm.
{header}

set -u
SCRIPT={q(str(job.script_path))}
MAX_REQUEUES={job.max_requeues}
case "${{SLURM_ARRAY_TASK_ID:-0}}" in
{cases}
  *) echo "error: no run for array task $SLURM_ARRAY_TASK_ID in $SCRIPT" >&2; exit 2 ;;
esac
STATE=$OUT/slurm
LOG=$STATE/job.log
mkdir -p "$STATE"
exec >>"$LOG" 2>&1
JOB=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}}}
JOB=${{JOB:-$SLURM_JOB_ID}}
say() {{ echo "launch: [$(date '+%F %T.%3N')] $*"; }}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}
# numba's compiled loops are cached on this node's own disk, not beside the code on a shared file system
export NUMBA_CACHE_DIR=${{NUMBA_CACHE_DIR:-${{TMPDIR:-/tmp}}/rsb-numba-$(id -u)}}
unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK  # every start computes its own rendezvous

early=0 stopping=0 pid= nudger=
forward_early() {{
  kill -{EARLY_SIGNAL} "$pid" 2>/dev/null  # srun passes it to every process of the step
  # a rank still starting up ignores it until the engine listens: repeat until the step ends
  [ -n "$nudger" ] || {{ ( while sleep 2 && kill -0 "$pid" 2>/dev/null; do kill -{EARLY_SIGNAL} "$pid"; done ) & nudger=$!; }}
}}
on_early() {{
  early=1
  say "early signal ({EARLY_SIGNAL}): the time limit is near; the run stops at its next log point with a checkpoint"
  [ -z "$pid" ] || forward_early  # before the step exists: forwarded as soon as it starts (below)
}}
on_term() {{
  stopping=1
  say "SIGTERM (scancel, preemption or the time limit): the run stops with a checkpoint; the job does not requeue itself"
}}
trap on_early {EARLY_SIGNAL}
trap on_term TERM

requeues=$(cat "$STATE/requeues" 2>/dev/null || echo 0)
echo "$JOB" > "$STATE/job"
say "start $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of job $JOB on $SLURM_JOB_NODELIST ($requeues time-limit requeue(s) before)"
touch "$STATE/.start"
from=$(stat -c %s "$LOG")
{' '.join(srun)} "${{TASK[@]}}" 2>>"$STATE/srun.log" &
pid=$!
((early)) && forward_early  # it came before the step started (a slow start, a limit cut by scontrol)
while :; do
  wait "$pid"; rc=$?
  ((rc > 128)) && kill -0 "$pid" 2>/dev/null || break  # > 128 with the step alive: a trapped signal ended the wait
done
((rc > 128)) && {{ wait "$pid"; s=$?; ((s == 127)) || rc=$s; }}
[ -z "$nudger" ] || kill "$nudger" 2>/dev/null

reason=$(tail -c +$((from + 1)) "$LOG" | grep -a -E '^(\\[rank [0-9]+\\] )?error:' | tail -n 1)
if ((rc == 0)); then
  say "the run finished; the job ends"
  exit 0
fi
if ((stopping)); then
  say "the run stopped (exit $rc); Slurm requeues a preempted job, scancel ends it"
  exit "$rc"
fi
if ((early)) && [ -z "$reason" ]; then
  if [ -z "$(find "$OUT" -maxdepth 1 -name 'ckpt-*.pt' -newer "$STATE/.start" -print -quit)" ]; then
    reason="error: stopped before the time limit without a checkpoint from this start; not requeued (a longer --time, then submit again)"
  elif ((requeues >= MAX_REQUEUES)); then
    reason="error: stopped before the time limit after $requeues requeues, the cap (--max-requeues); submit again to continue"
  else
    echo $((requeues + 1)) > "$STATE/requeues"
    trap '' TERM  # requeueing ends this start with a SIGTERM of its own
    if scontrol requeue "$JOB" 2>>"$STATE/srun.log"; then
      say "requeued (time-limit requeue $((requeues + 1)) of at most $MAX_REQUEUES); the next start continues the run"
      exit 0
    fi
    if next=$(sbatch --parsable --dependency="afterany:$SLURM_JOB_ID" ${{SLURM_ARRAY_TASK_ID:+--array=$SLURM_ARRAY_TASK_ID}} "$SCRIPT" 2>>"$STATE/srun.log"); then
      next=${{next%%;*}}
      echo "$next${{SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}" > "$STATE/job"
      echo "$next" >> {q(str(job.folder / 'jobs.txt'))}
      say "this cluster does not let a job requeue itself: job $next continues the run after this one"
      exit 0
    fi
    reason="error: the job could neither requeue itself nor submit its successor (see $STATE/srun.log); submit again to continue"
  fi
fi
# the run ended on its own: its reason is the last line of the log
[ -n "$reason" ] || reason="error: the run ended with exit status $rc without a reason line; see the lines above and $STATE/srun.log"
[ "$(tail -n 1 "$LOG")" = "$reason" ] || echo "$reason"
exit "$rc"
"""


def write_job(job: Job) -> Path:
    job.folder.mkdir(parents=True, exist_ok=True)
    path = job.script_path
    path.write_text(job_script(job))
    path.chmod(0o755)
    return path


def submit(job: Job) -> str:
    """Write the script and submit it; returns the job id (the array's id for an array job)."""
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH; run this on a Slurm login node (--dry-run shows the job here)")
    path = write_job(job)
    proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise LaunchError(f"sbatch refused the job: {lines[-1] if lines else f'exit {proc.returncode}'}")
    job_id = proc.stdout.strip().split(";")[0]
    with (job.folder / "jobs.txt").open("a") as f:
        f.write(f"{job_id}\n")
    return job_id


# --------------------------------------------------------------------------- Slurm's view
def queue_states() -> dict[str, str]:
    """Every job and array task Slurm still lists (pending, running, requeued, completing) and its
    state: {"123": "RUNNING", "124_0": "PENDING", ...}. Jobs that ended are not listed."""
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise LaunchError(f"squeue failed: {proc.stderr.strip() or proc.returncode}")
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())


def current_job(out: Path) -> str | None:
    """The job that runs (or last ran) the run in ``out``: written by each start and by the launcher."""
    try:
        return (Path(out) / "slurm" / "job").read_text().strip() or None
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------- a training run
@dataclass
class Launch:
    recipe: str
    out: Path
    overrides: list[str]
    resources: Resources
    launcher: str = "srun"
    signal_lead_s: int = DEFAULT_LEAD_S
    max_requeues: int = DEFAULT_MAX_REQUEUES
    name: str | None = None


def run_job(launch: Launch) -> tuple[Job, str]:
    """The job for one training run and the frozen recipe text; checks the recipe (the engine's own
    validation) and that the global batch splits over the job's processes before anything is
    submitted."""
    from common.config import ConfigError, load_config, to_toml
    from engine.setup import batch_composition

    out = launch.out.resolve()
    r = launch.resources
    r.check()
    world = r.nodes * r.tasks_per_node
    try:
        cfg = load_config(launch.recipe, launch.overrides)
        batch_composition(cfg.train.global_batch_size, world, cfg.train.per_device_batch_size)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    r = choose_cpus_and_memory(r, cfg.data.workers, node_shape(r.partition))
    warning = out_warning(out, r.nodes)
    if warning:
        r = replace(r, why=(*r.why, warning))
    state = out / "slurm"
    task = ["--", str(state / "recipe.toml"), "--out", str(out), "--resume", "auto"]
    if launch.launcher == "torchrun":
        task = ["torchrun", "--nproc-per-node", str(r.tasks_per_node), *task]
    else:
        task = ["srun", *task]
    job = Job(name=launch.name or out.name, folder=state, runs=[RunEntry(out, task)], resources=r,
              launcher=launch.launcher, signal_lead_s=launch.signal_lead_s, max_requeues=launch.max_requeues)
    job.check()
    return job, to_toml(cfg)


def launch_run(launch: Launch, dry_run: bool = False) -> dict:
    """Submit a training run (or, with ``dry_run``, only build its job); returns what was done:
    job id (None when dry), script text, paths."""
    job, recipe_text = run_job(launch)
    state = job.folder
    if dry_run:
        return {"job_id": None, "script": job_script(job), "log": state / "job.log", "job": job}
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch is not on PATH; run this on a Slurm login node (--dry-run shows the job here)")
    running = current_job(launch.out)
    if running and running in queue_states():
        raise LaunchError(f"{launch.out} is already run by job {running} (squeue -j {running}); "
                          f"scancel {running} first to submit it again")
    state.mkdir(parents=True, exist_ok=True)
    (state / "recipe.toml").write_text(recipe_text + "\n")
    (state / "requeues").write_text("0\n")  # the cap counts from this submission
    job_id = submit(job)
    (state / "job").write_text(f"{job_id}\n")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_id": job_id, "recipe": launch.recipe,
              "overrides": launch.overrides, "out": str(launch.out), "launcher": launch.launcher,
              "resources": asdict(job.resources), "signal_lead_s": launch.signal_lead_s,
              "max_requeues": launch.max_requeues, "argv": sys.argv}
    history = state / "launch.json"
    past = json.loads(history.read_text()) if history.is_file() else []
    history.write_text(json.dumps(past + [record], indent=1) + "\n")
    return {"job_id": job_id, "script": job.script_path.read_text(), "log": state / "job.log", "job": job}
