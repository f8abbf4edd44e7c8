"""One train.py at a time per run directory: RUN/.train.lock, flocked by the process that trains
the run (process 0 of a multi-process run) for as long as it does.

    hold(run_dir)       # Busy, naming the holder's pid, if another process trains there
    release(run_dir, remove=True)   # before its folder is removed (no checkpoint was written)
    release_all()       # at the end of train.py's main()

Without it, `--resume RUN` of a run still training started a second trainer there: both
trained to the end, writing last.npz, best.npz and metrics.jsonl over each other. The system
releases a flock when its holder dies, so a killed run leaves no stale lock; the file stays
(empty but for the pid) unless the run's folder is removed. A file system without flock (Lustre
mounted without -o flock) gets no lock, as before.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".train.lock"
_held: dict[Path, object] = {}  # run directory -> its open, flocked lock file


class Busy(Exception):
    """Another process trains in this run directory."""


def hold(run_dir: Path) -> None:
    """Take RUN/.train.lock (the folder exists); a no-op if this process holds it already."""
    key = Path(run_dir).resolve()
    if key in _held:
        return
    path = key / LOCK_NAME
    try:
        lock = open(path, "a+")  # noqa: SIM115 (kept open while held)
    except OSError:  # not writable: the run's own checks say so where it matters
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise Busy(f"{run_dir}: another train.py (pid {pid}) is training this run now; wait "
                   "for it to end, or stop it (Ctrl-C saves last.npz) and --resume it then") from None
    except OSError:  # no flock on this file system: go on unlocked
        lock.close()
        return
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held[key] = lock


def release(run_dir: Path, remove: bool = False) -> None:
    """Let go of RUN/.train.lock if held; remove: delete it first (its folder is going)."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is None:
        return
    if remove:
        Path(lock.name).unlink(missing_ok=True)
    lock.close()  # releases the flock


def release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)
