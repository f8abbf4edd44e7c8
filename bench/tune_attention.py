"""Tune the fused attention on a GPU: time every launch variant of both kernels, each checked
against the reference first, and write the winners into the dispatcher's table
(kernels/attention_table.json, read by kernels/dispatch.py).

    python -m bench.tune_attention                                  # product shape and ViT-B/16 at 224 px
    python -m bench.tune_attention --shape 64x197x12x64 --dtype bfloat16 --table kernels/attention_table.json
    python -m bench.tune_attention --grid quick                     # fewer key-blocked variants
    python -m bench.tune_attention --interpret --shape 1x17x2x16    # CPU: checks only, nothing timed

Per shape, dtype and direction (fwd, bwd) the variants are
  one-tile     kernels/attention.py with each (BLOCK_M query rows per step, warps); the one its
               geometry() picks is marked "default" (where the one-tile kernel runs at all)
  key-blocked  kernels/flash_attention.py with each Blocks(block_m, block_n, warps, stages) of the
               grid, and its default_blocks (marked "default")
Each variant is checked (oracle/compare.py tolerance), then timed (bench/timer.py). The table
row for a (device, dtype, head dim, direction, max_len = L) is the faster of the one-tile kernel
at its default geometry (the table cannot change that geometry) and the fastest key-blocked
variant. --table merges those rows into the file (replacing rows with the same key); only timed
results are written, so --interpret never writes a table. Both --table and --out are rewritten
after every shape and dtype, so a run cut short keeps what it timed.

Exits 1 when a variant gives wrong numbers or the dispatcher's plan fails to run (a variant that
fails to compile is only reported). Prints a line per variant as it is timed: median ms
(p20-p80), "default" / "planned" marks, and with --resources the registers and stack bytes per
thread of the sm_90 compile (as kernels.compile_check reads them). --out FILE writes a Markdown
table per shape and dtype (both directions, a dir column) that adds each variant's speed relative
to the dispatcher's current plan.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.device import device_info, version
from bench.harness import matmul_precision
from bench.timer import time_calls, timer_settings
from bench.tuning import (mark_speed_vs_plan, sm90_regs_stack, tune_exit_status, tune_failures,
                          write_tables_so_far)
from kernels import attention, dispatch, flash_attention
from kernels.flash_attention import Blocks
from kernels.launch import COMPILED, INTERPRETED
from oracle.compare import compare, kernel_tolerance
from oracle.kernel_gradcheck import attention_inputs
from vit.data.cache import write_text_atomic
from vit.ops import REFERENCE

ONE_TILE_WARPS = (4, 8)
ONE_TILE_ROWS = (16, 32, 64)
GRIDS = {  # key-blocked variants: block_m x block_n x warps x stages
    "full": ((32, 64, 128), (16, 32, 64), (4, 8), (2,)),
    "quick": ((64, 128), (32, 64), (4, 8), (2,)),
}
DEFAULT_SHAPES = ("64x65x8x32", "64x197x12x64")  # the product; ViT-B/16 at 224 px


@contextlib.contextmanager
def geometry(direction: str, block_m: int, warps: int):
    """One-tile launches of `direction` ("fwd" or "bwd") traced inside use BLOCK_M rows and `warps`."""
    default = attention.geometry

    def patched(*args, **kwargs):
        consts, num_warps = default(*args, **kwargs)
        if kwargs["direction"] == direction:
            consts, num_warps = dict(consts, BLOCK_M=block_m), warps
        return consts, num_warps

    attention.geometry = patched
    try:
        yield
    finally:
        attention.geometry = default


def default_geometry(l, heads, dh, dtype, dot_precision, direction) -> tuple[int, int]:
    consts, warps = attention.geometry(l, heads * dh, heads, dtype, COMPILED, dot_precision,
                                       direction=direction)
    return consts["BLOCK_M"], warps


# ----------------------------------------------------------------------------------------------
# variants: (kernel, label, setting); setting is (BLOCK_M, warps) for one-tile, Blocks otherwise


def variants(l, dh, dtype, dot_precision, direction, grid, launcher):
    """[(kernel, label, setting)] of one direction: the one-tile kernel's geometries (where it
    runs) and the key-blocked kernel's grid plus its default blocks."""
    out = []
    if dispatch.one_tile_runs(l, dh, dtype, launcher, dot_precision):
        block_l = max(16, attention.next_power_of_2(l))
        for block_m, warps in itertools.product(ONE_TILE_ROWS, ONE_TILE_WARPS):
            if block_m <= block_l:
                out.append(("one-tile", f"BLOCK_M={block_m} warps={warps}", (block_m, warps)))
    default = flash_attention.default_blocks(l, dh, dtype, dot_precision, direction)
    blocks = {default}
    for m, n, w, s in itertools.product(*GRIDS[grid]):
        blocks.add(Blocks(m, n, w, s).fit(l))
    for b in sorted(blocks, key=lambda b: (b.block_m, b.block_n, b.num_warps, b.num_stages)):
        out.append(("key-blocked", f"{b.block_m}x{b.block_n} warps={b.num_warps} stages={b.num_stages}", b))
    return out


def _functions(kernel, setting, direction, heads, launcher, dot_precision):
    """(forward(qkv), backward(cache, do)) of one variant; only `direction` takes the setting."""
    launch = dict(launcher=launcher, dot_precision=dot_precision)
    if kernel == "key-blocked":
        fwd_blocks = setting if direction == "fwd" else None
        bwd_blocks = setting if direction == "bwd" else None
        return (lambda qkv: flash_attention.attention_forward(qkv, heads, blocks=fwd_blocks, **launch),
                lambda cache, do: flash_attention.attention_backward(cache, do, blocks=bwd_blocks, **launch))
    return (lambda qkv: attention.attention_forward(qkv, heads, **launch),
            lambda cache, do: attention.attention_backward(cache, do, **launch))


def _traced(kernel, setting, direction):
    """A context to trace a variant in: a one-tile setting patches attention.geometry meanwhile."""
    if kernel == "one-tile":
        return geometry(direction, *setting)
    return contextlib.nullcontext()


def resources(kernel, setting, direction, b, l, heads, dh, dtype, dot_precision) -> str:
    """'regs/stack' of the variant's sm_90 compile (no GPU needed), or the failure."""
    fwd, bwd = _functions(kernel, setting, direction, heads, COMPILED, dot_precision)
    qkv = jax.ShapeDtypeStruct((b, l, 3 * heads * dh), dtype)

    def trace():
        def run(q):
            o, cache = fwd(q)
            return bwd(cache, o)

        with _traced(kernel, setting, direction):
            jax.eval_shape(run, qkv)
    # the main kernel of the direction
    return sm90_regs_stack(trace, lambda specs: specs[-1] if direction == "bwd" else specs[0])


# ----------------------------------------------------------------------------------------------
# tuning one (shape, dtype): check, then time, every variant of both directions


def tune(shape, dtype, dot_precision, launcher, settings, grid="full", with_resources=False):
    b, l, heads, dh = shape
    inp = attention_inputs(jax.random.PRNGKey(0), b, l, heads, dh, False, dtype)
    inp32 = {k: v.astype(jnp.float32) if hasattr(v, "astype") else v for k, v in inp.items()}
    o_ref, cache_ref = jax.jit(lambda qkv: REFERENCE.attention_forward(qkv, heads))(inp32["qkv"])
    want = {"fwd": {"out": o_ref}, "bwd": {"out": REFERENCE.attention_backward(cache_ref, inp32["do"])}}
    tol = kernel_tolerance(dtype, dot_precision)
    name = dispatch.dtype_key(dtype, dot_precision)
    rows = []
    for direction in ("fwd", "bwd"):
        plan = dispatch.plan(l, dh, dtype, dot_precision, direction, launcher)
        one_tile_default = default_geometry(l, heads, dh, dtype, dot_precision, direction)
        key_default = flash_attention.default_blocks(l, dh, dtype, dot_precision, direction)
        planned_setting = one_tile_default if plan.kernel == "one-tile" else plan.blocks
        for kernel, label, setting in variants(l, dh, dtype, dot_precision, direction, grid, launcher):
            default = setting == (one_tile_default if kernel == "one-tile" else key_default)
            row = {"shape": "x".join(map(str, shape)), "dtype": name, "direction": direction,
                   "kernel": kernel, "variant": label, "setting": setting, "default": default,
                   "planned": kernel == plan.kernel and setting == planned_setting}
            if with_resources:
                row["regs/stack"] = resources(kernel, setting, direction, b, l, heads, dh, dtype,
                                              dot_precision)
            _check_and_time(row, kernel, setting, direction, heads, inp, want[direction], tol,
                            launcher, dot_precision, settings)
            rows.append(row)
            print(format_row(row), flush=True)
        mark_speed_vs_plan([r for r in rows if r["direction"] == direction])
    return rows


def _check_and_time(row, kernel, setting, direction, heads, inp, want, tol, launcher,
                    dot_precision, settings):
    fwd, bwd = _functions(kernel, setting, direction, heads, launcher, dot_precision)
    try:
        with _traced(kernel, setting, direction):
            if direction == "fwd":
                fn, args = jax.jit(lambda qkv: fwd(qkv)[0]), (inp["qkv"],)
            else:
                cache = jax.jit(fwd)(inp["qkv"])[1]
                fn, args = jax.jit(bwd), (cache, inp["do"])
            got = jax.block_until_ready(fn(*args))  # compiled inside the override
        checked = compare({"out": got}, want, tol)
        row["rel_err"] = max(r.rel for r in checked)
        nonfinite = sum(r.nonfinite for r in checked)
        if not all(r.ok for r in checked):
            row["error"] = f"wrong: rel {row['rel_err']:.1e}, {nonfinite} non-finite"
        elif launcher.on_gpu:  # the interpreter's times say nothing about the kernels
            t = time_calls(lambda i: fn(*args), settings)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ----------------------------------------------------------------------------------------------
# the dispatcher's table


def table_rows(rows: list[dict], device: str) -> list[dict]:
    """Per (dtype, direction) of one shape: the faster of the one-tile kernel at its default
    geometry and the fastest key-blocked variant, as a kernels/attention_table.json row."""
    out = []
    for (dtype, direction), group in itertools.groupby(rows, key=lambda r: (r["dtype"], r["direction"])):
        timed = [r for r in group if "median_ms" in r and (r["kernel"] == "key-blocked" or r["default"])]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["median_ms"])
        _, l, _, dh = (int(x) for x in best["shape"].split("x"))
        # a one-tile row's block fields are ignored (its geometry is attention.geometry's)
        blocks = best["setting"] if best["kernel"] == "key-blocked" else Blocks(16, 16, 4, 1)
        out.append({"device": device, "dtype": dtype, "dh": dh, "direction": direction,
                    "max_len": l, "kernel": best["kernel"], "block_m": blocks.block_m,
                    "block_n": blocks.block_n, "num_warps": blocks.num_warps,
                    "num_stages": blocks.num_stages,
                    "note": f"bench.tune_attention at B,L,H,Dh = {best['shape']}: "
                            f"{best['median_ms']:.4f} ms ({best['variant']})"})
    return out


def write_table(path: Path, new_rows: list[dict]) -> None:
    """Merge new_rows into the table at path (rows with the same key are replaced)."""
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    key = lambda r: (r["device"], r["dtype"], r["dh"], r["direction"], r["max_len"])  # noqa: E731
    replaced = {key(r) for r in new_rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in replaced] + new_rows
    data["rows"].sort(key=key)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")  # rewritten during a run: whole or not at all
    dispatch.load_table(path)  # the file must still be a valid table


# ----------------------------------------------------------------------------------------------
# output


def format_row(r: dict) -> str:
    timing = (f"{r['median_ms']:8.4f} ms ({r['p20_ms']:.4f}-{r['p80_ms']:.4f})" if "median_ms" in r
              else r.get("error", f"checked (rel {r.get('rel_err', float('nan')):.1e}), not timed"))
    marks = ("  default" if r["default"] else "") + ("  planned" if r["planned"] else "")
    regs = f"  regs/stack {r['regs/stack']:<9}" if "regs/stack" in r else ""
    return f"{r['dtype']:<13} {r['direction']:<4} {r['kernel']:<12} {r['variant']:<28}{regs} {timing}{marks}"


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| dtype | dir | kernel | variant | regs/stack (sm_90) | median ms | "
             "p20-p80 | speed vs the plan | |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = f"{r['median_ms']:.4f}" if "median_ms" in r else r.get("error", "not timed")
        spread = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if "median_ms" in r else ""
        vs = f"{r['vs_plan']:.2f}x" if "vs_plan" in r else ""
        marks = " ".join(m for m, on in (("default", r["default"]), ("planned", r["planned"])) if on)
        lines.append(f"| {r['dtype']} | {r['direction']} | {r['kernel']} | {r['variant']} | "
                     f"{r.get('regs/stack', '')} | {med} | {spread} | {vs} | {marks} |")
    return "\n".join(lines) + "\n"


def _parse_shape(text: str, ap) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4:
        ap.error(f"--shape must be BxLxHxDh, got {text!r}")
    try:
        attention.check_shape(*shape)
    except ValueError as err:
        ap.error(f"--shape {text}: {err}")
    return shape


DTYPE_SPECS = ("float32/ieee", "float32/tf32", "float32/tf32x3", "bfloat16", "float16")


def _parse_dtype(text: str, ap) -> str:
    """'float32' is float32/ieee; a dot precision goes with float32 only."""
    spec = "float32/ieee" if text == "float32" else text
    if spec not in DTYPE_SPECS:
        ap.error(f"--dtype {text}: pick from {', '.join(DTYPE_SPECS)}")
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=list(DEFAULT_SHAPES), help="BxLxHxDh ...")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32/ieee"],
                    help=", ".join(DTYPE_SPECS))
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full", help="key-blocked variants")
    ap.add_argument("--resources", action="store_true", help="sm_90 registers/stack per variant")
    ap.add_argument("--interpret", action="store_true", help="Triton's interpreter: check every variant, time none")
    ap.add_argument("--table", help="merge the winners into this dispatcher table (e.g. kernels/attention_table.json)")
    ap.add_argument("--out", help="also write the tables as Markdown to this file")
    args = ap.parse_args(argv)
    shapes = [_parse_shape(s, ap) for s in args.shape]
    args.dtype = [_parse_dtype(d, ap) for d in args.dtype]
    if not args.interpret and jax.default_backend() != "gpu":
        print(f"tune_attention: no GPU (jax backend {jax.default_backend()!r}); pass --interpret to "
              "check the variants in Triton's interpreter without timing them", file=sys.stderr)
        return 2
    if args.table and args.interpret:
        ap.error("--table needs timings: the interpreter times nothing")
    launcher = INTERPRETED if args.interpret else COMPILED
    settings = timer_settings(jax.default_backend())
    device = device_info().get("device", "?")
    title = f"fused attention variants, {device}, jax {jax.__version__}, triton {version('triton')}"
    print(title)
    tables, failed, plans_broken, new_rows = [], 0, 0, []
    pairs = list(itertools.product(shapes, args.dtype))
    for shape, spec in pairs:
        name, _, dot_precision = spec.partition("/")
        dtype = jnp.dtype(name)
        with matmul_precision("fp32" if dtype == np.float32 else "bf16"):
            rows = tune(shape, dtype, dot_precision or "ieee", launcher, settings, args.grid,
                        args.resources)
        wrong, broken = tune_failures(rows)
        failed, plans_broken = failed + wrong, plans_broken + broken
        tables.append(markdown(rows, f"B,L,H,Dh = {shape}, {spec}"))
        new_rows += table_rows(rows, jax.devices()[0].device_kind)
        # written after every shape and dtype: a run cut short (a timeout) keeps what it timed
        if args.out:
            write_tables_so_far(Path(args.out), title, tables, len(pairs))
            print(f"wrote {args.out} ({len(tables)} of {len(pairs)})")
        if args.table and new_rows:
            write_table(Path(args.table), new_rows)
            print(f"merged {len(new_rows)} row(s) into {args.table}")
    return tune_exit_status(failed, plans_broken)


if __name__ == "__main__":
    sys.exit(main())
