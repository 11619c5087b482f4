"""The signals a run answers with the agreed stop (a checkpoint, then exit 128 + the signal): SIGINT
(Ctrl-C), SIGTERM (preemption, ``scancel``, a sweep pruning a trial) and SIGUSR2 (Slurm's early
warning before a time limit). One tuple for both sides of that agreement: the training loop turns them
into a stop (engine/loop.py), and the reference pipeline's worker server blocks them so that its
workers leave them to the main process (pipelines/worker_server.py)."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
