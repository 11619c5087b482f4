"""Where the reference pipeline's DataLoader workers come from: multiprocessing's forkserver, a clean
single-threaded process that imports torch and :mod:`pipelines.reference` once (through
:mod:`pipelines.worker_server_preload`, which also makes it exit quickly) and forks a worker in a
fraction of a second. Not a fork of the training process: a fork copies only the forking thread, so a
worker could inherit a lock that another thread (a queue's feeder, gloo, the failure watcher) held at
that instant and wait for it forever (seen here about once in 20 runs of 8 epochs under torchrun,
when every epoch forked new workers).

The server and multiprocessing's resource tracker start with the stop signals blocked and keep them
blocked (the tracker ignores SIGINT and SIGTERM itself): Slurm signals every process of a job step
(the early SIGUSR2, SIGTERM) and a terminal every process of its group (Ctrl-C), and their default
action would end the server, so that the next loader made (the val loader after the first epoch)
could not start its workers, and the tracker, which would be restarted with a screen of errors. The
workers inherit the mask: the main process alone decides when to stop, and ends them. The server
exits when the process that started it does.

This module imports no torch: the engine starts the server before it imports torch itself
(:func:`start_early`), so that the two imports share the machine's cores instead of the first batch
waiting for the server's.

A script of your own that builds a ``ReferencePipeline`` with workers must guard its entry point
with ``if __name__ == "__main__":``, as for any forkserver or spawn start (Python's multiprocessing
docs, "safe importing of main module"; forkserver is Python 3.14's default on Linux): each worker
imports the main module.
"""
from __future__ import annotations

import multiprocessing
import signal
from multiprocessing import forkserver, resource_tracker

from common.stop_signals import STOP_SIGNALS

PRELOAD = ["pipelines.worker_server_preload"]  # imports torch, torchvision and PIL in the server once


def worker_context():
    """The multiprocessing context for the workers, its server running (started once per process)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()  # ends by unblocking SIGINT/SIGTERM here: blocked again below
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)
    return ctx


def start_early(data) -> None:
    """Start the server now when a run with this ``[data]`` section (``common.config.DataConfig``)
    will need it: the reference pipeline with workers."""
    if data.pipeline == "reference" and data.workers > 0:
        worker_context()
