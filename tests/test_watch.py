"""tests/watch.py: a subprocess is waited for while it makes progress, however long that takes,
and only a silent, idle one counts as a hang. (The idle limit is shrunk to 1.5 or 2 s here; the
processes below run for longer than that, so a wall-clock limit of that length would fail them.)
"""

import sys

import pytest

from watch import Watched, run_watched, wait_for

PY = sys.executable


def test_slow_process_that_prints_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr("watch.IDLE_LIMIT_S", 1.5)
    proc = run_watched([PY, "-c", "import time\nfor i in range(8):\n print(i, flush=True)\n"
                        " time.sleep(0.5)"], log=tmp_path / "log")
    assert proc.returncode == 0 and proc.text().split() == [str(i) for i in range(8)]


def test_silent_process_that_computes_is_waited_for(tmp_path, monkeypatch):
    # 0.05 CPU seconds within any 1.5 s: met even with a small share of a loaded core
    monkeypatch.setattr("watch.CPU_PROGRESS_S", 0.05)
    proc = Watched([PY, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 4: pass"], log=tmp_path / "log")
    try:
        wait_for([proc], idle_limit_s=1.5)
    finally:
        proc.kill()
    assert proc.returncode == 0


def test_silent_idle_process_is_a_hang(tmp_path):
    proc = Watched([PY, "-c", "import time; print('started', flush=True); time.sleep(600)"],
                   log=tmp_path / "log")
    with pytest.raises(pytest.fail.Exception, match="no output and no CPU use for 2 s"):
        wait_for([proc], idle_limit_s=2)
    assert proc.returncode is not None  # killed, not left behind


def test_until_returns_while_the_process_runs(tmp_path):
    proc = Watched([PY, "-c", "import time; print('ready', flush=True); time.sleep(600)"],
                   log=tmp_path / "log")
    try:
        wait_for([proc], until=lambda: "ready" in proc.text())
        assert proc.returncode is None
    finally:
        proc.kill()
