"""One train.py at a time per run directory: RUN/.train.lock, flocked by the process that trains
the run (process 0 of a multi-process run) for as long as it does.

    hold(run_dir)       # Busy, naming the holder's pid, if another process trains there
    release(run_dir)    # the lock file is removed, then let go of
    release_all()       # at the end of train.py's main()

Without it, `--resume RUN` of a run still training started a second trainer there: both
trained to the end, writing last.npz, best.npz and metrics.jsonl over each other. The system
releases a flock when its holder dies, so a killed run leaves a lock file (holding its pid) that
nobody holds: the next run takes it. A run that ends removes it while still holding it; one that
then gets the flock on the removed file (it opened it just before) sees that and takes the file
at the path instead (vit/data/cache.py's build_lock does the same). A file system without flock
(Lustre mounted without -o flock), or a folder where the file cannot be made, gets no lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".train.lock"
_held: dict[Path, object] = {}  # run directory -> its open, flocked lock file


class Busy(Exception):
    """Another process trains in this run directory."""


def still_at(path: Path, lock) -> bool:
    """Whether the open file lock is still the file at path: a lock file's holder removes it
    before it lets go, so one that got the flock just then holds a removed file (here and in
    vit/data/cache.py's build_lock)."""
    try:
        return os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
    except FileNotFoundError:
        return False


def hold(run_dir: Path) -> None:
    """Take RUN/.train.lock (the folder exists); a no-op if this process holds it already."""
    key = Path(run_dir).resolve()
    if key in _held:
        return
    path = key / LOCK_NAME
    while True:
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
        if still_at(path, lock):
            break
        lock.close()  # locked a file its holder had removed: take the one at the path now
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held[key] = lock


def release(run_dir: Path) -> None:
    """Remove RUN/.train.lock, if this process holds it, and let go of it."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is None:
        return
    Path(lock.name).unlink(missing_ok=True)  # while still held: see above
    lock.close()  # releases the flock


def release_all() -> None:
    for run_dir in list(_held):
        release(run_dir)
