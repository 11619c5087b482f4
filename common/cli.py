"""How a command-line tool names itself in ``--help``: as the command the user typed.

The tools run three ways: the installed console scripts (``rsb-train``, ``rsb-sweep``, ...), ``python
tools/<tool>.py`` and ``python -m engine.run``. argparse names a program after the basename of
``sys.argv[0]``, which is ``run.py`` for ``python -m engine.run`` and nothing a user can type back;
:func:`prog` gives the command as typed, and :func:`examples` writes a help text's examples with it,
so a usage line and an example can be copied from the help into the shell as they are. The help
shows a docstring as plain text: its reST literals (````x````) lose their backticks.
"""
from __future__ import annotations

import os
import sys

CONSOLE_PREFIX = "rsb-"  # setup.cfg [options.entry_points] console_scripts


def prog(fallback: str) -> str:
    """``rsb-...`` when started through a console script, else ``fallback`` (e.g. ``python tools/sweep.py``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith(CONSOLE_PREFIX) else fallback


def examples(text: str, fallback: str, name: str) -> str:
    """``text`` (a docstring's examples and notes) for ``--help``: each ``fallback`` command, as the
    docstrings write their examples, named ``name``, and reST literals as plain text."""
    text = text.replace("``", "")
    return text.replace(fallback, name) if name != fallback else text
