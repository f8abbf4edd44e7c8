import atexit
import os
import re
import shutil
import signal
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The in-process tests expect JAX's one CPU device; the multi-device tests make their own devices
# in subprocesses (tests/test_parallel.py sets XLA_FLAGS for them). So a caller's
# --xla_force_host_platform_device_count is dropped here, before JAX is imported, and every
# subprocess inherits the cleaned environment. (Other XLA flags pass through.)
FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")
DROPPED_XLA_FLAGS = FORCED_DEVICES.findall(os.environ.get("XLA_FLAGS", ""))
if DROPPED_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = " ".join(FORCED_DEVICES.sub("", os.environ["XLA_FLAGS"]).split())

# One persistent XLA compilation cache for the whole test session, shared with every subprocess
# (workers, python train.py): the many runs that compile the same train step compile it once.
# (The tests' time goes mostly into compiling: the resume tests take a third of the time with it.)
# A fresh folder each session, removed at the end, so no run depends on what an earlier one left.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="vitfuse-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# A shell starts a background job (`pytest ... &`, a CI step run that way) with SIGINT ignored,
# and every process started from it inherits that. The suite stops on SIGINT however it was
# started, and its subprocesses (train.py, an inner pytest) get SIGINT as from a terminal: Python's
# own handler replaces an inherited "ignore", and a child starts with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    """VITFUSE_REQUIRE_GPU=1 (bench/gpu.sh): stop at once unless the kernels will be compiled."""
    from kernel_checks import INTERPRET  # noqa: PLC0415
    if INTERPRET and os.environ.get("VITFUSE_REQUIRE_GPU") == "1":
        import jax  # noqa: PLC0415
        pytest.exit(f"VITFUSE_REQUIRE_GPU=1 but JAX's default backend is {jax.default_backend()!r} "
                    f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}): the kernel tests would run "
                    "in Triton's interpreter instead of compiled on the GPU", returncode=1)


def pytest_report_header(config):
    from kernel_checks import KERNEL_MODE  # noqa: PLC0415  (after JAX_PLATFORMS is set)
    import jax  # noqa: PLC0415
    from oracle.compare import CHECK_MATMUL_PRECISION  # noqa: PLC0415
    lines = [f"vitfuse: jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
             f"fused kernels {KERNEL_MODE}; XLA's float32 dots {CHECK_MATMUL_PRECISION!r} in every test"]
    if DROPPED_XLA_FLAGS:
        lines.append(f"vitfuse: ignoring the caller's XLA_FLAGS {' '.join(DROPPED_XLA_FLAGS)} "
                     "(the tests make their own devices)")
    return lines


@pytest.fixture(scope="session", autouse=True)
def exact_float32_dots():
    """Every test runs with XLA's float32 dots at full precision (oracle.compare.exact_float32_dots):
    on a GPU, JAX's default (TF32) would make a float32 reference wrong by ~1e-3, against the 1e-5
    its ieee kernels are held to. The same on the CPU, where float32 dots are exact anyway."""
    from oracle.compare import exact_float32_dots as exact  # noqa: PLC0415
    with exact():
        yield


@pytest.fixture(autouse=True)
def no_float64_leak():
    """float64 is switched on only inside a `with jax.enable_x64(True)` scope (the gradient
    checks); a test that leaves it on globally would silently change every later test."""
    yield
    import jax
    assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 switched on"
