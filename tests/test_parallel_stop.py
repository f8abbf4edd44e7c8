"""A run of two processes stopped by a signal to one of them: both stop at the same step and
process 0 saves last.npz. (One process stopped alone left the other waiting in the next step's
gradient all-reduce: seen, process 1 died in gloo with exit -6 and process 0 hung; the processes
now agree on a stop every vit.training.STOP_CHECK_STEPS steps.)"""

import os
import signal
import socket
import sys
from pathlib import Path

from vit import checkpoint, training
from watch import Watched, wait_for

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return out


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    port, run = free_port(), tmp_path / "run"
    procs = [Watched([sys.executable, "train.py", "--dataset", "digits", "--epochs", "40",
                      "--batch-size", "64", "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", pid, "--out", run],
                     log=tmp_path / f"p{pid}.log", env=env(), cwd=ROOT) for pid in range(2)]
    try:  # waited for as long as they make progress (tests/watch.py), not against a clock
        wait_for(procs, until=lambda: "\nepoch 1:" in procs[0].text())
        procs[1].send_signal(signal.SIGINT)  # process 1 only
        wait_for(procs)
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], "\n".join(p.tail() for p in procs)
    zero, one = procs[0].text(), procs[1].text()
    assert "interrupted (another process was stopped): saved" in zero, zero[-2000:]
    assert "process 0 saves last.npz" in one and "saved" not in one.split("Ctrl-C")[-1], one[-2000:]
    meta = checkpoint.load(run / "last.npz")[1]
    assert 1 <= meta["epoch"] < 40, meta
    assert meta["step_in_epoch"] % training.STOP_CHECK_STEPS == 0, meta  # where they agreed
