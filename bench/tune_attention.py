"""Time the fused attention kernels over their launch geometry (query rows per step BLOCK_M and
warps), forward and backward separately, at one shape; every variant is checked against the
reference before it is timed. Shows whether the default that kernels/attention.py picks (from
static register and stack counts, see its _geometry) is also the fastest on this GPU.

    python -m bench.tune_attention                               # B=64 L=65 H=8 Dh=32, fp32/ieee, fp32/tf32, bf16
    python -m bench.tune_attention --shape 512x65x8x32 --dtype bfloat16
    python -m bench.tune_attention --interpret --shape 1x17x2x16 # CPU: checks only, nothing timed

Prints one table per dtype and direction: median ms (p20-p80), speed relative to the default,
registers and stack bytes per thread (sm_90 compile, as kernels.compile_check reads them), and
"default" on the row the kernels use; --out FILE also writes the tables as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.device import device_info, version
from bench.harness import matmul_precision
from bench.timer import time_calls, timer_settings
from kernels import attention, fused_ops
from oracle.compare import compare, kernel_tolerance
from oracle.kernel_gradcheck import attention_inputs
from vit.ops import REFERENCE

WARPS = (4, 8)
ROWS = (16, 32, 64)


@contextlib.contextmanager
def geometry(direction: str, block_m: int, warps: int):
    """Launches of `direction` ("fwd" or "bwd") traced inside use BLOCK_M rows and `warps`."""
    default = attention._geometry

    def patched(*args, backward=False, **kwargs):
        consts, num_warps = default(*args, backward=backward, **kwargs)
        if backward == (direction == "bwd"):
            consts, num_warps = dict(consts, BLOCK_M=block_m), warps
        return consts, num_warps

    attention._geometry = patched
    try:
        yield
    finally:
        attention._geometry = default


def default_geometry(b, l, heads, dh, dtype, dot_precision, direction) -> tuple[int, int]:
    consts, warps = attention._geometry(b, l, heads * dh, heads, dtype, False, dot_precision,
                                        backward=direction == "bwd")
    return consts["BLOCK_M"], warps


def resources(b, l, heads, dh, dtype, dot_precision, direction, block_m, warps) -> str:
    """'regs/stack' of the sm_90 compile of this variant (no GPU needed), or '?'."""
    from kernels import compile_check  # noqa: PLC0415

    try:
        with geometry(direction, block_m, warps):
            specs = compile_check._attention_launches(b, l, heads, dh, dtype, False, dot_precision)
        usage = compile_check.resource_usage(compile_check.compile_spec(specs[direction == "bwd"], 90))
        return f"{usage['regs']}/{usage['stack']}" if usage else "?"
    except Exception as e:  # noqa: BLE001  (a variant that does not compile is reported, not fatal)
        return f"no: {type(e).__name__}"


def run_variant(ops, inp, direction, block_m, warps):
    """(fn, args) of one variant, traced under its geometry: fwd(qkv) -> o, bwd(cache, do) -> dqkv."""
    heads = inp["heads"]
    if direction == "fwd":
        with geometry(direction, block_m, warps):
            fn = jax.jit(lambda qkv: ops.attention_forward(qkv, heads)[0])
            jax.block_until_ready(fn(inp["qkv"]))  # compiled inside the override
        return fn, (inp["qkv"],)
    _, cache = jax.jit(lambda qkv: ops.attention_forward(qkv, heads))(inp["qkv"])
    with geometry(direction, block_m, warps):
        fn = jax.jit(ops.attention_backward)
        jax.block_until_ready(fn(cache, inp["do"]))
    return fn, (cache, inp["do"])


def tune(shape, dtype, dot_precision, interpret, settings) -> list[dict]:
    b, l, heads, dh = shape
    ops = fused_ops(interpret=interpret, dot_precision=dot_precision)
    inp = attention_inputs(jax.random.PRNGKey(0), b, l, heads, dh, False, dtype)
    inp32 = {k: v.astype(jnp.float32) if hasattr(v, "astype") else v for k, v in inp.items()}
    o_ref, cache_ref = jax.jit(lambda qkv: REFERENCE.attention_forward(qkv, heads))(inp32["qkv"])
    want = {"fwd": {"o": o_ref}, "bwd": {"dqkv": REFERENCE.attention_backward(cache_ref, inp32["do"])}}
    tol = kernel_tolerance(dtype, dot_precision)
    block_l = max(16, attention.next_power_of_2(l))
    rows = []
    for direction in ("fwd", "bwd"):
        default = default_geometry(b, l, heads, dh, dtype, dot_precision, direction)
        for block_m, warps in itertools.product(ROWS, WARPS):
            if block_m > block_l:
                continue
            row = {"dtype": f"{jnp.dtype(dtype).name}/{dot_precision}" if dtype == jnp.float32 else jnp.dtype(dtype).name,
                   "direction": direction, "block_m": block_m, "warps": warps,
                   "default": (block_m, warps) == default,
                   "regs/stack": resources(b, l, heads, dh, dtype, dot_precision, direction, block_m, warps)}
            try:
                fn, args = run_variant(ops, inp, direction, block_m, warps)
                got = fn(*args)
                got = {"o": got} if direction == "fwd" else {"dqkv": got}
                checked = compare(got, want[direction], tol)
                worst = max(r.rel for r in checked)
                nonfinite = sum(r.nonfinite for r in checked)
                row["rel_err"] = worst
                if nonfinite or worst > tol:
                    row["error"] = f"wrong: rel {worst:.1e}, {nonfinite} non-finite"
                elif not interpret:
                    t = time_calls(lambda i: fn(*args), settings)
                    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(format_row(row), flush=True)
        base = next((r for r in rows if r["direction"] == direction and r["default"]), None)
        if base and "median_ms" in base:
            for r in rows:
                if r["direction"] == direction and "median_ms" in r:
                    r["vs_default"] = base["median_ms"] / r["median_ms"]
    return rows


def format_row(r: dict) -> str:
    timing = (f"{r['median_ms']:8.4f} ms ({r['p20_ms']:.4f}-{r['p80_ms']:.4f})" if "median_ms" in r
              else r.get("error", f"checked (rel {r.get('rel_err', float('nan')):.1e}), not timed"))
    return (f"{r['dtype']:<14} {r['direction']:<4} BLOCK_M={r['block_m']:<3} warps={r['warps']}  "
            f"regs/stack {r['regs/stack']:<10} {timing}{'  default' if r['default'] else ''}")


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| dtype | dir | BLOCK_M | warps | regs/stack (sm_90) | median ms | p20-p80 | "
             "speed vs default | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = f"{r['median_ms']:.4f}" if "median_ms" in r else r.get("error", "not timed")
        spread = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if "median_ms" in r else ""
        vs = f"{r['vs_default']:.2f}x" if "vs_default" in r else ""
        lines.append(f"| {r['dtype']} | {r['direction']} | {r['block_m']} | {r['warps']} | {r['regs/stack']} | "
                     f"{med} | {spread} | {vs} | {'default' if r['default'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x65x8x32", help="BxLxHxDh (default: the product shape)")
    ap.add_argument("--dtype", nargs="+", default=["float32/ieee", "float32/tf32", "bfloat16"],
                    help="float32/ieee, float32/tf32, bfloat16, float16")
    ap.add_argument("--interpret", action="store_true", help="Triton's interpreter: check every variant, time none")
    ap.add_argument("--out", help="also write the tables as Markdown to this file")
    args = ap.parse_args(argv)
    try:
        shape = tuple(int(x) for x in args.shape.split("x"))
        assert len(shape) == 4
    except (ValueError, AssertionError):
        ap.error(f"--shape must be BxLxHxDh, got {args.shape!r}")
    if not args.interpret and jax.default_backend() != "gpu":
        print(f"tune_attention: no GPU (jax backend {jax.default_backend()!r}); pass --interpret to "
              "check the variants in Triton's interpreter without timing them", file=sys.stderr)
        return 2
    settings = timer_settings(jax.default_backend())
    info = device_info()
    title = (f"fused attention geometry, B,L,H,Dh = {shape}, {info.get('device', '?')}, "
             f"jax {jax.__version__}, triton {version('triton')}")
    print(title)
    tables, failed = [], 0
    for spec in args.dtype:
        name, _, dot_precision = spec.partition("/")
        dtype = jnp.dtype(name)
        with matmul_precision("fp32" if dtype == np.float32 else "bf16"):
            rows = tune(shape, dtype, dot_precision or "ieee", args.interpret, settings)
        failed += sum("error" in r and r["error"].startswith("wrong") for r in rows)
        tables.append(markdown(rows, spec))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# {title}\n\n" + "\n".join(tables))
        print(f"wrote {args.out}")
    if failed:
        print(f"{failed} variant(s) gave wrong results")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
