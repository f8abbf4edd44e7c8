"""Waiting for subprocesses in tests without a wall-clock limit that a busy machine can exceed.

A test that starts a subprocess (a worker, python train.py, an inner pytest) waits for it as long
as it makes progress: it writes output, or it uses CPU time (its own: a process it starts counts
only if the test watches that one too, as the multi-process tests watch each of theirs). Only
a subprocess that does neither for IDLE_LIMIT_S seconds is taken to hang, killed, and reported
with its output. Load slows a process down; it does not stop it from doing either, so load alone
cannot fail a test here (a hang in a collective, a deadlock or a wait for a peer that died does).

    proc = Watched([sys.executable, "train.py", ...], log=tmp_path / "train.log", env=env, cwd=ROOT)
    wait_for([proc])                                   # all exited (or a hang: pytest.fail)
    wait_for([proc], until=lambda: "epoch 1:" in proc.text())   # or until a condition holds
    assert proc.returncode == 0, proc.tail()
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

IDLE_LIMIT_S = 600.0   # no output and under CPU_PROGRESS_S of CPU time for this long: a hang
CPU_PROGRESS_S = 1.0   # CPU seconds (all watched processes together) that count as progress
POLL_S = 0.2


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (None where there is no /proc or it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watched:
    """A subprocess whose stdout and stderr go to a log file (read back with text())."""

    def __init__(self, cmd, *, log, **popen_kwargs):
        self.cmd = [str(c) for c in cmd]
        self.log_path = Path(log)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     **popen_kwargs)
        self.pid = self.proc.pid

    @property
    def returncode(self):
        return self.proc.poll()

    def text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        text = self.text()
        head = f"--- {' '.join(self.cmd)} (rc {self.returncode}) ---\n"
        return head + (text if len(text) <= n else "..." + text[-n:])

    def send_signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:  # the whole session where it has its own (start_new_session=True)
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()


def wait_for(procs: list[Watched], until=None, *, idle_limit_s: float | None = None) -> None:
    """Return once every process has exited, or as soon as until() is true. Fail the test (after
    killing them all) if none of them writes output or uses CPU time for idle_limit_s seconds
    (default IDLE_LIMIT_S)."""
    if idle_limit_s is None:
        idle_limit_s = IDLE_LIMIT_S
    def progress_marks():
        sizes = tuple(p.log_path.stat().st_size for p in procs)
        cpu = sum(c for p in procs if (c := cpu_seconds(p.pid)) is not None)
        return sizes, cpu

    sizes, cpu = progress_marks()
    last_progress = time.monotonic()
    while True:
        if until is not None and until():
            return
        if all(p.returncode is not None for p in procs):
            if until is None:
                return
            for p in procs:
                p.kill()
            pytest.fail("the subprocesses exited before the awaited condition held\n"
                        + "\n".join(p.tail() for p in procs))
        time.sleep(POLL_S)
        new_sizes, new_cpu = progress_marks()
        if new_sizes != sizes or new_cpu >= cpu + CPU_PROGRESS_S:
            sizes, cpu, last_progress = new_sizes, new_cpu, time.monotonic()
        elif time.monotonic() - last_progress > idle_limit_s:
            for p in procs:
                p.kill()
            pytest.fail(f"no output and no CPU use for {idle_limit_s:.0f} s: a hang; killed\n"
                        + "\n".join(p.tail() for p in procs))


def interrupt_when(proc: Watched, seen: str) -> str:
    """Send proc a SIGINT (a Ctrl-C) once `seen` is in its output, wait for it to exit (killed
    if the test fails first); -> its output."""
    try:
        wait_for([proc], until=lambda: seen in proc.text())
        proc.send_signal(signal.SIGINT)
        wait_for([proc])
    finally:
        proc.kill()
    return proc.text()


def run_watched(cmd, *, log, **popen_kwargs) -> Watched:
    """Start cmd, wait for it to exit (failing the test if it hangs), return it."""
    proc = Watched(cmd, log=log, **popen_kwargs)
    try:
        wait_for([proc])
    finally:
        proc.kill()  # a no-op when it has exited; closes the log
    return proc
