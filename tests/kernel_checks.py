"""Shared by the kernel tests: which launcher they use, the fused ops, the assertion on
gradcheck rows, and the LSE check both attention kernels must pass.

Where JAX's default backend is a GPU (``bench/gpu.sh`` runs the kernel tests with
``JAX_PLATFORMS=cuda,cpu``) the tests compile the kernels through jax-triton; everywhere else (CI,
``tests/conftest.py`` defaults ``JAX_PLATFORMS`` to cpu) the same kernel source runs in Triton's
interpreter. The pytest header says which (tests/conftest.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import COMPILED, INTERPRETED, flash_attention, fused_ops
from kernels.launch import poisoned_outputs
from vit import layers
from vit.ops import FUNCTIONS

# False: compiled through jax-triton on the GPU; True: Triton's interpreter on the CPU
INTERPRET = jax.default_backend() != "gpu"
LAUNCHER = INTERPRETED if INTERPRET else COMPILED  # the kernels' launcher here
KERNEL_MODE = "Triton's interpreter (CPU)" if INTERPRET else "compiled through jax-triton (GPU)"


def fused_flags() -> list[str]:
    """train.py flags for a fused run here: --fused, plus --interpret where there is no GPU."""
    return ["--fused", "--interpret"] if INTERPRET else ["--fused"]


def _poisoning(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with poisoned_outputs():
            return fn(*args, **kwargs)
    return wrapped


def poisoned_fused_ops(attention_kernel="auto"):
    """fused_ops here (interpreted on the CPU, compiled on a GPU: the same kernel source) with
    every kernel output starting as NaN either way, so an unwritten element fails the checks.
    attention_kernel: "auto" (the dispatcher), "one-tile" or "key-blocked"."""
    ops = fused_ops(LAUNCHER, attention_kernel=attention_kernel)
    return ops._replace(**{name: _poisoning(getattr(ops, name)) for name in FUNCTIONS})


class BlockedOps:
    """The key-blocked kernel with explicit blocks (flash_attention.Blocks), outputs NaN-poisoned
    (tests of block edges and of sums across blocks)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def attention_forward(self, qkv, heads, keep_scale=None):
        with poisoned_outputs():
            return flash_attention.attention_forward(qkv, heads, keep_scale, launcher=LAUNCHER,
                                                     blocks=self.blocks)

    def attention_backward(self, cache, do):
        with poisoned_outputs():
            return flash_attention.attention_backward(cache, do, launcher=LAUNCHER, blocks=self.blocks)


@pytest.fixture(scope="module")
def ops():
    """The fused ops as the model gets them (the dispatcher picks the attention kernel), with
    NaN-poisoned outputs (poisoned_fused_ops)."""
    return poisoned_fused_ops()


def assert_all_close(rows, tol):
    """rows from oracle.compare.compare: no non-finite value, relative error within tol."""
    for name, shape, max_abs, rel, nonfinite, _ in rows:
        assert nonfinite == 0, f"{name}{shape}: {nonfinite} non-finite values (unwritten or overflow)"
        assert rel <= tol, f"{name}{shape}: rel error {rel:.2e} (max abs {max_abs:.2e}) > {tol:g}"


def assert_lse_is_logsumexp_of_scores(attention_forward, b, l, heads, dh, scale, atol):
    """The cache's LSE (B, H, L) is float32 logsumexp over the keys of S = Q K^T / sqrt(Dh), for
    qkv drawn from N(0, scale^2)."""
    qkv = scale * jax.random.normal(jax.random.PRNGKey(1), (b, l, 3 * heads * dh))
    _, (_, _, lse, _) = attention_forward(qkv, heads)
    q, k, _ = layers.split_heads(qkv, heads)
    s = jnp.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dh)
    assert lse.dtype == jnp.float32 and lse.shape == (b, heads, l)
    np.testing.assert_allclose(lse, jax.scipy.special.logsumexp(s, axis=-1), rtol=1e-6, atol=atol)
