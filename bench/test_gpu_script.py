"""bench/gpu.sh plumbing on a machine without a GPU: --help, a bad part name, and a part that fails
(tune needs a GPU) still leaves its log and makes the script exit 1 naming it; the carried wheels
install over an older copy and both jax-triton and absl-py must be there; BENCH_CONTINUE reaches
the bench parts as --bench-continue."""

import base64
import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu.sh")


def run(tmp_path, *parts, script=SCRIPT, **env):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "JAX_PLATFORMS": "cpu",
           "WHEELS": str(tmp_path / "no-wheels"), "SITE": str(tmp_path / "site"), **env}
    # no timeout: a wall clock that a busy machine can exceed is no test (each part fails at once)
    return subprocess.run(["bash", str(script), *parts], capture_output=True, text=True, env=env)


def test_unknown_part_is_exit_2(tmp_path):
    proc = run(tmp_path, "env", "bogus")
    assert proc.returncode == 2 and "unknown part 'bogus'" in proc.stderr


def test_help_prints_the_usage_and_runs_nothing(tmp_path):
    for flag in ("--help", "-h"):
        proc = run(tmp_path, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("The GPU checks and benchmarks of vitfuse"), proc.stdout[:200]
        assert "  env        nvidia-smi" in proc.stdout and "set -u" not in proc.stdout
        assert not (tmp_path / "out").exists()


def test_failing_part_is_logged_and_named(tmp_path):
    proc = run(tmp_path, "tune")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "tune.log").read_text()
    assert "tune_attention: no GPU" in log and "=== tune: exit 2" in log
    assert "FAILED:" in proc.stdout and "tune (exit 2)" in proc.stdout


def test_tune_ln_part_tunes_the_layernorm_and_fails_when_the_tune_does(tmp_path):
    for rc in ("0", "1"):
        _, logs, calls = run_fake_python(tmp_path, "tune-ln", FAKE_TUNE_LN_RC=rc)
        assert f"=== tune-ln: exit {rc}" in logs["tune-ln"], logs["tune-ln"]
        assert calls == ["-m bench.tune_layernorm --grid quick"]  # its tables end its log
        (tmp_path / "calls").unlink()


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


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python3: notes each call, answers the ones gpu.sh makes in its tests and gradcheck parts
echo "$*" >> "$FAKE_CALLS"
case "$*" in
  "-c import xdist") exit "${FAKE_XDIST_RC:-0}" ;;
  "-m oracle.kernel_gradcheck --dtype bfloat16") echo "bf16 gradcheck preallocate=$XLA_PYTHON_CLIENT_PREALLOCATE"
    exit "${FAKE_BF16_RC:-0}" ;;
  "-m oracle.kernel_gradcheck") sleep 1; echo "fp32 gradcheck preallocate=$XLA_PYTHON_CLIENT_PREALLOCATE"
    exit "${FAKE_FP32_RC:-0}" ;;
  "-m pytest "*) echo "preallocate=$XLA_PYTHON_CLIENT_PREALLOCATE platforms=$JAX_PLATFORMS unbuffered=${PYTHONUNBUFFERED:-}"
    [ -n "${FAKE_PYTEST_SLEEP:-}" ] && { echo "pytest sleeps"; sleep "$FAKE_PYTEST_SLEEP"; echo "pytest woke"; }
    # the bench's results files (only with a copy of the repository: see repo_copy); written a
    # little after the start, so that they are newer than gpu.sh's marker at any clock resolution
    [ -n "${FAKE_RESULTS:-}" ] && { sleep 0.1; touch "bench/results/$FAKE_RESULTS.json" "bench/results/$FAKE_RESULTS.md"; }
    exit "${FAKE_PYTEST_RC:-0}" ;;
  "-m bench.tune_attention "*) exit 0 ;;
  "-m bench.tune_layernorm "*) exit "${FAKE_TUNE_LN_RC:-0}" ;;
  "-m bench.step_memory"*) echo "step_memory $*"; exit "${FAKE_MEMORY_RC:-0}" ;;
esac
exit 1
"""


def run_fake_python(tmp_path, *parts, script=SCRIPT, **env):
    """gpu.sh with PYTHON a fake (FAKE_PYTHON); -> (exit status, {part: log}, python calls)."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    proc = run(tmp_path, *parts, script=script, PYTHON=str(fake), FAKE_CALLS=str(calls), **env)
    logs = {part: (tmp_path / "out" / f"{part}.log").read_text() for part in parts}
    return proc.returncode, logs, calls.read_text().splitlines()


def test_tests_part_spreads_over_workers_where_xdist_is_installed(tmp_path):
    """The tests part runs pytest -n TEST_WORKERS (default 8) when `import xdist` works, one
    process when it does not or TEST_WORKERS=1; GPU memory is allocated as needed either way."""
    for env, workers in (({}, "-n 8"), ({"TEST_WORKERS": "3"}, "-n 3"),
                         ({"TEST_WORKERS": "1"}, None), ({"FAKE_XDIST_RC": "1"}, None)):
        _, logs, calls = run_fake_python(tmp_path, "tests", **env)
        (pytest_call,) = [c for c in calls if c.startswith("-m pytest")]
        assert ("-n" in pytest_call.split()) == (workers is not None), (env, pytest_call)
        if workers:
            assert workers in pytest_call, (env, pytest_call)
        assert "tests/test_kernels_flash.py" in pytest_call and "tests/test_presets.py" in pytest_call
        assert "preallocate=false platforms=cuda,cpu unbuffered" in logs["tests"]
        assert "=== tests: exit 0" in logs["tests"]
        (tmp_path / "calls").unlink()


def test_tests_part_runs_every_test_file_that_runs_the_kernels():
    """A test file that takes its launcher or fused ops from tests/kernel_checks.py (compiled on a
    GPU, interpreted elsewhere) checks the kernels where they run for real only if the tests part
    names it: a new one left out would first run compiled on a user's GPU. Every file it names
    is there (pytest refuses a missing one and runs nothing)."""
    import re  # noqa: PLC0415

    text = SCRIPT.read_text()
    body = text[text.index("part_tests() {"):]
    listed = set(re.findall(r"tests/(test_\w+\.py)", body[:body.index("\n}")]))
    runs_kernels = set()
    for path in (SCRIPT.parents[1] / "tests").glob("test_*.py"):
        for names in re.findall(r"^from kernel_checks import (.+)$", path.read_text(), re.M):
            if set(re.findall(r"\w+", names.split("#")[0])) - {"assert_all_close", "noqa"}:
                runs_kernels.add(path.name)
    assert "test_kernels_flash_sums.py" in runs_kernels and "test_kernels_compiled_launcher.py" not in runs_kernels
    assert runs_kernels <= listed, f"bench/gpu.sh's tests part lacks {sorted(runs_kernels - listed)}"
    # a name left behind by a rename or removal: pytest stops at it and runs none on the GPU
    gone = sorted(name for name in listed if not (SCRIPT.parents[1] / "tests" / name).is_file())
    assert not gone, f"bench/gpu.sh's tests part names test files that are not there: {gone}"


def test_gradcheck_part_runs_float32_and_bf16_and_fails_if_either_does(tmp_path):
    """float32 and bf16 gradchecks run side by side; the log shows the float32 output, then the
    bf16 output (though the bf16 run ended first); either one failing fails the part."""
    for env, rc in (({}, 0), ({"FAKE_FP32_RC": "1"}, 1), ({"FAKE_BF16_RC": "1"}, 1)):
        _, logs, calls = run_fake_python(tmp_path, "gradcheck", **env)
        assert sorted(calls) == ["-m oracle.kernel_gradcheck", "-m oracle.kernel_gradcheck --dtype bfloat16"]
        log = logs["gradcheck"]
        assert log.index("fp32 gradcheck") < log.index("bf16 gradcheck"), log
        # two processes on one GPU: each allocates as it needs, neither takes JAX's default 75%
        assert "fp32 gradcheck preallocate=false" in log and "bf16 gradcheck preallocate=false" in log, log
        assert f"=== gradcheck: exit {rc}" in log, (env, log)
        (tmp_path / "calls").unlink()


def repo_copy(tmp_path) -> Path:
    """A folder laid out as the repository with gpu.sh in it (gpu.sh works in the repository its
    bench/ is in), for parts that read or write files there; -> its root."""
    root = tmp_path / "repo"
    (root / "bench" / "results").mkdir(parents=True)
    (root / "kernels").mkdir()
    shutil.copy(SCRIPT, root / "bench" / "gpu.sh")
    return root


def test_bench_part_copies_only_this_runs_results_and_fails_when_the_bench_does(tmp_path):
    """bench/results/ also holds committed results of other runs: only the files this run wrote
    go to $OUT (a lent machine returns a few files only); a bench whose checks fail fails the
    part, though its results files are still copied."""
    root = repo_copy(tmp_path)
    committed = root / "bench" / "results" / "cpu-2026-01-01.json"
    committed.write_text("{}")
    os.utime(committed, (0, 0))
    for rc in (0, 1):
        _, logs, _ = run_fake_python(tmp_path, "bench", script=root / "bench" / "gpu.sh",
                                     FAKE_RESULTS=f"gpu-run{rc}", FAKE_PYTEST_RC=str(rc))
        assert f"=== bench: exit {rc}" in logs["bench"], logs["bench"]
        copied = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".log")
        assert copied == [f"gpu-run{rc}.json", f"gpu-run{rc}.md"], (copied, logs["bench"])
        shutil.rmtree(tmp_path / "out")
        (tmp_path / "calls").unlink()


def test_bench_parts_continue_the_file_bench_continue_names(tmp_path):
    """With BENCH_CONTINUE set, bench, bench-ops and bench-step pass --bench-continue with it
    (without, none does); the continued file, committed on an earlier day, is read, not written:
    only this run's results go to $OUT, or the continued file itself when this run is of its day
    (the bench then rewrites it)."""
    root = repo_copy(tmp_path)
    continued = root / "bench" / "results" / "gpu-2026-01-01.json"
    continued.write_text("{}")
    os.utime(continued, (0, 0))
    parts = ("bench", "bench-ops", "bench-step")
    for env, results in (({}, "gpu-today"), ({"BENCH_CONTINUE": "bench/results/gpu-2026-01-01.json"}, "gpu-today"),
                         ({"BENCH_CONTINUE": "bench/results/gpu-2026-01-01.json"}, "gpu-2026-01-01")):
        _, logs, calls = run_fake_python(tmp_path, *parts, script=root / "bench" / "gpu.sh",
                                         FAKE_RESULTS=results, **env)
        pytest_calls = [c for c in calls if c.startswith("-m pytest")]
        assert len(pytest_calls) == 3, calls
        for part, call in zip(parts, pytest_calls):
            assert f"=== {part}: exit 0" in logs[part], logs[part]
            flag = f"--bench-continue {env['BENCH_CONTINUE']} " if env else ""
            assert call.startswith(f"-m pytest --benchmark -q {flag}"), (env, call)
            assert ("--bench-continue" in call) == bool(env), (env, call)
        copied = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".log")
        assert copied == [f"{results}.json", f"{results}.md"], (env, copied)
        shutil.rmtree(tmp_path / "out")
        (tmp_path / "calls").unlink()


def test_tune_part_merges_into_a_copy_of_the_committed_table(tmp_path):
    """The tune part's table starts as kernels/attention_table.json, so the one that comes back
    in $OUT keeps the rows of other GPUs when it is copied over the committed one."""
    root = repo_copy(tmp_path)
    table = '{"rows": [{"device": "another GPU"}]}\n'
    (root / "kernels" / "attention_table.json").write_text(table)
    _, logs, calls = run_fake_python(tmp_path, "tune", script=root / "bench" / "gpu.sh")
    out = tmp_path / "out"
    assert "=== tune: exit 0" in logs["tune"], logs["tune"]
    assert (out / "attention_table.json").read_text() == table
    assert calls == [f"-m bench.tune_attention --grid quick --table {out}/attention_table.json "
                     f"--out {out}/tune-attention.md"]


def test_total_timeout_ends_the_script_and_skips_the_parts_it_leaves_no_time(tmp_path):
    """TOTAL_TIMEOUT bounds the whole script: a command that would run past it is stopped
    (exit 124) and a later part is not started; both are named as failed. (A slower machine only
    reaches the same end sooner: the stand-in pytest sleeps far longer than the limit.)"""
    _, logs, calls = run_fake_python(tmp_path, "tests", "gradcheck", FAKE_PYTEST_SLEEP="60",
                                      TOTAL_TIMEOUT="3", TOTAL_RESERVE="0")
    assert "pytest woke" not in logs["tests"] and "=== tests: exit 124" in logs["tests"], logs["tests"]
    assert "not started, no time left of TOTAL_TIMEOUT=3s" in logs["gradcheck"], logs["gradcheck"]
    # what the stopped command printed is in the log: Python writes unbuffered under gpu.sh
    assert "pytest sleeps" in logs["tests"] and "unbuffered=1" in logs["tests"], logs["tests"]
    assert not any("kernel_gradcheck" in c for c in calls), calls
    # without it the same parts run to their end
    (tmp_path / "calls").unlink()
    _, logs, calls = run_fake_python(tmp_path, "tests", "gradcheck", FAKE_PYTEST_SLEEP="1")
    assert "pytest woke" in logs["tests"] and "=== tests: exit 0" in logs["tests"], logs["tests"]
    assert "=== gradcheck: exit 0" in logs["gradcheck"], logs["gradcheck"]


def test_total_timeout_cuts_part_timeout_to_what_is_left(tmp_path):
    """The limit of a command is the smaller of PART_TIMEOUT and what is left of TOTAL_TIMEOUT."""
    fake_timeout = tmp_path / "bin" / "timeout"
    fake_timeout.parent.mkdir()
    fake_timeout.write_text('#!/usr/bin/env bash\necho "timeout $*" >> "$FAKE_CALLS"\nshift 3\nexec "$@"\n')
    fake_timeout.chmod(0o755)
    path = f"{fake_timeout.parent}:{os.environ['PATH']}"
    for env, limit in (({"PART_TIMEOUT": "100"}, 100), ({"TOTAL_TIMEOUT": "500", "TOTAL_RESERVE": "20"}, None),
                       ({"PART_TIMEOUT": "100", "TOTAL_TIMEOUT": "1000"}, 100),
                       ({"PART_TIMEOUT": "100", "TOTAL_TIMEOUT": "70", "TOTAL_RESERVE": "20"}, None)):
        _, logs, calls = run_fake_python(tmp_path, "tests", PATH=path, **env)
        (line,) = [c for c in calls if c.startswith("timeout ")]
        assert "=== tests: exit 0" in logs["tests"] and line.split()[1:3] == ["-k", "10"], line
        got = int(line.split()[3])
        if limit is not None:
            assert got == limit, (env, line)
        else:  # what is left: TOTAL_TIMEOUT - TOTAL_RESERVE less the seconds already gone
            total = int(env["TOTAL_TIMEOUT"]) - int(env["TOTAL_RESERVE"])
            assert 0 < got <= total and got >= total - 30, (env, line)
        (tmp_path / "calls").unlink()


def fake_wheel(folder: Path, dist: str, module: str, version: str) -> Path:
    """A minimal pure-Python wheel whose module records its version."""
    name = f"{dist.replace('-', '_')}-{version}"
    files = {f"{module}/__init__.py": f'__version__ = "{version}"\n',
             f"{name}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
             f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}.dist-info/RECORD"] = "\n".join(record + [f"{name}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_install_replaces_an_older_copy(tmp_path):
    """A warm machine's /tmp/site holds the last call's packages: the next call's wheels replace
    them (module and metadata), and env.log says which versions are installed."""
    site = tmp_path / "site"
    for version in ("0.0.1", "0.0.2"):
        wheels = tmp_path / f"wheels-{version}"
        fake_wheel(wheels, "jax-triton", "jax_triton", version)
        fake_wheel(wheels, "absl-py", "absl", version)
        proc = run(tmp_path, "env", WHEELS=str(wheels))
        log = (tmp_path / "out" / "env.log").read_text()
        assert "install (" not in proc.stdout, proc.stdout + log
        assert f'__version__ = "{version}"' in (site / "jax_triton" / "__init__.py").read_text()
        assert f'__version__ = "{version}"' in (site / "absl" / "__init__.py").read_text()
        assert sorted(p.name for p in site.glob("*.dist-info")) == [
            f"absl_py-{version}.dist-info", f"jax_triton-{version}.dist-info"]
        assert f"installed: jax-triton {version} from {site}" in log, log
        assert f"installed: absl-py {version} from {site}" in log, log
        # the env part then imports jax_triton from there (here it fails later, on the backend)
        assert f"jax_triton from {site}" in log, log
        assert "timed code (kernels, vit, bench, train.py): " in log, log  # as the rows record it


def test_install_needs_absl_beside_jax_triton(tmp_path):
    wheels = tmp_path / "wheels"
    fake_wheel(wheels, "jax-triton", "jax_triton", "0.0.1")
    proc = run(tmp_path, "env", WHEELS=str(wheels))
    log = (tmp_path / "out" / "env.log").read_text()
    assert "no absl_py wheel in" in log and "pip download --no-deps jax-triton==0.3.1 absl-py" in log
    assert proc.returncode == 1 and "install (see env.log)" in proc.stdout
    assert not (tmp_path / "site" / "jax_triton").exists()


def test_memory_part_measures_the_product_and_vit_b16_and_fails_if_either_does(tmp_path):
    """The memory part asks bench.step_memory for the product ViT and for ViT-B/16 at the
    presets' batch in bf16, by accumulation steps; a failing call fails the part."""
    for env, rc in (({}, 0), ({"FAKE_MEMORY_RC": "1"}, 1)):
        _, logs, calls = run_fake_python(tmp_path, "memory", **env)  # exit 1 here: no wheels
        assert calls == ["-m bench.step_memory", "-m bench.step_memory configs/vit-b16.toml --batch 1024 "
                         "--accum 1 2 4 8 16 --compute-dtype bf16"], calls
        assert f"=== memory: exit {rc}" in logs["memory"], (env, logs)
        (tmp_path / "calls").unlink()
