"""Every layer's hand-written backward against autodiff in float32, the precision the model
trains in: fast, and tight enough (1e-5 of each gradient tensor's largest magnitude) to catch a
backward written for a slightly different forward, such as the erf GELU's derivative under the
tanh GELU (they differ by up to 9e-4), which the model-level float32 tests let through. The
float64 proof of the same layers, against finite differences too, is tests/test_gradients.py."""

import warnings

import jax
import jax.numpy as jnp
import pytest

from oracle import autodiff_vjp
from oracle import gradient_cases as gradcheck
from vit import layers

RTOL = 1e-5

with warnings.catch_warnings():  # the cases ask for float64; without x64 they are float32
    warnings.simplefilter("ignore")
    CASES = gradcheck.layer_cases(seed=11)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_backward_matches_autodiff_in_float32(case):
    inputs = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), case.inputs)
    y, cache = case.forward(inputs)
    dy = jax.random.normal(jax.random.PRNGKey(3), y.shape, jnp.float32)
    ours = case.backward(inputs, cache, dy)
    want = autodiff_vjp(lambda i: case.forward(i)[0], inputs, dy)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0],
                            jax.tree_util.tree_leaves(want)):
        assert a.dtype == jnp.float32, jax.tree_util.keystr(path)
        scale = float(jnp.max(jnp.abs(b)))
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= RTOL * scale, (case.name, jax.tree_util.keystr(path), err, scale)


@pytest.mark.parametrize("approximate", ["tanh", "erf"])
def test_gelu_backward_over_its_whole_range(approximate):
    """GELU's derivative on a dense grid over [-8, 8], where its two forms differ most."""
    x = jnp.linspace(-8.0, 8.0, 40001, dtype=jnp.float32)
    _, cache = layers.gelu_forward(x, approximate)
    ours = layers.gelu_backward(cache, jnp.ones_like(x), approximate)
    want = autodiff_vjp(lambda v: layers.gelu_forward(v, approximate)[0], x, jnp.ones_like(x))
    assert float(jnp.max(jnp.abs(ours - want))) <= 1e-5  # the derivative is O(1) here
