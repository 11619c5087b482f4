"""Run a command-line ``main(argv)`` in the test process: the same code path as the script, without
starting Python and importing torch again for every call (seconds each on two cores)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
from typing import Callable


def run_main(main: Callable[[list[str]], int], argv: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """``main(argv)`` with stdout/stderr captured and one torch thread (as the scripts run in these
    tests, OMP_NUM_THREADS=1); ``env`` is set for the call only. A ``SystemExit`` (argparse) counts
    as the exit status."""
    import torch

    argv = [str(a) for a in argv]
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
