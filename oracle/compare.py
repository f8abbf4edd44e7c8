"""One comparison and one tolerance table for every check of a fused kernel or a whole step
against the reference: oracle/kernel_gradcheck.py, the kernel tests, the benchmarks (which check
before they time) and bench/tune_attention.py.

The measure, per tensor: rel = max|got - want| / max|want|, the error relative to the tensor's
largest reference magnitude. It is meaningful where elementwise relative errors are not (at
near-zero entries). A non-finite value in ``got`` fails whatever the tolerance: every kernel
output starts as NaN in the checks, so an element a kernel never writes shows up here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# rel tolerances, and why each is what it is
TOLERANCE = {
    # float32 with ieee dots: only the summation order differs from XLA (observed <= ~1e-6)
    "float32": 1e-5,
    # the same at benchmark sizes: column sums (LN dgamma) run over up to 33,280 rows, where the
    # summation order alone moves float32 by ~eps * sqrt(rows)
    "float32 long sums": 3e-5,
    # tf32 keeps 10 mantissa bits: 2^-11 ~ 5e-4 per product
    "tf32": 5e-3,
    # tf32x3 splits each float32 operand into a tf32 high part and the remainder, and does three
    # tf32 dots (hi.hi + hi.lo + lo.hi): about float32's accuracy
    "tf32x3": 1e-5,
    # half inputs vs the float32 reference on the same rounded inputs; outputs, P and dS are
    # rounded to the input dtype on the way (bf16: 8 mantissa bits, 2^-9 ~ 2e-3 each); observed
    # <= ~6e-3 at the check shapes
    "bfloat16": 2e-2,
    "float16": 2e-2,
    # the same at benchmark sizes (longer sums in half-precision outputs)
    "bfloat16 long sums": 3e-2,
    # a whole float32 training step (loss and every gradient after 8 blocks)
    "train step": 1e-4,
    # a whole bf16 training step against the float32 one compounds bf16 rounding through every
    # layer, forward and backward; per-tensor errors seen on the tiny ViT: up to 2.3e-2 over 12
    # seeds and 3.1e-2 once in CI (tests/test_precision.py bounds the global norm)
    "bf16 train step": 6e-2,
}


# XLA's dots in every check: float32 at full precision. JAX's default on NVIDIA GPUs from Ampere on
# (the lent H200 too) rounds the operands of float32 dots to TF32, 10 mantissa bits: the float32
# reference itself would then be off by ~1e-3, a hundred times the 1e-5 the ieee kernels are held
# to (jax-ml/jax#12008: "Many JAX tests fail on A100 because of TF32 math"). On the CPU float32
# dots are exact either way, so only a GPU run shows the difference.
CHECK_MATMUL_PRECISION = "highest"


def exact_float32_dots():
    """Context for a check: XLA's float32 dots (the reference's, and the XLA parts of a fused
    step) at full precision, as CHECK_MATMUL_PRECISION says; a kernel's own tl.dot follows its
    dot_precision whatever this is."""
    return jax.default_matmul_precision(CHECK_MATMUL_PRECISION)


def kernel_tolerance(dtype, dot_precision: str = "ieee", long_sums: bool = False) -> float:
    """The tolerance of a kernel's outputs and gradients in ``dtype`` (float32: with
    ``dot_precision``); ``long_sums`` at the benchmarks' sizes."""
    name = jnp.dtype(dtype).name
    if name == "float32" and dot_precision != "ieee":
        return TOLERANCE[dot_precision]
    key = f"{name} long sums"
    return TOLERANCE[key] if long_sums and key in TOLERANCE else TOLERANCE[name]


class Row(NamedTuple):
    """One tensor's comparison."""

    name: str
    shape: tuple
    max_abs: float
    rel: float
    nonfinite: int
    ok: bool


def _leaves(tree) -> list[tuple[str, object]]:
    if isinstance(tree, dict) and all(isinstance(k, str) and not isinstance(v, (dict, list, tuple))
                                      for k, v in tree.items()):
        return list(tree.items())  # a flat dict of named tensors keeps its plain names
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path) or "out", leaf) for path, leaf in flat]


def compare(got, want, tol: float) -> list[Row]:
    """One Row per tensor of ``want`` (a pytree; ``got`` has the same structure)."""
    g, w = _leaves(got), _leaves(want)
    if [n for n, _ in g] != [n for n, _ in w]:
        raise AssertionError(f"output structure differs: {[n for n, _ in g]} vs {[n for n, _ in w]}")
    rows = []
    for (name, a), (_, b) in zip(g, w):
        a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
        b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
        if a.shape != b.shape:
            rows.append(Row(name, b.shape, np.inf, np.inf, 0, False))
            continue
        nonfinite = int(np.sum(~np.isfinite(a)))
        diff = np.abs(np.where(np.isfinite(a), a, np.inf) - b)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(b).max()) if b.size else 0.0
        rel = max_abs / scale if scale > 0 else max_abs
        rows.append(Row(name, b.shape, max_abs, rel, nonfinite, nonfinite == 0 and rel <= tol))
    return rows


def format_rows(rows: list[Row]) -> str:
    return "\n".join(f"  {r.name:<40} {str(r.shape):<16} max abs {r.max_abs:.3e} rel {r.rel:.3e} "
                     f"non-finite {r.nonfinite}{'' if r.ok else '  FAIL'}" for r in rows)


def assert_close(got, want, tol: float, what: str = "result") -> float:
    """Raise AssertionError with a per-tensor table unless every tensor is finite and within
    ``tol``; return the worst rel."""
    rows = compare(got, want, tol)
    if not all(r.ok for r in rows):
        raise AssertionError(f"{what}: differs from the reference (tol rel {tol:g}):\n"
                             f"{format_rows(rows)}")
    return max((r.rel for r in rows), default=0.0)
