"""The device a benchmark runs on: its name, the versions of the stack, and its measured peaks (a
large matmul's TFLOP/s, a large copy's GB/s) that rows are put against ("% of peak")."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.timer import time_calls, timer_settings


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
