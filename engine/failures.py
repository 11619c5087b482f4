"""A failure on one rank ends the whole group within seconds, and its line is printed once.

Why: under DDP the other ranks of a failing one are blocked in the next collective (an all-reduce
in backward, a barrier). With NCCL they wait for its timeout (10 minutes and more); under Slurm's
``srun`` nothing else ends them; under torchrun the agent kills them without a word. A rank-local
error (a batch whose images are all unreadable on that node, a full disk where rank 0 writes, a
CUDA error on one GPU) must instead reach the console once, with the rank that hit it, and end
every rank.

How: the process group's store (the TCP key-value store every rank reached at start-up) is the
notice board. The first failing rank claims it (``compare_set``), prints its line and posts it. A
watcher thread on every rank polls the board every :data:`POLL_S`; on a posted failure it ends its
process at once (``os._exit``: the main thread may be blocked inside a collective, where no Python
signal handler runs), with the failing rank's exit status. A rank whose own collective errors
because the failing peer is gone (gloo's "connection closed") finds the board claimed and stays
silent. Rank 0 leaves last (each other rank checks out first, or a few seconds pass): under ``srun``
it hosts the store, and a store that vanished under the others would fill the log with the store
client's connection errors after the one line.

The board talks to the store through clients of its own (from ``MASTER_ADDR``/``MASTER_PORT``), one
for the main thread and one for the watcher, each request bounded by :data:`CLIENT_TIMEOUT_S`: the
process group's own client waits up to its timeout (10 minutes), so a node that vanished (no TCP
reset, no answer) would hold the watcher that long.

Three failures post nothing themselves, and the watchers find them:

* **a rank that dies without a word** (SIGKILL, the OOM killer, a segfault, its node gone): every
  watcher beats a counter on the board and looks at the next rank's (a ring: one read per rank per
  poll, at 512 ranks too); a counter that stops for :data:`SILENT_S` while its rank has not
  checked out is a death, posted by its neighbour with the dead rank's number;
* **a rank stuck with no progress** (a collective the others never reach, an I/O that never
  returns): the main thread ticks the board at every micro-batch, evaluation batch and checkpoint
  (two attribute writes, no sync); no tick for ``stall_s`` (the recipe's ``train.dist_timeout_s``,
  ``train.dist_start_timeout_s`` until the first step) posts the stall with where it happened. A
  rank waiting inside the training step (the all-reduce) gives one waiting elsewhere
  :data:`STEP_GRACE_S` more to claim the board, so the line names the rank the others wait for;
* **the store gone** before anything is posted (its host, rank 0 under ``srun``, was killed):
  after :data:`LOST_S` the watcher ends its process with a line that says so.

Errors every rank finds alike at the same step (a diverging loss, read with an all-reduce; a
config error) are printed once by rank 0 without a rank; the others wait until it has printed, so
that torchrun's group SIGTERM cannot cut rank 0 short (:meth:`FailureBoard.fail` with ``agreed``).
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

POLL_S = 0.5  # how often every rank looks at the board (a tiny store request) and beats its counter
LEAVE_WAIT_S = 5.0  # how long rank 0 waits for the others to check out before it ends
PRINTED_WAIT_S = 10.0  # how long a rank with an agreed error waits for rank 0's line
LOST_S = 3.0  # the store unreachable this long: the group is gone
CLIENT_TIMEOUT_S = 2.0  # one request of the board's own store clients
SILENT_S = 6.0  # a rank's heartbeat stopped this long: it is gone
START_GRACE_S = 300.0  # a rank's first heartbeat may come this late (imports on a slow shared file system)
STEP_GRACE_S = 10.0  # a rank stalled inside the step (a collective) waits this much more before it claims
# A rank with an unexplained error waits this long for a diagnosis: the dead rank's neighbour sees
# SILENT_S of silence up to 2 polls late (the last beat before the death, then its own poll), and on
# a loaded node each of its poll's 3 store requests may take up to CLIENT_TIMEOUT_S. Returns as soon
# as the line is posted, so the margin costs time only when no diagnosis comes.
DIAGNOSIS_S = SILENT_S + 2 * POLL_S + 3 * CLIENT_TIMEOUT_S


def _prefix() -> str:
    """Keys unique to this start of the job (torchrun's store outlives restarts of its workers)."""
    return (f"rsb-failure/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")


def _own_client():
    """A client of the process group's store with short timeouts, or None where the store's address
    is not in the environment (the default store is used then)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=CLIENT_TIMEOUT_S))
    except Exception:  # the store cannot be reached from a second client: keep the default one
        return None


class FailureBoard:
    """The notice board of one run's process group; a no-op in a single process. ``stall_s``: the
    seconds without a tick after which this rank reports itself stuck (None: never)."""

    def __init__(self, rank: int, world_size: int, local_rank: int = 0, store=None, stall_s: float | None = None,
                 start_stall_s: float | None = None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.store = store
        self._watch_store = store
        if self.store is None and world_size > 1 and dist.is_available() and dist.is_initialized():
            default = dist.distributed_c10d._get_default_store()
            self.store = _own_client() or default
            self._watch_store = _own_client() or self.store
        self.key = _prefix()
        self.failing = False  # this rank's main thread is handling its own failure
        self.stall_s, self.start_stall_s = stall_s, start_stall_s if start_stall_s is not None else stall_s
        self._last_tick, self._phase, self._started = time.monotonic(), "start", False
        self._stop = threading.Event()
        self._watcher = None
        if self.store is not None:
            self._watcher = threading.Thread(target=self._watch, name="rsb-failure-watcher", daemon=True)
            self._watcher.start()

    @property
    def enabled(self) -> bool:
        return self.store is not None

    # ------------------------------------------------------------------ the main thread's progress
    def tick(self, phase: str) -> None:
        """The main thread is alive and about to do ``phase`` ("data": waiting for a batch; "step":
        forward, backward and the gradient all-reduce; "eval", "checkpoint", "export")."""
        self._last_tick, self._phase = time.monotonic(), phase
        if phase == "step":
            self._started = True

    # ------------------------------------------------------------------ the failing rank
    def fail(self, line: str | None, code: int, *, agreed: bool = False) -> None:
        """Report this rank's failure: ``line`` is printed once for the whole group (prefixed
        with this rank unless ``agreed``, i.e. every rank raised the same error at the same
        step); returns when the others have been told (rank 0: when they have left, or after a
        short wait). ``line`` None: this rank's error is the consequence of one already posted
        (:meth:`await_diagnosis` found it); it only checks out."""
        self.failing = True
        if not self.enabled:
            if line is not None:
                _print(line)
            return
        if line is None:
            self._wait_for("printed", PRINTED_WAIT_S)
        elif agreed:
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

    def await_diagnosis(self) -> int | None:
        """For an error this rank cannot explain (a collective failed: its peer may have died): the
        code a watcher posts within :data:`DIAGNOSIS_S` (a dead rank's neighbour needs
        :data:`SILENT_S` to be sure), else None."""
        if not self.enabled:
            return None
        deadline = time.monotonic() + DIAGNOSIS_S
        while time.monotonic() < deadline:
            code = self.posted_code()
            if code is not None:
                return code
            time.sleep(POLL_S / 2)
        return self.posted_code()

    def close(self) -> None:
        """The run ended on this rank (normally or not): check out (so no neighbour takes the
        silence for a death) and stop watching."""
        if self._watch_store is not None and not self._stop.is_set():
            try:
                self._watch_store.set(self.key + f"done/{self.rank}", "1")
            except Exception:
                pass
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2 * POLL_S + CLIENT_TIMEOUT_S)

    # ------------------------------------------------------------------ store helpers
    def _claim(self, store=None, who: str = "") -> bool:
        """Take the board for one line; ``who`` tells this rank's watcher from its main thread."""
        me = f"{self.rank}{who}"
        try:
            got = (store or self.store).compare_set(self.key + "claim", "", me)
        except Exception:
            return True  # no board to claim: say it ourselves
        return got.decode() == me

    def _set(self, name: str, value: str, store=None) -> None:
        try:
            (store or self.store).set(self.key + name, value)
        except Exception:
            pass

    def _wait_for(self, name: str, seconds: float, store=None) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if (store or self.store).check([self.key + name]):
                    return True
            except Exception:
                return False
            time.sleep(0.05)
        return False

    def _leave(self, store=None) -> None:
        """Done with the board: the other ranks check out; rank 0 waits until they have (or a few
        seconds), since under ``srun`` the store lives in its process."""
        store = store or self.store
        try:
            if self.rank != 0:
                store.add(self.key + "left", 1)
                return
            deadline = time.monotonic() + LEAVE_WAIT_S
            while time.monotonic() < deadline and store.add(self.key + "left", 0) < self.world_size - 1:
                time.sleep(0.05)
        except Exception:
            pass

    # ------------------------------------------------------------------ every rank's watcher
    def _watch(self) -> None:
        store = self._watch_store
        lost_since = None
        neighbour = (self.rank + 1) % self.world_size
        beats, seen_at, born = -1, None, time.monotonic()
        while not self._stop.wait(POLL_S):
            try:
                posted = store.check([self.key + "printed"])
                store.add(self.key + f"beat/{self.rank}", 1)
                theirs = store.add(self.key + f"beat/{neighbour}", 0)
                lost_since = None
            except Exception:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since >= LOST_S and not self._stop.is_set() and not self.failing:
                    if self.local_rank == 0:
                        host = "rank 0" if os.environ.get("SLURM_PROCID") is not None and \
                            "TORCHELASTIC_RUN_ID" not in os.environ else "torchrun's agent on the first node"
                        _print(f"error: rank {self.rank} of {self.world_size}: lost contact with the process group's "
                               f"store (hosted by {host}): that process or its node ended without a word (killed by "
                               f"the OS or the scheduler?); look for the cause in its node's log, then continue with "
                               f"--resume auto")
                    _exit(1)
                continue
            if posted and not self.failing and not self._stop.is_set():
                try:
                    code = int(store.get(self.key + "printed").decode())
                except Exception:
                    code = 1
                self._leave(store)
                _exit(code or 1)
            now = time.monotonic()
            if theirs != beats:
                beats, seen_at = theirs, now
            silent = now - (seen_at if seen_at is not None else born)
            if silent >= (SILENT_S if seen_at is not None else START_GRACE_S) and not self._stop.is_set() \
                    and not self.failing and not self._checked_out(store, neighbour):
                self._announce(store, f"error: rank {neighbour} of {self.world_size} stopped without a word: no sign "
                                      f"of life for {silent:.0f} s (killed by a signal or the OOM killer, a crash, or "
                                      f"its node is gone); look for the cause in that node's log (dmesg, the job's "
                                      f"stderr), then continue with --resume auto", 1, gone=neighbour)
            limit = self.stall_s if self._started else self.start_stall_s
            if limit and not self.failing and not self._stop.is_set():
                quiet_s = now - self._last_tick
                if quiet_s >= limit + (STEP_GRACE_S if self._phase == "step" else 0.0):
                    where = {"data": "waiting for its next batch", "step": "inside the training step (a collective "
                             "waits for a rank that does not come)", "eval": "evaluating", "checkpoint":
                             "writing or checking a checkpoint", "export": "exporting", "start": "starting up"}
                    self._announce(store, f"error: rank {self.rank} of {self.world_size}: no progress for "
                                          f"{quiet_s:.0f} s, {where.get(self._phase, self._phase)} (the limit is "
                                          f"train.{'dist_timeout_s' if self._started else 'dist_start_timeout_s'}"
                                          f" = {limit:g} s); continue with --resume auto", 1)

    def _checked_out(self, store, rank: int) -> bool:
        try:
            return bool(store.check([self.key + f"done/{rank}"]))
        except Exception:
            return False

    def _announce(self, store, line: str, code: int, gone: int | None = None) -> None:
        """From the watcher: post a failure no rank's main thread could (a death, a stall), then end.
        ``gone``: a rank that is dead, checked out on its behalf (rank 0 waits for no one who cannot come)."""
        if self._claim(store, "-watcher"):
            _print(line)
            self._set("line", line, store)
            if gone not in (None, 0):
                try:
                    store.add(self.key + "left", 1)
                except Exception:
                    pass
            self._set("printed", f"{code}", store)
        else:
            self._wait_for("printed", PRINTED_WAIT_S, store)
            try:
                code = int(store.get(self.key + "printed").decode())
            except Exception:
                pass
        self._leave(store)
        _exit(code)


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
