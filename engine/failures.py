"""A failure on one rank ends the whole group within seconds, and its line is printed once.

Why: under DDP the other ranks of a failing one are blocked in the next collective (an all-reduce
in backward, a barrier). With NCCL they wait for its timeout (10 minutes and more); under Slurm's
``srun`` nothing else ends them; under torchrun the agent kills them without a word. A rank-local
error (a batch whose images are all unreadable on that node, a full disk where rank 0 writes, a
CUDA error on one GPU) must instead reach the console once, with the rank that hit it, and end
every rank.

How: the process group's store (the TCP key-value store every rank reached at start-up) is the
notice board. The first failing rank claims it (``compare_set``), prints its line and posts it. A
watcher thread on every rank polls the board (``Store.check``, every :data:`POLL_S`); on a posted
failure it ends its process at once (``os._exit``: the main thread may be blocked inside a
collective, where no Python signal handler runs), with the failing rank's exit status. A rank whose
own collective errors because the failing peer is gone (gloo's "connection closed") finds the board
claimed and stays silent. Rank 0 leaves last (each other rank checks out first, or a few seconds
pass): under ``srun`` it hosts the store, and a store that vanished under the others would fill the
log with the store client's connection errors after the one line.

Errors every rank finds alike at the same step (a diverging loss, read with an all-reduce; a
config error) are printed once by rank 0 without a rank; the others wait until it has printed, so
that torchrun's group SIGTERM cannot cut rank 0 short (:meth:`FailureBoard.fail` with ``agreed``).

If the store itself goes away before anything is posted (its host, rank 0 under ``srun``, was
killed by the OS or the scheduler), the watcher ends the process after :data:`LOST_S` with a line
that says so: a hang is never the answer.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

POLL_S = 0.5  # how often every rank looks at the board (a tiny store request)
LEAVE_WAIT_S = 5.0  # how long rank 0 waits for the others to check out before it ends
PRINTED_WAIT_S = 10.0  # how long a rank with an agreed error waits for rank 0's line
LOST_S = 3.0  # the store unreachable this long: the group is gone


def _prefix() -> str:
    """Keys unique to this start of the job (torchrun's store outlives restarts of its workers)."""
    return (f"rsb-failure/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")


class FailureBoard:
    """The notice board of one run's process group; a no-op in a single process."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0, store=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.store = store
        if self.store is None and world_size > 1 and dist.is_available() and dist.is_initialized():
            self.store = dist.distributed_c10d._get_default_store()
        self.key = _prefix()
        self.failing = False  # this rank's main thread is handling its own failure
        self._stop = threading.Event()
        self._watcher = None
        if self.store is not None:
            self._watcher = threading.Thread(target=self._watch, name="rsb-failure-watcher", daemon=True)
            self._watcher.start()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------------ the failing rank
    def fail(self, line: str, code: int, *, agreed: bool = False) -> None:
        """Report this rank's failure: ``line`` is printed once for the whole group (prefixed
        with this rank unless ``agreed``, i.e. every rank raised the same error at the same
        step); returns when the others have been told (rank 0: when they have left, or after a
        short wait)."""
        self.failing = True
        if not self.enabled:
            _print(line)
            return
        if agreed:
            if self.rank == 0:
                _print(line)
                self._set("printed", f"{code}")
            else:
                self._wait_for("printed", PRINTED_WAIT_S)
        elif self._claim():
            _print(_with_rank(line, self.rank, self.world_size))
            self._set("line", line)
            self._set("printed", f"{code}")
        else:  # another rank failed first (this may be the consequence): its line is the one
            self._wait_for("printed", PRINTED_WAIT_S)
        self._leave()

    def posted_code(self) -> int | None:
        """The exit status another rank posted, if any."""
        try:
            if self.store is not None and self.store.check([self.key + "printed"]):
                return int(self.store.get(self.key + "printed").decode())
        except Exception:  # the store is gone: nothing more to learn from it
            return None
        return None

    def close(self) -> None:
        """The run ended on this rank (normally or not): stop watching."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2 * POLL_S)

    # ------------------------------------------------------------------ store helpers
    def _claim(self) -> bool:
        try:
            got = self.store.compare_set(self.key + "claim", "", str(self.rank))
        except Exception:
            return True  # no board to claim: say it ourselves
        return got.decode() == str(self.rank)

    def _set(self, name: str, value: str) -> None:
        try:
            self.store.set(self.key + name, value)
        except Exception:
            pass

    def _wait_for(self, name: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.store.check([self.key + name]):
                    return True
            except Exception:
                return False
            time.sleep(0.05)
        return False

    def _leave(self) -> None:
        """Done with the board: the other ranks check out; rank 0 waits until they have (or a few
        seconds), since under ``srun`` the store lives in its process."""
        try:
            if self.rank != 0:
                self.store.add(self.key + "left", 1)
                return
            deadline = time.monotonic() + LEAVE_WAIT_S
            while time.monotonic() < deadline and self.store.add(self.key + "left", 0) < self.world_size - 1:
                time.sleep(0.05)
        except Exception:
            pass

    # ------------------------------------------------------------------ every rank's watcher
    def _watch(self) -> None:
        lost_since = None
        while not self._stop.wait(POLL_S):
            try:
                posted = self.store.check([self.key + "printed"])
                lost_since = None
            except Exception:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since >= LOST_S and not self._stop.is_set() and not self.failing:
                    if self.local_rank == 0:
                        _print(f"error: rank {self.rank} of {self.world_size}: lost contact with the process group's "
                               f"store: another process of this run ended without a word (killed by the OS or the "
                               f"scheduler?); look for the cause in its node's log, then continue with --resume auto")
                    _exit(1)
                continue
            if posted and not self.failing and not self._stop.is_set():
                try:
                    code = int(self.store.get(self.key + "printed").decode())
                except Exception:
                    code = 1
                self._leave()
                _exit(code or 1)


def _with_rank(line: str, rank: int, world: int) -> str:
    """``error: X`` -> ``error: rank R of N: X``."""
    head, sep, rest = line.partition("error: ")
    where = f"rank {rank} of {world}: "
    return f"{head}{sep}{where}{rest}" if sep and not head else f"{where}{line}"


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _exit(code: int) -> None:
    """End this process now, from the watcher thread (the main thread may be stuck in a collective)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
