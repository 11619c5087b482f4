"""What each task of a launcher job runs (``python -m workflows.slurm_task MODE ...``, written into the
job script by :mod:`workflows.slurm_launch`; not a command for people).

* ``srun -- ENGINE_ARGS``: one task per GPU; becomes ``python -m engine.run ENGINE_ARGS`` (exec), and
  the engine takes its rank and rendezvous from Slurm (``engine.distributed``);
* ``torchrun --nproc-per-node N -- ENGINE_ARGS``: one task per node; runs torchrun's agent here with
  ``--nnodes`` = the job's nodes, the c10d rendezvous on the job's first node at a port of this
  start's own, and an id unique to this start (job id and restart count), and exits with the first
  failing rank's status (torchrun's own is 1 for any failure);
* ``trial FOLDER``: one sweep trial (``workflows.sweep.run.run_trial``, which records ``trial.json``
  around the engine) and exits with the engine's status.

In every mode the early signal (SIGUSR2) is ignored until the engine installs its own handler
(``StopRequest``, at the start of its training loop; ignored dispositions survive ``exec`` and are
inherited by children): Slurm signals every process of a step, and a rank still importing torch
would otherwise die of it. The job script repeats the signal until the step ends, so none is lost.
"""
from __future__ import annotations

import os
import signal
import sys

RENDEZVOUS_WAIT_S = 900  # the other nodes' agents wait this long for the first node's (slow imports, a busy FS)


def _exec_engine(engine_args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, "-m", "engine.run", *engine_args])


def _torchrun(nproc: int, engine_args: list[str]) -> int:
    import logging
    import traceback
    from pathlib import Path

    # The agent's C++ warnings (when another node's agent, the store's host, has already gone: "recvVector
    # failed ... Connection was likely closed") would follow the engine's last line in the run's log.
    # torch reads this when it is imported; the workers, started later, get the default again.
    saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    import torch  # noqa: F401  (reads TORCH_CPP_LOG_LEVEL)

    if saved is None:
        del os.environ["TORCH_CPP_LOG_LEVEL"]
    else:
        os.environ["TORCH_CPP_LOG_LEVEL"] = saved
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from engine.distributed import (LaunchError, first_node_address, free_port, publish_rendezvous, read_rendezvous,
                                    rendezvous_file)

    env = os.environ
    out = Path(engine_args[engine_args.index("--out") + 1]) if "--out" in engine_args else Path.cwd()
    first = env.get("SLURM_NODEID", "0") == "0"
    try:  # the first node's agent hosts the c10d rendezvous on a port the OS gives it, published in OUT
        if first:
            host, port = first_node_address(), free_port()
            publish_rendezvous(out, host, port)
        else:
            host, port = read_rendezvous(out, RENDEZVOUS_WAIT_S)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    nnodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES", "1")
    run_id = f"{env.get('SLURM_JOB_ID', 'job')}-{env.get('SLURM_RESTART_COUNT', '0')}"
    args = get_args_parser().parse_args([
        "--nnodes", nnodes, "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", run_id, "--max-restarts", "0",
        "--module", "engine.run", *engine_args])
    if env.get("SLURM_NODEID", "0") == "0":
        print(f"slurm: torchrun on {nnodes} node(s) x {nproc}, c10d rendezvous {host}:{port}, id {run_id}",
              file=sys.stderr, flush=True)
    # the agent's own messages (closing signals, "failed (exitcode: 140)") go to a side log, not the
    # run's: the run's log ends with the engine's last line (workflows.slurm_launch)
    agent_log = logging.getLogger("torch.distributed.elastic")
    agent_log.propagate = False
    handler = logging.FileHandler(out / "slurm" / f"torchrun-node{env.get('SLURM_NODEID', '0')}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    agent_log.addHandler(handler)
    try:
        run(args)
        return 0
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as e:
        return 128 + int(e.sigval)
    except Exception:  # e.g. the rendezvous store went with the first node's agent after a failure there
        agent_log.error("the agent stopped:\n%s", traceback.format_exc())
        return 1
    finally:
        if first:
            rendezvous_file(out).unlink(missing_ok=True)
            try:
                rendezvous_file(out).parent.rmdir()
            except OSError:
                pass


def _trial(folder: str) -> int:
    import json
    from pathlib import Path

    from workflows.sweep.plan import TrialSpec
    from workflows.sweep.run import run_trial

    # SIGTERM reaches the engine from Slurm directly; this process waits for it to stop and records
    signal.signal(signal.SIGTERM, lambda *_: None)
    data = json.loads((Path(folder) / "trial-spec.json").read_text())
    spec = TrialSpec.from_json(data)
    if data.get("study"):  # an adaptive sweep: report to the study trial this trial is bound to
        from workflows.sweep import study as st

        args = data["study"]
        bound = st.bind(st.open_study_from(args), spec, args["prune"]["metric"])
        if bound is None:  # the study has finished it (complete or pruned) before this start
            return 0
        record = run_trial(spec, bound=bound, metric=args["prune"]["metric"], budget_epochs=args["epochs"])
    else:
        record = run_trial(spec)  # the engine's own output goes to the trial's log.txt
    if record.get("status") == "pruned":
        print(f"trial {spec.name} pruned after epoch {record['pruned_at_epoch']}: it stopped with a checkpoint, its "
              f"folder is kept", file=sys.stderr, flush=True)
        return 0
    if record.get("status") == "done":
        return 0
    line = str(record.get("error") or f"exit status {record.get('returncode')}")
    if record.get("status") == "failed":  # the job log's last line says why (the job script keeps it last)
        line = line if line.startswith("error:") else f"error: trial {spec.name}: {line}"
    print(line, file=sys.stderr, flush=True)
    return int(record.get("returncode") or 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    mode = argv.pop(0) if argv else ""
    if mode == "srun" and argv[:1] == ["--"]:
        _exec_engine(argv[1:])
    if mode == "torchrun" and len(argv) > 3 and argv[0] == "--nproc-per-node" and argv[2] == "--":
        return _torchrun(int(argv[1]), argv[3:])
    if mode == "trial" and len(argv) == 1:
        return _trial(argv[0])
    print(f"error: workflows.slurm_task: unknown mode {' '.join([mode, *argv])[:200]!r} (written by "
          f"workflows.slurm_launch only)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
