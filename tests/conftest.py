import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
    return [f"vitfuse: jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
            f"fused kernels {KERNEL_MODE}"]


@pytest.fixture(autouse=True)
def no_float64_leak():
    """float64 is switched on only inside a `with jax.enable_x64(True)` scope (the gradient
    checks); a test that leaves it on globally would silently change every later test."""
    yield
    import jax
    assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 switched on"
