import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True)
def no_float64_leak():
    """float64 is switched on only inside a `with jax.enable_x64(True)` scope (the gradient
    checks); a test that leaves it on globally would silently change every later test."""
    yield
    import jax
    assert not jax.config.jax_enable_x64, "this test left jax_enable_x64 switched on"
