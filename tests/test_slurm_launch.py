"""The Slurm launcher without a cluster: the job it writes for 4 nodes x 8 GPUs (both launchers), its
one-line refusals, and the engine's reading of Slurm's variables (ranks, the node list, the port of
each start), the node list checked against Slurm's own ``scontrol show hostnames`` where installed.
The jobs themselves run on a real cluster in tests/test_slurm.py."""
from __future__ import annotations

import os
import re
import shutil
import time
import subprocess
from pathlib import Path

import pytest

from engine.distributed import expand_nodelist, process_ranks
from tests.helpers.cli import run_main
from workflows.slurm_launch import parse_time

ROOT = Path(__file__).resolve().parents[1]


def launch(*args):
    from tools.launch_slurm import main

    return run_main(main, list(args))


@pytest.fixture(autouse=True)
def no_cluster_to_ask(monkeypatch):
    """These dry runs show what the launcher writes where sinfo cannot describe the nodes (a laptop):
    the session's throwaway cluster (tests/test_slurm.py), reachable through SLURM_CONF, must not
    answer for them."""
    import workflows.slurm_launch

    monkeypatch.setattr(workflows.slurm_launch, "node_shape", lambda partition: None)


def test_dry_run_for_4_nodes_of_8_gpus_is_the_job_a_user_expects(tmp_path):
    out = tmp_path / "a1"
    proc = launch("recipes/a1.toml", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--out", out,
                  "--partition", "gpu", "--account", "proj", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    header = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    # without sinfo (no cluster here) each rank asks for what a1.toml needs: data.workers 8 + 1
    assert header == ["--job-name=a1", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=9",
                      "--time=24:00:00", "--signal=B:USR2@300", "--requeue", "--open-mode=append",
                      f"--output={out.resolve()}/slurm/job.log", f"--chdir={Path.cwd()}", "--partition=gpu",
                      "--account=proj"]
    assert f"workflows.slurm_task srun -- {out.resolve()}/slurm/recipe.toml --out {out.resolve()} --resume auto" in script
    assert "srun --wait=60" in script and "scontrol requeue" in script and '--dependency="afterany:' in script
    # Slurm >= 22.05: srun does not inherit the job's --cpus-per-task; without it every rank gets one CPU
    assert re.search(r"^srun .*--cpus-per-task=9 ", script, re.M)
    assert "CPUs per rank: 9, what the recipe needs (data.workers 8 + 1" in proc.stderr
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # the script parses
    assert not out.exists()  # a dry run writes nothing

    torchrun = launch("recipes/a1.toml", "--nodes", "4", "--gpus-per-node", "8", "--out", out, "--launcher",
                      "torchrun", "--dry-run").stdout
    assert "#SBATCH --ntasks-per-node=1\n" in torchrun and "#SBATCH --gpus-per-node=8\n" in torchrun
    assert "workflows.slurm_task torchrun --nproc-per-node 8 --" in torchrun and "--ntasks-per-node=1 " in torchrun
    # one task (torchrun's agent) per node runs the node's 8 ranks: it gets the CPUs of all 8
    assert "#SBATCH --cpus-per-task=72\n" in torchrun and re.search(r"^srun .*--cpus-per-task=72 ", torchrun, re.M)


@pytest.mark.parametrize("gres,gpus", [("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:4,gpu:h100:4", 8),
                                       ("(null)", 0), ("gpu:h100:8(S:0-1),shard:16", 8)])
def test_gpus_per_node_from_sinfo_gres(gres, gpus):
    from workflows.slurm_launch import _gres_gpus

    assert _gres_gpus(gres) == gpus


def test_cpus_and_memory_per_rank_follow_the_node_or_the_recipe():
    from workflows.slurm_launch import NodeShape, Resources, choose_cpus_and_memory

    node = NodeShape(cpus=96, memory_mb=1_000_000, gpus=8)
    whole = choose_cpus_and_memory(Resources(nodes=4, tasks_per_node=8, gpus_per_node=8), 8, node)
    assert (whole.cpus_per_task, whole.mem) == (12, "0")  # 96 CPUs / 8 GPUs; the job takes whole nodes
    assert "the node's share (sinfo: 96 CPUs per node / 8 GPUs); the recipe needs 9" in whole.why[0]
    half = choose_cpus_and_memory(Resources(nodes=1, tasks_per_node=4, gpus_per_node=4), 8, node)
    assert (half.cpus_per_task, half.mem) == (12, "500000M")  # 4 of 8 GPUs: half the memory
    short = choose_cpus_and_memory(Resources(nodes=1, tasks_per_node=8, gpus_per_node=8), 16,
                                   NodeShape(cpus=64, memory_mb=500_000, gpus=8))
    assert short.cpus_per_task == 8 and any(w.startswith("warning: 8 CPUs per rank is less than the recipe's 17")
                                            for w in short.why)
    cpu_nodes = choose_cpus_and_memory(Resources(nodes=2, tasks_per_node=4), 2, NodeShape(32, 256_000, 0))
    assert (cpu_nodes.cpus_per_task, cpu_nodes.mem) == (8, "0")
    asked = choose_cpus_and_memory(Resources(nodes=1, tasks_per_node=8, gpus_per_node=8, cpus_per_task=6, mem="400G"),
                                   8, node)
    assert (asked.cpus_per_task, asked.mem) == (6, "400G") and "as asked" in asked.why[0]
    blind = choose_cpus_and_memory(Resources(nodes=1, tasks_per_node=8, gpus_per_node=8), 5, None)
    assert (blind.cpus_per_task, blind.mem) == (6, None) and "site's default" in blind.why[-1]


def test_the_readme_shows_the_dry_run_as_it_is():
    """README "Run on a Slurm cluster" holds the --dry-run job for 4 nodes x 8 GPUs: keep it true."""
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- dry-run: 4 nodes x 8 GPUs -->\n```bash\n", 1)[1].split("```", 1)[0]
    proc = launch("recipes/a1.toml", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--out",
                  "/shared/runs/a1", "--partition", "gpu", "--dry-run")
    actual = proc.stdout.replace(str(Path.cwd()), "/shared/rsb-trainer").replace(
        str(Path(__import__("sys").executable)), "/shared/rsb-trainer/.venv/bin/python")
    assert shown == actual


@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lrr=1"], "unknown key optim.lrr"),
    (["--nodes", "3", "--tasks-per-node", "5", "--set", "train.global_batch_size=64"], "does not split over 15 processes"),
    (["--time", "10", "--signal-lead", "600"], "--signal-lead 600 s does not fit --time 10"),
    (["--time", "1 day"], "is not a Slurm time"),
    (["--nodes", "0"], "--nodes and --tasks-per-node must be >= 1"),
])
def test_user_errors_are_one_line_and_submit_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    proc = launch("recipes/a3.toml", "--out", out, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not out.exists()


def test_without_sbatch_it_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    proc = launch("recipes/a3.toml", "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: sbatch is not on PATH; run this on a Slurm login "
                                                            "node (--dry-run shows the job here)")


def test_slurm_time_formats():
    assert [parse_time(t) for t in ("90", "2:30", "24:00:00", "2-00:00:00", "1-12", "1-00:30")] == \
        [5400, 150, 86400, 172800, 129600, 88200]


@pytest.mark.parametrize("nodelist", ["n1", "n[1-2]", "gpu-a[01-03,7],login", "x[1-2]y[3-4]", "a[08-11],b,c[1,3]"])
def test_node_lists_expand_as_slurm_expands_them(nodelist, tmp_path):
    want = {"n1": ["n1"], "n[1-2]": ["n1", "n2"], "gpu-a[01-03,7],login": ["gpu-a01", "gpu-a02", "gpu-a03", "gpu-a7", "login"],
            "x[1-2]y[3-4]": ["x1y3", "x1y4", "x2y3", "x2y4"], "a[08-11],b,c[1,3]": ["a08", "a09", "a10", "a11", "b", "c1", "c3"]}
    assert expand_nodelist(nodelist) == want[nodelist]
    if shutil.which("scontrol"):  # Slurm's own expansion: needs a config file, not a cluster
        conf = tmp_path / "slurm.conf"
        conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               env={**os.environ, "SLURM_CONF": str(conf)})
        assert shown.stdout.split() == want[nodelist], shown.stderr


def test_ranks_come_from_torchrun_first_then_from_an_srun_step():
    slurm = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "16"}
    assert process_ranks(slurm) == (5, 8, 1, "srun")  # the step's tasks, not the job's
    torchrun = {**slurm, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    assert process_ranks(torchrun) == (3, 4, 3, "torchrun")
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}  # the batch shell is no task of a step
    assert process_ranks(batch_script) == (0, 1, 0, "single")


def test_every_start_meets_on_a_port_of_its_own_published_in_the_run_folder(tmp_path):
    """Before: the port was 12000 + (job id mod 1000) x 20 + restart: jobs 1000 and 2000 on one node
    met on one port, and the range covered torchrun's 29500. Now rank 0 hosts the store on a port the
    OS gives it and publishes it under a name of the start's own; the others read it there."""
    import threading

    from engine.distributed import LaunchError, publish_rendezvous, read_rendezvous, rendezvous_file

    def env(job, step="0", restart="0", task=None):
        e = {"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": step, "SLURM_RESTART_COUNT": restart}
        return {**e, "SLURM_ARRAY_TASK_ID": task} if task else e

    names = {rendezvous_file(tmp_path, env(*a)).name for a in
             ((1000,), (2000,), (1000, "1"), (1000, "0", "1"), (1000, "0", "0", "3"))}
    assert len(names) == 5  # another job, step (salloc + srun twice), restart or array task: another name
    got = {}
    reader = threading.Thread(target=lambda: got.update(a=read_rendezvous(tmp_path, 30, env(1000))))
    reader.start()  # a rank that starts before rank 0 has published waits for it
    time.sleep(0.5)
    publish_rendezvous(tmp_path, "gpu-a01", 41234, env(1000))
    reader.join(timeout=30)
    assert got["a"] == ("gpu-a01", 41234)
    with pytest.raises(LaunchError, match=r"did not publish this start's rendezvous in .* within 1 s: is .* on a "
                                          r"file system every node sees"):
        read_rendezvous(tmp_path, 1, env(2000))


def test_the_first_node_is_found_in_slurms_node_list():
    from engine.distributed import first_node_address

    env = {"SLURM_STEP_NODELIST": "localhost,n7", "SLURM_JOB_NODELIST": "n[7-8]"}
    assert first_node_address(env) == "localhost"


@pytest.mark.parametrize("case,local_ranks,visible,tasks,sets,want", [
    ("--gpus-per-task=1: one visible each", range(8), 1, 8, None, [0] * 8),
    ("every GPU visible to every task (srun) or torchrun", range(8), 8, 8, None, list(range(8))),
    ("--gpu-bind=closest, block: tasks 0-3 see GPUs 0-3, 4-7 see 4-7", range(8), 4, 8,
     ["a"] * 4 + ["b"] * 4, [0, 1, 2, 3, 0, 1, 2, 3]),
    ("--gpu-bind=closest, cyclic: even tasks on socket 0, odd on 1", range(8), 4, 8,
     ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3]),
    ("4 tasks, 2 visible each, cyclic over 2 sockets", range(4), 2, 4, ["a", "b", "a", "b"], [0, 0, 1, 1]),
])
def test_each_rank_takes_a_gpu_no_other_rank_of_its_node_takes(case, local_ranks, visible, tasks, sets, want):
    """Before: one visible GPU or set_device(SLURM_LOCALID), which fails on local ranks 4-7 when a
    task sees 4 of 8. With the GPUs a task sees named by their identities (sets), no two tasks that
    see the same GPUs take the same one."""
    from engine.distributed import ordinal_among, pick_cuda_device

    everyone = [("node1", sets[lr] if sets else "all", lr) for lr in local_ranks]
    got = [pick_cuda_device(lr, visible, tasks, ordinal_among(everyone[lr], everyone) if sets else None)
           for lr in local_ranks]
    assert got == want, case
    physical = {(everyone[lr][1], g) for lr, g in zip(local_ranks, got)}
    assert len(physical) == len(list(local_ranks)) or visible == 1  # never two tasks on one GPU


def test_ranks_on_this_node_from_torchrun_or_slurm():
    from engine.distributed import _tasks_on_this_node

    assert _tasks_on_this_node({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert _tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_NODEID": "3"}) == 8
    assert _tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1"}) == 1
    assert _tasks_on_this_node({"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}) == 3


def test_the_job_keeps_numba_s_cache_on_node_local_disk(tmp_path):
    script = launch("recipes/a3.toml", "--nodes", "2", "--tasks-per-node", "1", "--out", tmp_path / "r",
                    "--dry-run").stdout
    assert 'export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/rsb-numba-$(id -u)}' in script


def test_a_sweep_is_one_array_job_task_i_running_trial_i_also_for_one_trial(tmp_path):
    from workflows.slurm_launch import job_script, sbatch_options
    from workflows.sweep.plan import TrialSpec
    from workflows.sweep.run import slurm_job

    trials = [TrialSpec(name=f"t{i}", folder=str(tmp_path / f"t{i}"), base="recipes/a3.toml", cwd=str(ROOT), swept={},
                        seed=i, overrides=(), max_steps=None) for i in range(3)]
    options = {"gpus_per_node": 0, "time": "4:00:00", "partition": "cpu", "sbatch_args": ["--qos=low"]}
    for todo, array in ((trials, "--array=0-2%2"), (trials[:1], "--array=0-0%2")):
        job = slurm_job(todo, tmp_path / "slurm", 2, options)
        opts = sbatch_options(job)
        assert array in opts and "--partition=cpu" in opts and opts[-1] == "--qos=low"
        assert not any(o.startswith("--gpus") for o in opts) and "--ntasks-per-node=1" in opts
        script = job_script(job)
        for i, t in enumerate(todo):
            assert f"  {i}) OUT={t.folder}\n" in script and f"workflows.slurm_task trial {t.folder})" in script
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_multi_node_run_folder_on_a_node_local_file_system_is_warned_about(tmp_path):
    from workflows.slurm_launch import file_system, out_warning

    mounts = ("/dev/vda / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\nhome:/export /home nfs4 rw 0 0\n"
              "lustre@tcp:/fs /lustre lustre rw 0 0\n/dev/nvme0n1 /scratch/local xfs rw 0 0\n")
    assert file_system(Path("/home/me/runs/a1"), mounts) == ("/home", "nfs4")
    assert file_system(Path("/tmp/x/y"), mounts) == ("/tmp", "tmpfs")
    for shared in ("/home/me/runs/a1", "/lustre/proj/runs/a1"):
        assert out_warning(Path(shared), 4, mounts) is None
    for local in ("/tmp/runs/a1", "/scratch/local/a1", "/opt/runs/a1"):
        warning = out_warning(Path(local), 4, mounts)
        assert warning.startswith(f"warning: --out {local} is on ") and "with 4 nodes every node must see" in warning
    assert out_warning(Path("/tmp/runs/a1"), 1, mounts) is None  # one node: its own disk is fine
    # the launcher says it, on the real machine's mounts
    proc = launch("recipes/a3.toml", "--nodes", "2", "--tasks-per-node", "1", "--out", tmp_path / "run", "--dry-run")
    found = file_system(tmp_path)
    shared = found is not None and found[1] in __import__("workflows.slurm_launch").slurm_launch.SHARED_FILE_SYSTEMS
    assert shared or f"# warning: --out {tmp_path / 'run'} is on " in proc.stderr, proc.stderr


def test_an_early_signal_before_the_step_starts_still_reaches_the_step(tmp_path):
    """Slurm's early signal can come while the job script has not started its step yet (a slow start
    on a loaded node or file system; a time limit an admin cut with scontrol): the script must pass it
    on once the step exists, or the run trains into the hard limit and is not requeued. The script runs here under
    bash with a fake ``srun`` (records what reaches it) and a ``touch`` (the script's last command
    before the step) that holds the script until the signal has been sent."""
    import signal

    from workflows.slurm_launch import EARLY_SIGNAL

    script = launch("recipes/a3.toml", "--nodes", "1", "--tasks-per-node", "1", "--out", tmp_path / "r",
                    "--dry-run").stdout
    (tmp_path / "job.sh").write_text(script)
    bin_dir, rec, held, go = tmp_path / "bin", tmp_path / "srun.rec", tmp_path / "held", tmp_path / "go"
    bin_dir.mkdir()
    (bin_dir / "touch").write_text(f'#!/bin/bash\n: > {held}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n'
                                   f'exec /usr/bin/touch "$@"\n')
    (bin_dir / "srun").write_text(f"#!/bin/bash\ntrap 'echo {EARLY_SIGNAL} >> {rec}; exit 0' {EARLY_SIGNAL}\n"
                                  f"echo started >> {rec}\nfor i in $(seq 100); do sleep 0.1; done\n"
                                  f"echo finished >> {rec}\n")
    for f in ("touch", "srun"):
        (bin_dir / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1")
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env)
    deadline = time.monotonic() + 30
    while not held.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.exists(), "the job script did not reach its step"
    os.kill(job.pid, getattr(signal, f"SIG{EARLY_SIGNAL}"))
    go.touch()
    job.wait(timeout=60)
    log = (tmp_path / "r" / "slurm" / "job.log").read_text()
    assert "early signal" in log
    got = rec.read_text().split() if rec.exists() else []
    assert "finished" not in got, (got, log)  # the step did not run to its end
    # the step trapped the signal, or (sent before its trap was set) the signal ended it
    assert EARLY_SIGNAL in got or "stopped before the time limit without a checkpoint" in log, (got, log)
