"""The command lines as the tests run them: a tool's ``main(argv)`` in the test process (the same code
path as the script, without starting Python and importing torch again for every call: seconds each
on two cores), the installed ``rsb-*`` scripts and what a user types for each, and their ``--help``."""
from __future__ import annotations

import configparser
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


BIN = Path(sys.executable).parent


def console_scripts() -> dict[str, str]:
    """rsb-* name -> module, from setup.cfg's entry points (what pip installs)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    return {name.strip(): target.strip().split(":")[0] for name, target in (ln.split("=", 1) for ln in lines)}


SCRIPTS = console_scripts()
TYPED = {module: ("python -m engine.run" if module == "engine.run" else f"python {module.replace('.', '/')}.py")
         for module in SCRIPTS.values()}


def help_text(cmd: list[str]) -> str:
    """``cmd --help`` as a process (the console-script wrapper sets argv[0] itself)."""
    proc = subprocess.run(cmd + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def help_in_process(module: str, argv0: str, monkeypatch, capsys) -> str:
    """``main(["--help"])`` of ``module`` with ``sys.argv[0]`` as the shell sets it (no new Python and
    torch import per command)."""
    import importlib

    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out
