"""Every command's --help, as a newcomer runs it: the usage line names the command that was typed
(the installed rsb-* script, or python tools/<tool>.py / python -m engine.run) and the help shows an
example with that same command, in plain text."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def check(text: str, command: str) -> None:
    assert text.startswith(f"usage: {command} "), text.splitlines()[0]
    body = text.split("\n\n", 1)[1]
    examples = [ln for ln in body.splitlines() if ln.strip().startswith(f"{command} ")]
    assert examples, f"no example starting with {command!r} in the help"
    assert any(re.search(r"\S+\.(toml|pt|safetensors)\b|/", ln) for ln in examples)  # with real arguments
    assert "``" not in text  # plain text, not a reST docstring


def test_the_console_scripts_are_the_ones_the_readme_names():
    assert set(SCRIPTS) == {"rsb-train", "rsb-convert", "rsb-evaluate", "rsb-profile", "rsb-sweep", "rsb-gradcam",
                            "rsb-launch"}


@pytest.mark.parametrize("name", ["rsb-train", "rsb-sweep"])  # the two that start without torch
def test_console_script_help_names_itself_with_an_example(name):
    check(help_text([str(BIN / name)]), name)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_names_what_was_typed(name, monkeypatch, capsys):
    module = SCRIPTS[name]
    check(help_in_process(module, str(BIN / name), monkeypatch, capsys), name)
    typed = TYPED[module]
    argv0 = str(ROOT / "engine" / "run.py") if module == "engine.run" else typed.split()[1]  # as Python sets it
    check(help_in_process(module, argv0, monkeypatch, capsys), typed)
