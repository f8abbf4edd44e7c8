"""Fused attention as the model gets it (kernels.fused_ops: the dispatcher of kernels/dispatch.py
picks the one-tile kernel of kernels/attention.py for L <= 128 with Dh <= 32 and the
key-blocked kernel of kernels/flash_attention.py otherwise) vs vit.layers.attention_forward /
attention_backward, in Triton's interpreter on the CPU or compiled on a GPU
(tests/kernel_checks.py): O and dQ, dK, dV (the thirds of the packed dQKV) on awkward shapes, with and without the dropout scale, bf16/fp16, the saved
log-sum-exp, errors, use under jax.jit. tests/test_kernels_flash.py checks each kernel on its own.

Error metric (oracle.compare.compare): rel = max|fused - ref| / max|ref| per tensor, plus a
count of non-finite fused values (outputs start as NaN in the interpreter, so an element the
kernel never writes is non-finite). Tolerances: float32 with ieee dots 1e-5 (observed <= ~1e-6:
summation order only; the backward forms delta = rowsum(dO * O) where the reference sums dP * P);
bf16/fp16 2e-2 against the float32 reference on the same rounded inputs (observed <= ~6e-3:
O, P and dS rounded to the input dtype, as in the reference's half-precision path).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import COMPILED, INTERPRETED, attention, dispatch
from oracle.compare import TOLERANCE, compare
from oracle.kernel_gradcheck import as_float32, attention_inputs, run_attention
from vit.ops import REFERENCE

from kernel_checks import assert_all_close, assert_lse_is_logsumexp_of_scores, ops  # noqa: F401  (ops is a fixture)

F32_TOL = TOLERANCE["float32"]
HALF_TOL = TOLERANCE["bfloat16"]




@pytest.mark.parametrize(
    "b, l, heads, dh",
    [
        (1, 1, 2, 16),  # one token: 15 padded query rows and keys, batch 1
        (2, 17, 4, 16),  # L one above a power of two
        (3, 17, 2, 32),  # odd batch
        (1, 16, 2, 32),  # L exactly a tile (16), nothing masked
        (1, 64, 2, 16),  # L exactly a power of two above the 32/64-row query step
        (2, 65, 8, 32),  # the product's L, heads and head dim
        (1, 65, 2, 64),  # Dh 64
        (2, 33, 1, 128),  # Dh 128, one head
        (1, 197, 2, 64),  # ViT-B/16 at 224px: the key-blocked kernel
    ],
)
@pytest.mark.parametrize("keep", [False, True], ids=["no-dropout", "keep_scale"])
def test_matches_reference_float32(ops, b, l, heads, dh, keep):
    inp = attention_inputs(jax.random.PRNGKey(l * 131 + dh), b, l, heads, dh, keep, jnp.float32)
    rows = compare(run_attention(ops, inp), run_attention(REFERENCE, inp), F32_TOL)
    assert [r[0] for r in rows] == ["o", "dq", "dk", "dv"]
    assert_all_close(rows, F32_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("b, l, heads, dh, keep", [(2, 17, 2, 32, True), (1, 65, 4, 16, False)])
def test_half_precision_vs_float32_reference(ops, dtype, b, l, heads, dh, keep):
    inp = attention_inputs(jax.random.PRNGKey(7), b, l, heads, dh, keep, dtype)
    fused = run_attention(ops, inp)
    assert all(v.dtype == dtype for v in fused.values())
    assert_all_close(compare(fused, run_attention(REFERENCE, as_float32(inp)), HALF_TOL), HALF_TOL)


def test_lse_is_float32_logsumexp_of_scores(ops):
    assert_lse_is_logsumexp_of_scores(ops.attention_forward, 2, 17, 2, 16, scale=1.0, atol=1e-6)


def test_dropout_mask_is_applied(ops):
    """A keep_scale of all zeros must give O = 0 and dQ = dK = dV = 0 (and nothing unwritten)."""
    inp = attention_inputs(jax.random.PRNGKey(4), 1, 17, 2, 16, True, jnp.float32)
    inp["keep_scale"] = jnp.zeros_like(inp["keep_scale"])
    out = run_attention(ops, inp)
    for name, v in out.items():
        assert np.all(np.asarray(v) == 0.0), name


def test_cache_crosses_jit_boundaries(ops):
    """Forward and backward as separate jitted functions: the cache is a pytree of arrays."""
    inp = attention_inputs(jax.random.PRNGKey(9), 2, 17, 4, 16, True, jnp.float32)
    fwd = jax.jit(lambda qkv, ks: ops.attention_forward(qkv, 4, ks))
    bwd = jax.jit(ops.attention_backward)
    o, cache = fwd(inp["qkv"], inp["keep_scale"])
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(cache))
    dqkv = bwd(cache, inp["do"])
    o_ref, cache_ref = REFERENCE.attention_forward(inp["qkv"], 4, inp["keep_scale"])
    dqkv_ref = REFERENCE.attention_backward(cache_ref, inp["do"])
    assert_all_close(compare({"o": o, "dqkv": dqkv}, {"o": o_ref, "dqkv": dqkv_ref}, F32_TOL), F32_TOL)


def test_shape_errors(ops):
    qkv = jnp.ones((2, 5, 3 * 64))
    with pytest.raises(ValueError, match="heads must be a static positive int, got 0"):
        ops.attention_forward(qkv, 0)
    with pytest.raises(ValueError, match="heads must be a static positive int, got 2.0"):
        ops.attention_forward(qkv, 2.0)  # not an int (a traced value fails the same way)
    with pytest.raises(ValueError, match="qkv must be non-empty"):
        ops.attention_forward(jnp.ones((0, 5, 3 * 64)), 2)
    with pytest.raises(ValueError, match=r"qkv must be \(B, L, 3D\)"):
        ops.attention_forward(qkv[0], 2)
    with pytest.raises(ValueError, match="last axis must be 3 \\* heads \\* Dh"):
        ops.attention_forward(jnp.ones((2, 5, 100)), 2)
    with pytest.raises(ValueError, match="head dim Dh .* = 24"):
        ops.attention_forward(jnp.ones((2, 5, 3 * 48)), 2)
    with pytest.raises(ValueError, match="head dim Dh .* = 8"):
        ops.attention_forward(jnp.ones((2, 5, 3 * 16)), 2)
    with pytest.raises(ValueError, match="head dim Dh .* = 256"):
        ops.attention_forward(jnp.ones((2, 5, 3 * 256)), 1)
    with pytest.raises(ValueError, match=r"keep_scale must have shape \(B, H, L, L\) = \(2, 2, 5, 5\)"):
        ops.attention_forward(qkv, 2, jnp.ones((2, 2, 5, 4)))
    with pytest.raises(ValueError, match="qkv: dtype must be one of"):
        ops.attention_forward(qkv.astype(jnp.int32), 2)
    with pytest.raises(ValueError, match="exceeds the one-tile limit"):  # the kernel itself
        attention.attention_forward(jnp.ones((1, attention.MAX_LEN + 1, 3 * 16)), 1, launcher=INTERPRETED)
    _, cache = ops.attention_forward(qkv, np.int64(2))  # numpy ints are fine
    with pytest.raises(ValueError, match=r"do must have shape \(B, L, D\) = \(2, 5, 64\)"):
        ops.attention_backward(cache, jnp.ones((2, 5, 32)))


def test_compiled_path_refuses_tiles_over_shared_memory():
    """fp32 L=197 Dh=64 keeps a 64 KiB K/V tile: the compiled one-tile kernel says so before
    launching (kernels/compile_check.py measured the limit); the interpreter runs it
    (tests/test_kernels_flash.py), and the dispatcher sends it to the key-blocked kernel."""
    assert attention.compiled_fits(65, 32, jnp.float32, "ieee")
    assert attention.compiled_fits(197, 64, jnp.bfloat16, "ieee")
    assert not attention.compiled_fits(197, 64, jnp.float32, "ieee")
    with pytest.raises(ValueError, match="shared memory"):
        attention.attention_forward(jnp.ones((1, 197, 3 * 64)), 1, launcher=COMPILED)


def one_head_cache(l, dh):
    """A one-head attention cache (qkv, o, lse, keep_scale) of length l, as either forward makes it."""
    return (jnp.ones((1, l, 3 * dh)), jnp.ones((1, l, dh)), jnp.zeros((1, 1, l)), None)


def test_one_tile_backward_refuses_what_its_forward_refuses():
    """Either backward takes either forward's cache, so a key-blocked forward's cache can reach
    the one-tile backward at any length: it refuses, before launching, what the one-tile forward
    refuses (on a GPU the launch itself would fail with a bare shared-memory error from jaxlib;
    fp32 L=577 Dh=64 needs 598,016 bytes against sm_90's 232,448, kernels.compile_check's way)."""
    with pytest.raises(ValueError, match=r"attention_backward: L=197 .* shared memory"):
        attention.attention_backward(one_head_cache(197, 64), jnp.ones((1, 197, 64)), launcher=COMPILED)
    with pytest.raises(ValueError, match="attention_backward: sequence length 1025 exceeds the one-tile limit"):
        attention.attention_backward(one_head_cache(1025, 16), jnp.ones((1, 1025, 16)), launcher=INTERPRETED)
    with pytest.raises(ValueError, match="attention_backward: .* shared memory"):
        dispatch.attention_backward(one_head_cache(197, 64), jnp.ones((1, 197, 64)), launcher=COMPILED,
                                    kernel="one-tile")
