"""Rank-local faults for the multi-rank tests, put in place when a process starts.

Python imports ``sitecustomize`` from ``sys.path`` at start-up, so a test that puts this folder on
``PYTHONPATH`` and sets ``RSB_FAULT`` gives one rank of a real torchrun or srun job a fault no other
rank sees, with no hook in the project's code. ``RSB_FAULT`` is ``;``-separated rules, each
``rank=R,<what>=<glob>,errno=<name>``:

* ``open=GLOB``: opening a file whose name matches fails (``OSError(errno)``, EIO by default): a node
  whose copy of the run folder cannot be read (a transient NFS error, a stale handle);
* ``replace=GLOB``: renaming a temporary file over a name that matches fails (ENOSPC by default): the
  last step of an atomic write on a full disk or an exceeded quota;
* ``hang=GLOB``: opening a matching file never returns (the process stays alive: an NFS server that
  stopped answering), from its ``after``-th match on (default 0);
* ``slow=GLOB``: opening a file whose whole path matches takes ``seconds`` longer (a busy shared file
  system): a phase that reads those files (an evaluation) lasts long enough to be interrupted.

``rank`` is ``*`` for every process.

``rank`` is the process's global rank (``RANK`` under torchrun, ``SLURM_PROCID`` under srun). Every
process that meets a fault appends one line to ``RSB_FAULT_LOG`` when it is set, so a test can tell
the fault happened.
"""
import builtins
import errno
import fnmatch
import io
import os
import time


def _rules():
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    for text in filter(None, os.environ.get("RSB_FAULT", "").split(";")):
        fields = dict(part.split("=", 1) for part in text.split(","))
        if fields.get("rank") in (rank, "*"):
            yield fields


def _fail(rule, kind, default, path):
    code = getattr(errno, rule.get("errno", default))
    log = os.environ.get("RSB_FAULT_LOG")
    if log:
        with _real_open(log, "a") as f:
            f.write(f"rank {rule['rank']}: {kind} {path}: {errno.errorcode[code]}\n")
    raise OSError(code, os.strerror(code), str(path))


_real_open, _real_replace = builtins.open, os.replace
_opens = [r for r in _rules() if "open" in r or "hang" in r or "slow" in r]
_replaces = [r for r in _rules() if "replace" in r]

if _opens:
    def _open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            name = os.path.basename(os.fsdecode(file))
            for rule in _opens:
                if "open" in rule and fnmatch.fnmatch(name, rule["open"]):
                    _fail(rule, "open", "EIO", file)
                if "slow" in rule and fnmatch.fnmatch(os.fsdecode(file), rule["slow"]):
                    time.sleep(float(rule.get("seconds", "0.05")))
                if "hang" in rule and fnmatch.fnmatch(name, rule["hang"]):
                    rule["seen"] = rule.get("seen", 0) + 1
                    if rule["seen"] > int(rule.get("after", 0)):
                        log = os.environ.get("RSB_FAULT_LOG")
                        if log:
                            with _real_open(log, "a") as f:
                                f.write(f"rank {rule['rank']}: hang at {file}\n")
                        while True:
                            time.sleep(60)
        return _real_open(file, *args, **kwargs)

    builtins.open = io.open = _open

if _replaces:
    def _replace(src, dst, *args, **kwargs):
        for rule in _replaces:
            if fnmatch.fnmatch(os.path.basename(os.fsdecode(dst)), rule["replace"]):
                _fail(rule, "replace", "ENOSPC", dst)
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
