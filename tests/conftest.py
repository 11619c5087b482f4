"""The test session: W&B offline, and the shared fixtures (tests/helpers/fixtures.py)."""
from __future__ import annotations

import os

pytest_plugins = ["tests.helpers.fixtures"]  # the fixtures every test module may ask for

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
