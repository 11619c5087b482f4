"""The test session: W&B offline, Ctrl-C as a terminal gives it, and the shared fixtures
(tests/helpers/fixtures.py)."""
from __future__ import annotations

import os
import signal
import sys

import pytest

pytest_plugins = ["tests.helpers.fixtures"]  # the fixtures every test module may ask for

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A shell without job control starts a background command (`make test &`, nohup, some CI runners)
# with SIGINT ignored, and an ignored signal stays ignored across exec: every CLI the tests start
# would then never see the Ctrl-C the interruption tests send (Python installs its KeyboardInterrupt
# handler only where SIGINT is not ignored at start-up). Give the session the default handler, which
# the children get back as SIG_DFL.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _is_numba_dispatcher_finalizer(unraisable) -> bool:
    """numba 0.68's Dispatcher finalizer iterates its overloads while another thread may change them
    (FFCV compiles its pipeline in its loader threads) and raises KeyError at garbage collection."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (isinstance(unraisable.exc_value, KeyError) and code is not None and code.co_name == "finalizer"
            and code.co_filename.replace("\\", "/").endswith("numba/core/dispatcher.py"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Keep that one harmless error away from pytest's unraisable-exception hook. The hook formats the
    traceback where the collection happens, and Python 3.11's traceback formatting calls ``ast.parse``
    (for its ^^^ markers): when the collection runs inside another ``ast.parse`` of the same process (a
    test parsing source, pydantic reading docstrings at import), the nested call resets the state the
    outer one counts its depth in (CPython's AST state is one per interpreter; gh-106905) and the outer
    call fails with "SystemError: AST constructor recursion depth mismatch". Seen under pytest-xdist,
    where test_layers and a wandb import failed that way after the FFCV tests of the same worker."""
    hook = sys.unraisablehook

    def without_numba_finalizer(unraisable):
        if not _is_numba_dispatcher_finalizer(unraisable):
            hook(unraisable)

    sys.unraisablehook = without_numba_finalizer


# The longest modules first (their figures: `pytest --durations=0` on the 2-core box): `make test` runs
# the suite on 2 pytest-xdist workers, whole files each (--dist loadfile), handed out in collection
# order, so the long ones start at once and the short ones fill in around them. The Slurm module waits
# on Slurm for half its time (requeue credentials, the 30-s time-limit checks): it overlaps best with
# the CPU-bound fault runs.
LONG_FIRST = ("test_faults.py", "test_slurm.py", "test_engine.py", "test_stage1_backends.py", "test_sweep_adaptive.py",
              "test_convert.py", "test_threads.py", "test_sweep.py", "test_learning.py", "test_reference_items.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: the rest keep their order
