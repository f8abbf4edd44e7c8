"""Fused residual-add LayerNorm (kernels/layernorm.py) vs vit.layers.add_layernorm_*, in Triton's
interpreter on the CPU or compiled on a GPU (tests/kernel_checks.py): y, ds, dgamma, dbeta on awkward shapes, r given or None, bf16, errors, determinism, and on the CPU the GPU's tiling.

Error metric (oracle.compare.compare): rel = max|fused - ref| / max|ref| per tensor, plus a
count of non-finite fused values (outputs start as NaN in the interpreter, so an unwritten element
is non-finite). Tolerances: float32 1e-5 (observed ~1e-7: only summation order differs);
bf16 2e-2 against the float32 reference on the same rounded inputs (observed <= ~8e-3: y and ds
are rounded to 8 mantissa bits, and s = x + r is rounded to bf16 as the reference does in bf16).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import COMPILED, INTERPRETED, fused_ops, layernorm
from oracle.compare import TOLERANCE, compare
from oracle.kernel_gradcheck import as_float32, layernorm_inputs, run_layernorm
from vit.ops import REFERENCE

from kernel_checks import INTERPRET, assert_all_close, ops  # noqa: F401  (ops is a fixture)

F32_TOL = TOLERANCE["float32"]
BF16_TOL = TOLERANCE["bfloat16"]




@pytest.mark.parametrize(
    "m, n",
    [
        (1, 64),  # one row
        (130, 64),  # rows not a multiple of the row tile
        (7, 100),  # width not a power of two: 28 masked columns
        (5, 17),  # tiny odd width
        (65, 1000),  # the widest the brief asks for, 24 masked columns
        (33, 1024),  # width exactly a power of two, no masking
        (520, 256),  # product width, several backward groups (two-stage dgamma/dbeta)
    ],
)
@pytest.mark.parametrize("residual", [False, True], ids=["r=None", "r"])
def test_matches_reference_float32(ops, m, n, residual):
    inp = layernorm_inputs(jax.random.PRNGKey(m * 7 + n), m, n, residual, jnp.float32)
    rows = compare(run_layernorm(ops, inp), run_layernorm(REFERENCE, inp), F32_TOL)
    assert [r[0] for r in rows] == ["y", "ds", "dgamma", "dbeta"]
    assert_all_close(rows, F32_TOL)


def test_leading_axes_are_flattened(ops):
    """(B, L, D) input as the model passes it, eager (no jit)."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    x = jax.random.normal(k[0], (3, 5, 96))
    r = jax.random.normal(k[1], (3, 5, 96))
    params = {"gamma": jax.random.normal(k[2], (96,)), "beta": jnp.zeros((96,))}
    dy = jax.random.normal(k[3], (3, 5, 96))
    y, cache = ops.add_layernorm_forward(params, x, r, 1e-5)
    ds, grads = ops.add_layernorm_backward(params, cache, dy)
    y_ref, cache_ref = REFERENCE.add_layernorm_forward(params, x, r, 1e-5)
    ds_ref, grads_ref = REFERENCE.add_layernorm_backward(params, cache_ref, dy)
    assert y.shape == x.shape and ds.shape == x.shape
    rows = compare({"y": y, "ds": ds, "dgamma": grads["gamma"], "dbeta": grads["beta"]},
                   {"y": y_ref, "ds": ds_ref, "dgamma": grads_ref["gamma"], "dbeta": grads_ref["beta"]},
                   F32_TOL)
    assert_all_close(rows, F32_TOL)


@pytest.mark.parametrize("residual", [False, True], ids=["r=None", "r"])
@pytest.mark.parametrize("m, n", [(130, 256), (7, 100)])
def test_bfloat16_vs_float32_reference(ops, m, n, residual):
    inp = layernorm_inputs(jax.random.PRNGKey(11), m, n, residual, jnp.bfloat16)
    fused = run_layernorm(ops, inp)
    assert fused["y"].dtype == jnp.bfloat16 and fused["ds"].dtype == jnp.bfloat16
    assert fused["dgamma"].dtype == jnp.float32 and fused["dbeta"].dtype == jnp.float32
    assert_all_close(compare(fused, run_layernorm(REFERENCE, as_float32(inp)), BF16_TOL), BF16_TOL)


@pytest.mark.parametrize("m, n", [(130, 256), (64 * 65, 256)])
def test_bfloat16_dgamma_dbeta_are_float32_sums(ops, m, n):
    """Without a residual s = x, exact in float32, so in bf16 too dgamma = sum dy * s_hat and
    dbeta = sum dy are float32 sums of the same products as the float32 reference's: held to
    float32's tolerance, not bf16's (observed <= 2.2e-7). Partial sums kept in the input dtype
    (each program's rounded to 8 mantissa bits; planted: 2.1e-3 and 3.1e-3) stayed within bf16's
    2e-2 and passed every other test of the kernel."""
    inp = layernorm_inputs(jax.random.PRNGKey(13), m, n, False, jnp.bfloat16)
    fused, ref = run_layernorm(ops, inp), run_layernorm(REFERENCE, as_float32(inp))
    sums = ("dgamma", "dbeta")
    assert_all_close(compare({k: fused[k] for k in sums}, {k: ref[k] for k in sums}, F32_TOL), F32_TOL)


def test_bfloat16_backward_rounds_the_sum_as_the_forward_did(ops):
    """x + r far from 0 (x ~ 100 + N(0, 1), where a bf16 ulp is 0.5): the backward must rebuild
    s = x + r rounded to bf16, as the forward (and the reference in bf16) did, or s_hat no longer
    matches the saved mean and rstd. The reference: float32 LayerNorm of that rounded sum."""
    inp = layernorm_inputs(jax.random.PRNGKey(4), 9, 64, True, jnp.bfloat16)
    inp["x"] = (inp["x"].astype(jnp.float32) + 97.0).astype(jnp.bfloat16)
    rounded_sum = as_float32({**inp, "x": inp["x"] + inp["r"], "r": None})
    assert_all_close(compare(run_layernorm(ops, inp), run_layernorm(REFERENCE, rounded_sum), BF16_TOL),
                     BF16_TOL)


def test_saved_statistics_are_float32_mean_and_rstd(ops):
    inp = layernorm_inputs(jax.random.PRNGKey(5), 9, 100, True, jnp.bfloat16)
    _, (x, r, mean, rstd) = ops.add_layernorm_forward(inp["params"], inp["x"], inp["r"], 1e-6)
    s = (inp["x"] + inp["r"]).astype(jnp.float32)  # rounded to bf16 by the add, as the reference
    assert mean.dtype == jnp.float32 and rstd.dtype == jnp.float32 and mean.shape == (9,)
    np.testing.assert_allclose(mean, s.mean(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(np.var(np.asarray(s), -1) + 1e-6), rtol=1e-5)


def test_dgamma_dbeta_are_bitwise_deterministic(ops):
    # 4160 rows of 256: 65 row tiles in 8 backward groups, so the two-stage reduction is exercised
    inp = layernorm_inputs(jax.random.PRNGKey(2), 64 * 65, 256, True, jnp.float32)
    g = layernorm.geometry(64 * 65, 256, INTERPRETED, "bwd")
    assert g.groups > 1 and g.tiles > 1
    first = run_layernorm(ops, inp)
    second = run_layernorm(ops, inp)
    for name in ("dgamma", "dbeta", "ds"):
        assert np.array_equal(np.asarray(first[name]), np.asarray(second[name])), name


@pytest.mark.parametrize(
    "m, n, residual, dtype",
    [
        # the product shape: 130 partial rows, 16 a step (8 steps, the last masked), 2 tiles a program
        (64 * 65, 256, True, jnp.float32),
        # ViT-S width at L = 197: 128 of 512 columns masked in the main kernels, the reduction's
        # second 256-column program half masked; 813 tiles, 4 a program, so the last program holds
        # one tile, and that tile 5 of 8 rows; bf16, no residual
        (197 * 33, 384, False, jnp.bfloat16),
        # ViT-B width: tiles of 4 rows of 1024 columns (256 masked), three reduction programs, a
        # 1-row tail tile
        (197 * 5, 768, True, jnp.float32),
        # ViT-Ti width: 64 of 256 columns masked, a 13-row tail tile, bf16
        (197 * 9, 192, True, jnp.bfloat16),
    ],
    ids=["product-fp32", "vit-s-bf16", "vit-b-fp32", "vit-ti-bf16"],
)
def test_compiled_tiling_in_the_interpreter(m, n, residual, dtype):
    """The tiling a GPU runs, checked here: INTERPRETED's own large tiles and 8 backward programs
    leave the reduction kernel one step over the partial rows, so a multi-step reduction (the
    GPU's: over 100 partial rows, 16 a step, a masked tail), a program of several row tiles, a
    reduction of several column programs or a tile of few rows of a wide row would pass every
    other check here while wrong on a GPU. The same kernels through the interpreter, with
    COMPILED's tile facts (layernorm.geometry reads nothing else of the launcher), at the product
    shape and the standard ViT widths."""
    if not INTERPRET:
        pytest.skip("on a GPU the tests above run COMPILED's tiling itself")
    tiling = dataclasses.replace(INTERPRETED, name="Triton's interpreter with COMPILED's tiles",
                                 tile_elements=COMPILED.tile_elements, tile_rows=COMPILED.tile_rows,
                                 reduce_programs=COMPILED.reduce_programs)
    for direction in ("fwd", "bwd"):
        assert layernorm.geometry(m, n, tiling, direction) == layernorm.geometry(m, n, COMPILED, direction)
    g = layernorm.geometry(m, n, COMPILED, "bwd")
    assert g.groups > g.reduce_g and g.groups % g.reduce_g, g  # a multi-step reduction, masked tail
    inp = layernorm_inputs(jax.random.PRNGKey(6), m, n, residual, dtype)
    fused = run_layernorm(fused_ops(tiling), inp)  # outputs start as NaN: the interpreter's way
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert_all_close(compare(fused, run_layernorm(REFERENCE, as_float32(inp)), tol), tol)


def test_shape_and_dtype_errors(ops):
    x = jnp.ones((4, 8))
    params = {"gamma": jnp.ones((8,)), "beta": jnp.zeros((8,))}
    with pytest.raises(ValueError, match=r"params\['gamma'\] must have shape \(8,\)"):
        ops.add_layernorm_forward({"gamma": jnp.ones((7,)), "beta": jnp.zeros((8,))}, x, None, 1e-5)
    with pytest.raises(ValueError, match="r must match x"):
        ops.add_layernorm_forward(params, x, jnp.ones((4, 9)), 1e-5)
    with pytest.raises(ValueError, match="r must match x"):
        ops.add_layernorm_forward(params, x, x.astype(jnp.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="x: dtype must be one of"):
        ops.add_layernorm_forward(params, x.astype(jnp.int32), None, 1e-5)
    with pytest.raises(ValueError, match="width 16385 exceeds the one-tile limit 16384"):
        ops.add_layernorm_forward(params, jnp.ones((2, 16385)), None, 1e-5)
    wide = {"gamma": jnp.ones((16384,)), "beta": jnp.zeros((16384,))}  # the limit itself is accepted
    y = jax.eval_shape(lambda x: ops.add_layernorm_forward(wide, x, None, 1e-5)[0], jnp.ones((2, 16384)))
    assert y.shape == (2, 16384)
    with pytest.raises(ValueError, match="non-empty"):
        ops.add_layernorm_forward(params, jnp.ones((0, 8)), None, 1e-5)
    _, cache = ops.add_layernorm_forward(params, x, None, 1e-5)
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(4, 8\)"):
        ops.add_layernorm_backward(params, cache, jnp.ones((4, 9)))
    with pytest.raises(ValueError, match=r"dy must have the shape of x \(4, 8\), got \(8, 4\)"):
        ops.add_layernorm_backward(params, cache, jnp.ones((8, 4)))  # as many elements, transposed


def test_eps_must_be_static(ops):
    x = jnp.ones((2, 8))
    params = {"gamma": jnp.ones((8,)), "beta": jnp.zeros((8,))}
    with pytest.raises(ValueError, match="eps must be a static Python float"):
        jax.jit(lambda eps: ops.add_layernorm_forward(params, x, None, eps)[0])(1e-5)


def test_eps_matters_for_rows_of_small_variance(ops):
    """Rows whose variance is comparable to eps (1e-4 against eps = 1e-2): rstd = 1/sqrt(var + eps)
    differs from 1/sqrt(var) by 10x, so a kernel that dropped or mis-scaled eps fails here, where
    the other checks (var ~ 4, eps 1e-6) cannot see it."""
    inp = layernorm_inputs(jax.random.PRNGKey(8), 6, 100, True, jnp.float32)
    # std 0.01 about 0 (no large mean: its float32 cancellation would cost more than 1e-5 here)
    inp["x"], inp["r"], inp["eps"] = 0.005 * (inp["x"] - 3.0), 0.0 * inp["r"], 1e-2
    assert_all_close(compare(run_layernorm(ops, inp), run_layernorm(REFERENCE, inp), F32_TOL), F32_TOL)
