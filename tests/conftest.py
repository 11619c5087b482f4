"""The test session: W&B offline, Ctrl-C as a terminal gives it, and the shared fixtures
(tests/helpers/fixtures.py)."""
from __future__ import annotations

import os
import signal

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
