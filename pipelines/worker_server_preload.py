"""What the reference pipeline's forkserver (:mod:`pipelines.worker_server`) imports once, and how it
ends.

It imports :mod:`pipelines.reference` (torch, torchvision, PIL), so that every worker it forks starts
with them. It ends when the process that started it has ended (multiprocessing closes the server's
"alive" pipe), by ``SystemExit``; the interpreter's teardown of those modules would then take about
a second on the 2-core box, during which the server still holds the run's stdout and stderr open:
whatever reads the run's output to its end (a test, a sweep's runner, a job step's log) waits that
second after every run. Nothing is left to do in the server by then, so its first exit handler ends
it. Only the server imports this module: the main process and the workers it forks never run it
(a forked worker ends by ``os._exit``, which runs no exit handler).
"""
from __future__ import annotations

import atexit
import os

import pipelines.reference  # noqa: F401  (preloaded for the workers)

atexit.register(os._exit, 0)
