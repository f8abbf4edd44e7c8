"""Residual add + LayerNorm, y = LN(x + r) over D, forward and forward+backward, on the
activations of the product shape (B=64 L=65 D=256: 4160 rows) and B=512 (33,280 rows).

Contenders (each checked against vit.layers in float32 on the same inputs before it is timed):
  fused      kernels.fused_ops: one forward kernel (writes y, mean, rstd); the backward recomputes
             s_hat from x, r, mean, rstd, writes ds and per-program dgamma/dbeta partials, and a
             second kernel reduces the partials
  reference  vit.layers.add_layernorm_forward / backward (hand-written jnp) under XLA
  autodiff   jax.vjp of the reference forward (oracle.autodiff_vjp); fwd+bwd only

Bytes: harness.layernorm_bytes (fwd 3*M*D*s + ..., bwd 4*M*D*s + ...), the same for every
contender: effective bandwidth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import oracle
from bench import harness
from vit import ViTConfig, layers
from vit.ops import REFERENCE

EPS = ViTConfig().ln_eps
CONTENDERS = {"fwd": ["reference", "fused"], "fwd+bwd": ["reference", "fused", "autodiff"]}
NOTES = {
    "fused": "Triton kernels",
    "reference": "vit.layers (jnp) under XLA",
    "autodiff": "jax.vjp of the reference forward",
}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cases = [harness.KernelCase(f"add+layernorm {mode}", "layernorm", mode, shape, contender, dtype)
             for shape in harness.shape_names(metafunc.config, "layernorm")
             for mode in ("fwd", "fwd+bwd")
             for dtype in ("fp32", "bf16")
             for contender in CONTENDERS[mode]]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def make_inputs(shape, dtype, key):
    """params (float32 gamma ~ 1 + N(0, 0.25), beta), x = 3 + 2 N(0, 1) (so the mean and variance
    matter), r, dy ~ N(0, 1); activations in the row's dtype."""
    b, l, d = harness.LN_SHAPES[shape]
    k = jax.random.split(key, 5)
    params = {"gamma": 1.0 + 0.5 * jax.random.normal(k[0], (d,), jnp.float32),
              "beta": 0.5 * jax.random.normal(k[1], (d,), jnp.float32)}
    x = (3.0 + 2.0 * jax.random.normal(k[2], (b, l, d), jnp.float32)).astype(dtype)
    r = jax.random.normal(k[3], (b, l, d), jnp.float32).astype(dtype)
    dy = jax.random.normal(k[4], (b, l, d), jnp.float32).astype(dtype)
    return params, x, r, dy


def builder(mode, bench):
    def build(contender, shape):
        if contender == "autodiff":
            def fwd(inputs):
                return layers.add_layernorm_forward(inputs["params"], inputs["x"], inputs["r"], EPS)[0]

            def fwd_bwd(params, x, r, dy):
                inputs = {"params": params, "x": x, "r": r}
                g = oracle.autodiff_vjp(fwd, inputs, dy)  # g["r"] is g["x"]: the add copies it
                return fwd(inputs), g["x"], g["params"]
            return fwd_bwd
        if contender == "reference":
            return row_function(mode, REFERENCE)
        from kernels import fused_ops  # noqa: PLC0415  (needs triton; only the fused rows import it)

        return row_function(mode, fused_ops(bench.launcher))
    return build


def row_function(mode, ops):
    """The row's function over an op set (anything with add_layernorm_forward and _backward, as
    vit.ops.Ops has): y = LN(x + r) for fwd; (y, ds, {gamma, beta}) for fwd+bwd."""
    if mode == "fwd":
        return lambda params, x, r, dy: ops.add_layernorm_forward(params, x, r, EPS)[0]

    def fwd_bwd(params, x, r, dy):
        y, cache = ops.add_layernorm_forward(params, x, r, EPS)
        ds, grads = ops.add_layernorm_backward(params, cache, dy)
        return y, ds, grads
    return fwd_bwd


def work(mode, dtype):
    def nbytes(shape):
        b, l, d = harness.LN_SHAPES[shape]
        return {"gbytes": harness.layernorm_bytes(b * l, d, jnp.dtype(dtype).itemsize, mode) / 1e9}
    return nbytes


def untimed_reason(case, bench):
    if case.dtype == "bf16" and bench.backend == "cpu":
        return "bf16 rows are timed on a GPU only; checked here"
    return None


def geometry_note(case, launcher) -> str:
    """The fused row's tiling on `launcher` (layernorm.geometry), in each direction it runs, so
    that a row timed before a tiling change says which tiling it timed."""
    if case.contender != "fused":
        return ""
    from kernels import layernorm  # noqa: PLC0415  (needs triton; only the fused rows import it)

    b, l, d = harness.LN_SHAPES[case.shape]
    said = []
    for direction in ("fwd",) if case.mode == "fwd" else ("fwd", "bwd"):
        g = layernorm.geometry(b * l, d, launcher, direction)
        said.append(f"{direction} {g.block_m}x{g.block_n} tiles, {g.num_warps} warps" + (
            f", {g.groups} programs of {g.tiles} tile{'' if g.tiles == 1 else 's'}, partials summed "
            f"{g.reduce_g} rows a step"
            if direction == "bwd" else ""))
    return "; " + "; ".join(said)


def test_add_layernorm(case, bench):
    harness.run_kernel_case(
        bench, case, make_inputs=make_inputs, build=builder(case.mode, bench),
        work=work(case.mode, harness.DTYPES[case.dtype]),
        note=NOTES[case.contender] + geometry_note(case, bench.launcher),
        untimed_reason=untimed_reason(case, bench))


def test_fused_rows_name_their_tiling():
    """Each fused row's note gives the tiling it runs in every direction it runs, on the launcher
    it runs on; the other contenders' notes say none."""
    from kernels import COMPILED, INTERPRETED, layernorm  # noqa: PLC0415

    for launcher in (COMPILED, INTERPRETED):
        for mode, contenders in CONTENDERS.items():
            for shape in harness.LN_SHAPES:
                b, l, d = harness.LN_SHAPES[shape]
                for contender in contenders:
                    case = harness.KernelCase(f"add+layernorm {mode}", "layernorm", mode, shape, contender, "fp32")
                    note = geometry_note(case, launcher)
                    if contender != "fused":
                        assert note == "", case
                        continue
                    fwd = layernorm.geometry(b * l, d, launcher, "fwd")
                    bwd = layernorm.geometry(b * l, d, launcher, "bwd")
                    want = f"; fwd {fwd.block_m}x{fwd.block_n} tiles, {fwd.num_warps} warps"
                    if mode == "fwd+bwd":
                        want += (f"; bwd {bwd.block_m}x{bwd.block_n} tiles, {bwd.num_warps} warps, "
                                 f"{bwd.groups} programs of {bwd.tiles} tile{'' if bwd.tiles == 1 else 's'}, partials summed "
                                 f"{bwd.reduce_g} rows a step")
                    assert note == want, (launcher.name, case)
