"""bench/gpu.sh plumbing on a machine without a GPU: a bad part name, and a part that fails
(tune needs a GPU) still leaves its log and makes the script exit 1 naming it."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu.sh")


def run(tmp_path, *parts):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "JAX_PLATFORMS": "cpu"}
    # no timeout: a wall clock that a busy machine can exceed is no test (each part fails at once)
    return subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True, env=env)


def test_unknown_part_is_exit_2(tmp_path):
    proc = run(tmp_path, "env", "bogus")
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr


def test_failing_part_is_logged_and_named(tmp_path):
    proc = run(tmp_path, "tune")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "tune.log").read_text()
    assert "tune_attention: no GPU" in log and "=== tune: exit 2" in log
    assert "FAILED:" in proc.stdout and "tune (exit 2)" in proc.stdout


def test_split_bench_parts_are_dispatched(tmp_path):
    """bench-ops / bench-step exist as parts (run here with PYTHON=false: each fails at once and
    says no results file was written)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": "false"}
    proc = subprocess.run(["bash", str(SCRIPT), "bench-ops", "bench-step"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1
    for part in ("bench-ops", "bench-step"):
        log = (tmp_path / "out" / f"{part}.log").read_text()
        assert "no results file was written" in log and f"=== {part}: exit 1" in log
