"""The test run itself: a signal sent to it stops it, and it does not depend on the caller's
XLA_FLAGS. Each case runs pytest in a subprocess."""

import os
import signal
import sys
from pathlib import Path

import pytest

from watch import Watched, run_watched, wait_for

ROOT = Path(__file__).resolve().parents[1]
INNER = ROOT / "tests" / "signal_scripts" / "inner_suite.py"


def pytest_env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, -signal.SIGTERM),
                                               (signal.SIGINT, pytest.ExitCode.INTERRUPTED)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_test_run_stops_it(tmp_path, signum, exit_code):
    """SIGTERM (a CI runner or `kill`) or SIGINT (Ctrl-C) sent to a pytest session's process group
    while a test runs train.py in-process: train.py saves its checkpoint, then passes the signal
    on, so the session stops there (no later test runs), as it would without train.py."""
    proc = Watched([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", INNER],
                   log=tmp_path / "inner.log", env=pytest_env(VITFUSE_INNER_OUT=str(tmp_path)),
                   cwd=ROOT, start_new_session=True)
    try:
        wait_for([proc], until=lambda: "epoch 1:" in proc.text())
        os.killpg(proc.pid, signum)
        wait_for([proc])
    finally:
        proc.kill()
    assert proc.returncode == exit_code, proc.tail()
    assert not (tmp_path / "second-test-ran").exists(), proc.tail()
    assert (tmp_path / "run" / "last.npz").exists(), proc.tail()  # nothing lost on the way out
    assert "interrupted: saved" in proc.text()


def test_suite_does_not_depend_on_the_callers_xla_flags(tmp_path):
    """The in-process tests expect one CPU device; the multi-device ones set XLA_FLAGS for their
    own subprocesses. A caller's XLA_FLAGS forcing several host devices changes neither."""
    flags = "--xla_force_host_platform_device_count=4"
    proc = run_watched([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_parallel.py::test_single_process_helpers"],
                       log=tmp_path / "inner.log", env=pytest_env(XLA_FLAGS=flags), cwd=ROOT)
    assert proc.returncode == 0, proc.tail()
