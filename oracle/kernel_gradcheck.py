"""Fused kernels vs the reference layers: every output and every gradient, on fresh random inputs.

    python -m oracle.kernel_gradcheck                      # default shapes; interpreter when no GPU
    python -m oracle.kernel_gradcheck --full               # + FULL_SHAPES (always on a GPU)
    python -m oracle.kernel_gradcheck --dtype bfloat16     # bf16 kernels vs the float32 reference
    python -m oracle.kernel_gradcheck --shapes attn:2x17x4x32:keep ln:130x100:r --seed 3
    python -m oracle.kernel_gradcheck --kernel key-blocked # one attention kernel (default: both)

Every attn shape runs through each attention kernel (--kernel both, the default): the one-tile
kernel (kernels/attention.py; skipped where it cannot run: L > 1024, or compiled with a K/V tile
over its shared-memory budget) and the key-blocked kernel (kernels/flash_attention.py), with the
blocks the dispatcher (kernels/dispatch.py) would give them.

For each case both the reference (each kernel file's ``REFERENCE``: the functions of
``vit.layers`` it must equal) and the fused ops run forward and backward under
``jax.jit`` on the same random inputs; the table gives, per tensor, the max abs error, the error
relative to the tensor's largest reference magnitude (rel = max|fused - ref| / max|ref|, which is
meaningful where elementwise relative errors are not: near-zero entries), and the number of
non-finite fused values. Every kernel output starts as NaN (the interpreter always; compiled
launches through ``kernels.launch.poisoned_outputs``), so an element a kernel never writes is
counted there. Exit status 1 when any tensor is over
tolerance or non-finite. Validate-first: kernels/compile_check.py and bench/ time only what
passes here.

Tolerances: oracle/compare.py (float32 with ieee dots 1e-5, tf32 5e-3, bf16/fp16 2e-2). Every
case runs under ``oracle.compare.exact_float32_dots()``: on a GPU, JAX's default would compute the
float32 reference's dots in TF32, far less exactly than the kernels they check.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from kernels import COMPILED, INTERPRETED, attention, dispatch, flash_attention, fused_ops, layernorm
from kernels.launch import poisoned_outputs
from oracle.compare import (CHECK_MATMUL_PRECISION, Row, compare, exact_float32_dots,
                            kernel_tolerance)
from vit import layers
from vit.ops import Ops

# the reference side of every check: the functions each kernel file names as its REFERENCE
ATTENTION_FILES = {"one-tile": attention, "key-blocked": flash_attention}


def reference_ops(attention_kernel: str = "one-tile") -> Ops:
    """The reference functions named by the kernel files that `attention_kernel` runs."""
    module = ATTENTION_FILES.get(attention_kernel, attention)
    (attention_forward, attention_backward), (add_layernorm_forward, add_layernorm_backward) = \
        module.REFERENCE, layernorm.REFERENCE
    return Ops("reference", attention_forward=attention_forward,
               attention_backward=attention_backward, add_layernorm_forward=add_layernorm_forward,
               add_layernorm_backward=add_layernorm_backward,
               description=f"{module.__name__}.REFERENCE and kernels.layernorm.REFERENCE")

DEFAULT_SHAPES = [
    # attn:BxLxHxDh[:keep] -- why each one
    "attn:1x1x2x16",  # L=1: one token, 15 padded rows/keys, batch 1
    "attn:2x17x4x16:keep",  # L just above a power of two, dropout mask
    "attn:3x17x2x32",  # odd batch
    "attn:2x65x8x32",  # product L, heads and head dim (batch 2)
    "attn:2x65x4x32:keep",  # product L with dropout
    "attn:1x65x2x64",  # Dh 64
    "attn:1x197x2x64:keep",  # ViT-B/16 at 224px: L=197 (one-tile: tile 256, too big for fp32 on a GPU)
    "attn:2x197x2x32",  # L=197 with a one-tile K/V tile that fits the compiled fp32 kernel
    "attn:2x33x1x128",  # Dh 128, a single head
    "attn:1x127x2x32",  # one below 128, the dispatcher's one-tile limit (at Dh <= 32)
    "attn:1x128x2x16:keep",  # exactly 128: whole key blocks only (fp32 Dh 16: blocks of 32 keys)
    "attn:1x129x2x32:keep",  # one above: the dispatcher's first key-blocked length, 1-key tail
    "attn:1x31x2x32",  # fp32 forward key blocks of 32: L = BLOCK_N - 1
    "attn:1x33x2x64:keep",  # L = BLOCK_N + 1 (forward 32-key blocks; backward 16: 3 blocks)
    "attn:1x577x1x64:keep",  # ViT at 384 px (24x24 patches + CLS): many key and query blocks
    "attn:1x1100x1x16",  # beyond the one-tile limit (1024): key-blocked only
    # ln:MxN[:r] -- rows x width, r: residual given
    "ln:130x64",  # small width, no residual
    "ln:130x256:r",  # product width
    "ln:65x1000:r",  # width not a power of two (BLOCK 1024, 24 masked columns)
    "ln:7x100",  # few rows, masked columns
]
FULL_SHAPES = ["attn:64x65x8x32", "attn:64x65x8x32:keep", "ln:4160x256:r"]


# ----------------------------------------------------------------------------------------------
# cases: inputs, both runs, comparison


def parse_shape(spec: str):
    """'attn:2x17x4x32:keep' -> ('attn', (2, 17, 4, 32), True); 'ln:130x100:r' -> ('ln', ...)."""
    parts = spec.split(":")
    kind, dims, flags = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    try:
        dims = tuple(int(v) for v in dims.split("x"))
    except ValueError:
        dims = ()
    want = {"attn": (4, {"keep"}), "ln": (2, {"r"})}
    if kind not in want or len(dims) != want[kind][0] or not set(flags) <= want[kind][1]:
        raise ValueError(f"bad shape {spec!r}: use attn:BxLxHxDh[:keep] or ln:MxN[:r]")
    if min(dims) < 1:
        raise ValueError(f"bad shape {spec!r}: every size must be 1 or more")
    if kind == "attn" and dims[3] not in attention.HEAD_DIMS:  # typed here, not 3D / (3 * heads)
        raise ValueError(f"bad shape {spec!r}: head dim Dh = {dims[3]}; the kernels take Dh = "
                         f"{', '.join(map(str, attention.HEAD_DIMS))}")
    if kind == "attn":  # what the kernels take, in their words (length, ...)
        try:
            attention.check_shape(*dims)
        except ValueError as err:
            raise ValueError(f"bad shape {spec!r}: {err}") from None
    if kind == "ln" and dims[1] > layernorm.MAX_WIDTH:
        raise ValueError(f"bad shape {spec!r}: width {dims[1]} exceeds the add+LN kernel's one-tile "
                         f"limit {layernorm.MAX_WIDTH}")
    return kind, dims, bool(flags)


def attention_inputs(key, b, l, heads, dh, keep, dtype):
    """qkv, dO (unit normal, in dtype) and an optional dropout scale (rate 0.1, in float32)."""
    k1, k2, k3 = jax.random.split(key, 3)
    d = heads * dh
    qkv = jax.random.normal(k1, (b, l, 3 * d), jnp.float32).astype(dtype)
    do = jax.random.normal(k2, (b, l, d), jnp.float32).astype(dtype)
    keep_scale = layers.dropout_scale(k3, 0.1, (b, heads, l, l), jnp.float32) if keep else None
    return {"qkv": qkv, "heads": heads, "keep_scale": keep_scale, "do": do}


def layernorm_inputs(key, m, n, residual, dtype):
    """x (offset and scaled so mean and variance matter), r, dy in dtype; gamma, beta float32."""
    k = jax.random.split(key, 5)
    x = (3.0 + 2.0 * jax.random.normal(k[0], (m, n), jnp.float32)).astype(dtype)
    r = jax.random.normal(k[1], (m, n), jnp.float32).astype(dtype) if residual else None
    params = {"gamma": 1.0 + 0.5 * jax.random.normal(k[2], (n,), jnp.float32),
              "beta": 0.5 * jax.random.normal(k[3], (n,), jnp.float32)}
    dy = jax.random.normal(k[4], (m, n), jnp.float32).astype(dtype)
    return {"params": params, "x": x, "r": r, "dy": dy, "eps": 1e-6}


def run_attention(ops, inp):
    """-> {"o", "dq", "dk", "dv"}: forward output and the three thirds of dQKV."""
    heads = inp["heads"]

    @jax.jit
    def run(qkv, keep_scale, do):
        o, cache = ops.attention_forward(qkv, heads, keep_scale)
        return o, ops.attention_backward(cache, do)

    o, dqkv = run(inp["qkv"], inp["keep_scale"], inp["do"])
    dq, dk, dv = jnp.split(dqkv, 3, axis=-1)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def run_layernorm(ops, inp):
    """-> {"y", "ds", "dgamma", "dbeta"}."""
    eps = inp["eps"]

    @jax.jit
    def run(params, x, r, dy):
        y, cache = ops.add_layernorm_forward(params, x, r, eps)
        ds, grads = ops.add_layernorm_backward(params, cache, dy)
        return y, ds, grads

    y, ds, grads = run(inp["params"], inp["x"], inp["r"], inp["dy"])
    return {"y": y, "ds": ds, "dgamma": grads["gamma"], "dbeta": grads["beta"]}


def as_float32(inp):
    """The same inputs upcast to float32: the reference for half-precision kernels."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if isinstance(a, jax.Array) else a, inp
    )


def check(spec: str, ops: Ops, ref_ops: Ops, key, dtype: str, tol: float) -> list[Row]:
    """Run one case; -> rows from ``oracle.compare.compare``."""
    kind, dims, flag = parse_shape(spec)
    if kind == "attn":
        inp = attention_inputs(key, *dims, flag, jnp.dtype(dtype))
        fused = run_attention(ops, inp)
        ref = run_attention(ref_ops, as_float32(inp))
    else:
        inp = layernorm_inputs(key, *dims, flag, jnp.dtype(dtype))
        fused = run_layernorm(ops, inp)
        ref = run_layernorm(ref_ops, as_float32(inp))
    return compare(fused, ref, tol)


# ----------------------------------------------------------------------------------------------
# command line


def dot_precision_note(dot_precision: str, dtype: str, launcher) -> str:
    """What a dot precision other than ieee does not change here, or ""."""
    if dot_precision == "ieee":
        return ""
    if dtype != "float32":
        return f"note: --dot-precision {dot_precision} applies to float32 operands: with {dtype} it changes nothing"
    if not launcher.on_gpu:
        return (f"note: Triton's interpreter computes every dot in float32 whatever its precision: "
                f"{dot_precision} is not emulated here (exact dots, held to {dot_precision}'s tolerance)")
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m oracle.kernel_gradcheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", metavar="SPEC", help="attn:BxLxHxDh[:keep] / ln:MxN[:r]")
    ap.add_argument("--full", action="store_true", help="add the product shapes (slow in the interpreter)")
    ap.add_argument("--interpret", action="store_true", help="force Triton's interpreter")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dot-precision", default=None, choices=["ieee", "tf32", "tf32x3"],
                    help="tl.dot precision of float32 operands (default ieee)")
    ap.add_argument("--precision", default=None, choices=["ieee", "tf32", "tf32x3"],
                    dest="old_precision", help="the old name of --dot-precision")
    ap.add_argument("--seed", type=int, default=None, help="default: fresh, printed")
    ap.add_argument("--kernel", default="both", choices=["both", "auto", "one-tile", "key-blocked"],
                    help="attention kernel(s) to check: both (one-tile and key-blocked), auto "
                         "(the dispatcher's choice), one-tile or key-blocked alone")
    args = ap.parse_args(argv)
    if args.old_precision is not None:
        print("note: --precision is now called --dot-precision; the old name still works")
        if args.dot_precision not in (None, args.old_precision):
            ap.error("--precision and --dot-precision disagree; give --dot-precision only")
        args.dot_precision = args.old_precision
    dot_precision = args.dot_precision or "ieee"

    for spec in args.shapes or ():
        try:
            parse_shape(spec)
        except ValueError as e:
            ap.error(str(e))
    backend = jax.default_backend()
    launcher = INTERPRETED if args.interpret or backend != "gpu" else COMPILED
    if launcher is INTERPRETED and not args.interpret:
        print(f"no GPU backend (jax backend: {backend}): running the kernels in Triton's interpreter (slow)")
    note = dot_precision_note(dot_precision, args.dtype, launcher)
    if note:
        print(note)
    seed = args.seed if args.seed is not None else int(time.time_ns() % 2**31)
    shapes = args.shapes or (DEFAULT_SHAPES + (FULL_SHAPES if args.full or launcher.on_gpu else []))
    tol = kernel_tolerance(args.dtype, dot_precision)
    kernels = ["one-tile", "key-blocked"] if args.kernel == "both" else [args.kernel]
    ops = {k: fused_ops(launcher=launcher, dot_precision=dot_precision, attention_kernel=k)
           for k in kernels}

    import triton  # noqa: PLC0415

    device = jax.devices()[0].device_kind if launcher.on_gpu else "interpreter (CPU)"
    print(f"gradcheck: {device}, triton {triton.__version__}, jax {jax.__version__}, dtype {args.dtype}, "
          f"dots {dot_precision}, seed {seed}, tol rel {tol:g}; outputs NaN-poisoned; XLA's float32 "
          f"dots {CHECK_MATMUL_PRECISION}")
    header = f"{'case':<38} {'tensor':<7} {'shape':<16} {'max_abs':>10} {'rel':>10} {'nonfin':>6} {'sec':>5}  ok"
    print(header)
    print("-" * len(header))
    failures = skipped = ran = 0
    key = jax.random.PRNGKey(seed)
    for i, spec in enumerate(shapes):
        kind, dims, _ = parse_shape(spec)
        for kernel in kernels if kind == "attn" else kernels[:1]:
            label = f"{spec} [{kernel}]" if kind == "attn" else spec
            if kind == "attn" and kernel == "one-tile" and not dispatch.one_tile_runs(
                    dims[1], dims[3], args.dtype, launcher, dot_precision):
                skipped += 1
                print(f"{label:<38} SKIP: the one-tile kernel does not run this shape here (L > "
                      f"1024, or compiled with a K/V tile over its shared-memory budget)")
                continue
            t0 = time.perf_counter()
            with poisoned_outputs(), exact_float32_dots():
                rows = check(spec, ops[kernel], reference_ops(kernel), jax.random.fold_in(key, i),
                             args.dtype, tol)
            dt, ran = time.perf_counter() - t0, ran + 1
            for j, (name, shape, max_abs, rel, nonfinite, ok) in enumerate(rows):
                failures += not ok
                shape_s = "x".join(str(s) for s in shape)
                sec = f"{dt:5.1f}" if j == 0 else ""
                print(f"{label if j == 0 else '':<38} {name:<7} {shape_s:<16} {max_abs:>10.2e} {rel:>10.2e} "
                      f"{nonfinite:>6} {sec:>5}  {'ok' if ok else 'FAIL'}", flush=True)
    print("-" * len(header))
    print(f"{failures} tensor(s) over tolerance or non-finite" if failures
          else "all tensors within tolerance" if ran else "nothing checked: every case was skipped")
    if skipped:
        print(f"{skipped} case(s) skipped (not run, not passed)")
    return 1 if failures or not ran else 0


if __name__ == "__main__":
    from vit.signals import exit_code_of_a_check

    sys.exit(exit_code_of_a_check(main, "python -m oracle.kernel_gradcheck"))
