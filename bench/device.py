"""The device a benchmark runs on: its name, the versions of the stack and of our code, and its
measured peaks (a large matmul's TFLOP/s, a large copy's GB/s) that rows are put against ("% of
peak")."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.timer import time_calls, timer_settings


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


ROOT = Path(__file__).resolve().parents[1]
# what a row's figures depend on: the kernels and their table, the model, the step, the harness
TIMED_CODE = ("kernels", "vit", "bench", "train.py")
TIMED_SUFFIXES = (".py", ".json")  # in TIMED_CODE's folders: code and the kernels' tables
RESULTS = "bench/results"  # under TIMED_CODE, but what the benchmarks write, not what they time


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 (first 12 hex digits) of the timed code: every .py and .json file under TIMED_CODE
    (RESULTS and __pycache__ left out), by path relative to root, then content. The lent
    GPU gets a copy of the working tree without .git, so this is what ties a results row to the
    code it timed: `python -m bench.device` prints it for a checkout, to compare."""
    h = hashlib.sha256()
    for top in TIMED_CODE:
        path = root / top
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.suffix in TIMED_SUFFIXES and f.is_file()
            and "__pycache__" not in f.parts and not f.relative_to(root).as_posix().startswith(RESULTS + "/"))
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def timed_pathspecs() -> list[str]:
    """git pathspecs of what code_fingerprint hashes: the TIMED_SUFFIXES files in TIMED_CODE's
    folders, and its single files (train.py)."""
    specs = []
    for top in TIMED_CODE:
        if top.endswith(TIMED_SUFFIXES):
            specs.append(top)
        else:
            specs += [f":(glob){top}/**/*{suffix}" for suffix in TIMED_SUFFIXES]
    return specs


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD's commit (12 hex digits), '+changes' when the timed code differs from it (the same
    files code_fingerprint hashes: a changed bench/gpu.sh or README is not a change of what was
    timed); None without git or a checkout (the lent GPU's copy)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()
    if not (root / ".git").exists():  # not a checkout of its own (a copy inside another repo is not)
        return None
    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=all", "--", *timed_pathspecs(),
                      f":(exclude){RESULTS}")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if changed else "")


def code_version(root: Path = ROOT) -> str:
    """'<fingerprint>' or '<fingerprint> (git <commit>[+changes])': what a results row records."""
    commit = git_commit(root)
    return code_fingerprint(root) + (f" (git {commit})" if commit else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """backend, the device's name, a file-name slug ('cpu', 'nvidia-h100-80gb-hbm3') and versions."""
    backend = jax.default_backend()
    dev = jax.devices()[0]
    if backend == "cpu":
        name = f"cpu ({os.cpu_count()} cores, {_cpu_model()})"
        slug = "cpu"
    else:
        name = dev.device_kind
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or backend
    return {
        "backend": backend,
        "device": name,
        "device_slug": slug,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "triton": version("triton"),
        "jax_triton": version("jax-triton"),
        "code": code_version(),
    }


def measure_peaks(backend: str) -> dict:
    """A large matmul's TFLOP/s (fp32 at "highest"; on a GPU also tf32 and bf16) and a large
    elementwise copy's GB/s (y = x + 1: read + write), once per session."""
    settings = timer_settings(backend)
    gpu = backend != "cpu"
    peaks = {}
    key = jax.random.PRNGKey(0)
    cases = [("fp32", 4096 if gpu else 2048, jnp.float32, "highest")]
    if gpu:
        cases += [("tf32", 8192, jnp.float32, "tensorfloat32"), ("bf16", 8192, jnp.bfloat16, "default")]
    for name, n, dtype, precision in cases:
        sets = [tuple(jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in jax.random.split(kk))
                for kk in jax.random.split(key, 2)]
        with jax.default_matmul_precision(precision):
            f = jax.jit(lambda a, b: a @ b).lower(*sets[0]).compile()
        t = time_calls(lambda i: f(*sets[i % 2]), settings)
        peaks[f"matmul_{name}_tflop_s"] = 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12
        peaks[f"matmul_{name}_n"] = n
    # in place (donated), so no call pays for a fresh output buffer (on a CPU, a new 64 MiB
    # buffer's page faults cost more than the copy itself)
    n = (1 << 26) if gpu else (1 << 24)
    x = [jax.random.normal(key, (n,), jnp.float32)]
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(x[0]).compile()

    def copy(i):
        x[0] = f(x[0])
        return x[0]
    t = time_calls(copy, settings, chained=True)
    peaks["copy_gb_s"] = 2.0 * n * 4 / (t.median_ms * 1e-3) / 1e9
    peaks["copy_mib"] = n * 4 >> 20
    return peaks


def peak_for(row: dict, peaks: dict) -> float | None:
    if row.get("tflop_s") is not None:
        which = "tf32" if row["contender"].endswith("tf32") else row["dtype"]
        p = peaks.get(f"matmul_{which}_tflop_s")
        return row["tflop_s"] / p if p else None
    if row.get("gb_s") is not None and peaks.get("copy_gb_s"):
        return row["gb_s"] / peaks["copy_gb_s"]
    return None


if __name__ == "__main__":  # python -m bench.device: the fingerprint every results row records
    import argparse

    argparse.ArgumentParser(prog="python -m bench.device",
                            description="Print the fingerprint of the timed code (the files a "
                                        "results row's figures depend on), as every row of "
                                        "bench/results records it.").parse_args()
    print(f"timed code ({', '.join(TIMED_CODE)}): {code_version()}")
