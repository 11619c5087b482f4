"""Every command's --help, as a newcomer runs it: the usage line names the command that was typed
(the installed rsb-* script, or python tools/<tool>.py / python -m engine.run) and the help shows an
example with that same command, in plain text."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.cli import BIN, SCRIPTS, TYPED, help_in_process, help_text

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("script", ["evaluate", "profile_throughput", "gradcam", "launch_slurm", "sweep",
                                    "make_demo_data"])
def test_help_answers_before_torch_is_imported(script):
    """--help (and a usage error) of a tool is parsed before its work imports torch (2-4 s here): the
    import list Python itself prints (-X importtime) holds no torch. The engine imports it only after
    its recipe is checked (rsb-train's help test above runs the same way)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", f"tools/{script}.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert "torch" not in imported, [m for m in imported if m.startswith("torch")][:5]


def test_convert_help_shows_each_default_once():
    import sys

    text = help_text([sys.executable, "tools/convert_imagenet.py"])
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: beside the ground-truth file)" in " ".join(text.split())
