"""What a run's start and end cost in process time, checked by what happens, not by a clock.

Every rank of every run, every trial of a sweep and every restart of a preempted job starts a Python
process that imports torch and timm and later ends it; on the 2-core box the interpreter's teardown of
those modules took 1.0-1.1 s after a run's last line (2.5 s with the reference pipeline's forkserver,
which holds the run's output pipes until it has torn down torch too), and timm's import of wandb (for
a summary writer this project never calls) 0.6-0.7 s of every start. These tests fail when the
mechanisms that remove those costs are undone; they time nothing.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_timm_is_imported_without_wandb_and_wandb_still_imports_after():
    pytest.importorskip("wandb")
    proc = _python("import sys\n"
                   "import models.factory\n"
                   "print('wandb after the model factory:', 'wandb' in sys.modules)\n"
                   "import wandb\n"
                   "print('wandb importable:', hasattr(wandb, 'init'))\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb after the model factory: False" in proc.stdout, proc.stdout
    assert "wandb importable: True" in proc.stdout, proc.stdout


def test_a_tool_ends_with_its_status_after_the_exit_handlers_and_without_the_teardown():
    """common/process_exit.py: multiprocessing's and logging's exit handlers run (they end children and
    flush), the interpreter's teardown (here: an object's finaliser at module teardown) does not."""
    proc = _python("import atexit, sys\n"
                   "from common.process_exit import exit_without_teardown\n"
                   "class Torn:\n"
                   "    def __del__(self):\n"
                   "        print('teardown ran', flush=True)\n"
                   "kept = Torn()\n"
                   "atexit.register(print, 'exit handlers ran')\n"
                   "print('the run wrote this', end='')\n"  # unflushed: the exit flushes it
                   "exit_without_teardown(3)\n")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the run wrote this" in proc.stdout
    assert "exit handlers ran" in proc.stdout
    assert "teardown ran" not in proc.stdout


def test_the_forkserver_ends_at_its_first_exit_handler():
    """The reference pipeline's forkserver imports pipelines/worker_server_preload.py: when it ends (by
    SystemExit, once the main process has gone), no later step of the interpreter's exit runs."""
    from pipelines.worker_server import PRELOAD

    assert PRELOAD == ["pipelines.worker_server_preload"]
    proc = _python("import atexit\n"
                   "atexit.register(print, 'an earlier exit handler ran')\n"
                   "import pipelines.worker_server_preload\n"
                   "raise SystemExit(5)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "an earlier exit handler ran" not in proc.stdout


@pytest.mark.parametrize("module,script", [("engine.run", "rsb-train"), ("tools.sweep", "rsb-sweep"),
                                           ("tools.evaluate", "rsb-evaluate"),
                                           ("tools.profile_throughput", "rsb-profile")])
def test_the_heavy_tools_end_that_way(module, script):
    """``python -m`` and the installed console script both end through the tool's ``cli()``."""
    from importlib.metadata import entry_points

    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert source.split('if __name__ == "__main__":', 1)[1].strip() == "cli()"
    cli = source.split("\ndef cli(", 1)[1].split("\ndef ", 1)[0]
    assert "exit_without_teardown(main())" in cli
    installed = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert installed.get(script) == f"{module}:cli", f"{script} -> {installed.get(script)} (make setup reinstalls)"
