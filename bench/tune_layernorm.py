"""Tune the fused add+LayerNorm on a GPU: time other launch geometries of its kernels, each checked
against the reference first, beside the geometry kernels/layernorm.py picks today (its plan).

    python -m bench.tune_layernorm                                # product shape, float32
    python -m bench.tune_layernorm --shape product large --dtype fp32 bf16 --out tune-layernorm.md
    python -m bench.tune_layernorm --grid full --resources        # more variants; sm_90 registers
    python -m bench.tune_layernorm --interpret --shape quick       # CPU: checks only, nothing timed

Shapes are the bench's (bench/harness.py LN_SHAPES, B x L x D: quick 2x65x256, product
64x65x256, large 512x65x256) and ViT-S/16's and ViT-B/16's at 224 px (vit-s 128x197x384, vit-b
64x197x768). Per shape and dtype, one table of two modes (its mode column):
  fwd      the forward kernel with each (BLOCK_M rows, warps) of the grid
  fwd+bwd  the forward at its plan, then the backward with each (BLOCK_M, warps, at most G main
           programs, reduction columns): the backward's main kernel writes G partial rows of
           dgamma/dbeta, which cdiv(D, columns) reduction programs sum
Each variant runs the function of the bench's fused row (bench/test_bench_layernorm.py) on the
bench's inputs, is checked against the float32 reference (vit.layers) at the bench's tolerance, and
is timed as the bench times it: fresh input sets chained in one call (bench.timer.chain), so its
times compare with that row's and with the README's add+LN targets.

The tables give each variant's median ms (p20-p80), its bandwidth by harness.layernorm_bytes, and
its speed relative to the plan; with --resources, the registers and stack bytes per thread of the
main kernel's sm_90 compile (kernels.compile_check; no GPU needed). Nothing is written into the
product: the tables say what rule kernels.layernorm.geometry should have. It exits 1 when a
variant gives wrong numbers or the plan fails to run (a variant that fails to compile is only
reported). --out FILE is rewritten
after every shape and dtype, so a run cut short keeps what it timed; without it the tables are
printed at the end (each row is printed as it is timed either way).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp

from bench import harness
from bench.device import device_info, version
from bench.test_bench_layernorm import make_inputs, row_function
from bench.timer import chain, nbytes, rotation_count, time_calls, timer_settings
from bench.tuning import (mark_speed_vs_plan, sm90_regs_stack, tune_exit_status, tune_failures,
                          write_tables_so_far)
from kernels import layernorm
from kernels.launch import COMPILED, INTERPRETED
from oracle.compare import compare
from vit.ops import REFERENCE

MODES = ("fwd", "fwd+bwd")
GRIDS = {  # fwd: BLOCK_M x warps; fwd+bwd: BLOCK_M x warps x max programs x reduction columns
    "quick": {"fwd": ((2, 4, 8, 16), (2, 4, 8)),
              "fwd+bwd": ((4, 8, 16), (4, 8), (128, 256, 512), (32, 256))},
    "full": {"fwd": ((1, 2, 4, 8, 16, 32), (1, 2, 4, 8)),
             "fwd+bwd": ((2, 4, 8, 16, 32), (2, 4, 8), (64, 128, 256, 512, 1024), (32, 64, 256))},
}


@contextlib.contextmanager
def geometry(direction: str, setting: tuple[int, ...]):
    """Launches of `direction` ("fwd" or "bwd") traced inside take layernorm.make_geometry(m, n,
    *setting); the other direction keeps its plan."""
    default = layernorm.geometry

    def patched(m, n, launcher, direction_):
        if direction_ == direction:
            return layernorm.make_geometry(m, n, *setting)
        return default(m, n, launcher, direction_)

    layernorm.geometry = patched
    try:
        yield
    finally:
        layernorm.geometry = default


def plan_setting(m: int, n: int, mode: str, launcher) -> tuple[int, ...]:
    """The setting of kernels/layernorm.py's own geometry for the direction a mode tunes."""
    g = layernorm.geometry(m, n, launcher, "fwd" if mode == "fwd" else "bwd")
    if mode == "fwd":
        return g.block_m, g.num_warps
    return g.block_m, g.num_warps, launcher.reduce_programs, g.reduce_n


def label(mode: str, setting: tuple[int, ...]) -> str:
    if mode == "fwd":
        return "BLOCK_M={} warps={}".format(*setting)
    return "BLOCK_M={} warps={} G<={} red_cols={}".format(*setting)


def variants(m: int, n: int, mode: str, grid: str, launcher) -> list[tuple[int, ...]]:
    """The grid's settings of one mode and the plan's, without repeats: a setting that gives the
    same launches as another (a G or reduction width beyond what the shape can use) is left out."""
    out, seen = [], set()
    for setting in [plan_setting(m, n, mode, launcher), *itertools.product(*GRIDS[grid][mode])]:
        g = layernorm.make_geometry(m, n, *setting) if mode != "fwd" else \
            layernorm.make_geometry(m, n, *setting, launcher.reduce_programs, 256)
        key = g if mode != "fwd" else (g.block_m, g.num_warps)
        if g.block_m > layernorm.next_power_of_2(m) or key in seen:
            continue
        seen.add(key)
        out.append(setting)
    return out


def _traced(mode: str, setting: tuple[int, ...]):
    if mode == "fwd":
        return geometry("fwd", (*setting, 1, 256))
    return geometry("bwd", setting)


def function(mode: str, launcher):
    """The bench's fused row (test_bench_layernorm.row_function) on `launcher`, whichever geometry
    the override in force gives. Not kernels.fused_ops: that one wants the launcher to run here,
    and --resources and the tests trace COMPILED on a machine without a GPU."""
    ops = SimpleNamespace(
        add_layernorm_forward=functools.partial(layernorm.add_layernorm_forward, launcher=launcher),
        add_layernorm_backward=functools.partial(layernorm.add_layernorm_backward, launcher=launcher))
    return row_function(mode, ops)


def reference(mode: str):
    """The bench's reference row: the hand-written jnp add+LN."""
    return row_function(mode, REFERENCE)


def resources(mode: str, setting, args, launcher) -> str:
    """'regs/stack' of the tuned direction's main kernel compiled for sm_90, or the failure."""
    def trace():
        with _traced(mode, setting):
            jax.eval_shape(function(mode, launcher), *args)
    main = "vitfuse_ln_fwd" if mode == "fwd" else "vitfuse_ln_bwd"
    return sm90_regs_stack(trace, lambda specs: next(s for s in specs if s.name == main))


# ----------------------------------------------------------------------------------------------
# tuning one (shape, dtype): check, then time, every variant of both modes


def tune(shape: str, dtype: str, launcher, settings, grid="quick", with_resources=False) -> list[dict]:
    b, l, d = harness.LN_SHAPES[shape]
    m = b * l
    jdtype = harness.DTYPES[dtype]
    args = make_inputs(shape, jdtype, jax.random.PRNGKey(0))
    # the timed calls' fresh input sets (set 0 the checked one); the interpreter times nothing
    n_sets = rotation_count(nbytes(args)) if launcher.on_gpu else 1
    sets = [args] + [make_inputs(shape, jdtype, jax.random.PRNGKey(i)) for i in range(1, n_sets)]
    args32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), args)
    tol = harness.tolerance(dtype, "fused")
    rows = []
    for mode in MODES:
        want = jax.block_until_ready(harness.compile_fn(reference(mode), args32, "fp32")(*args32))
        planned = plan_setting(m, d, mode, launcher)
        for setting in variants(m, d, mode, grid, launcher):
            row = {"shape": harness.shape_label("layernorm", shape), "dtype": dtype, "mode": mode,
                   "variant": label(mode, setting), "setting": setting, "planned": setting == planned}
            if with_resources:
                row["regs/stack"] = resources(mode, setting, args, COMPILED)
            _check_and_time(row, mode, setting, sets, want, tol, launcher, settings)
            if "median_ms" in row:
                row["gb_s"] = harness.layernorm_bytes(m, d, jnp.dtype(jdtype).itemsize, mode) / (
                    row["median_ms"] * 1e6)
            rows.append(row)
            print(format_row(row), flush=True)
        mark_speed_vs_plan([r for r in rows if r["mode"] == mode])
    return rows


def _check_and_time(row, mode, setting, sets, want, tol, launcher, settings):
    """Checked first on set 0, alone and again as the first of the chained call; then timed."""
    try:
        with _traced(mode, setting):  # traced and compiled inside the override
            fn = function(mode, launcher)
            single = harness.compile_fn(fn, sets[0], row["dtype"])
            timed = harness.compile_fn(chain(fn, len(sets)), tuple(sets), row["dtype"]) \
                if launcher.on_gpu else None
        got = [jax.block_until_ready(single(*sets[0]))]
        if timed is not None:
            got.append(jax.block_until_ready(timed(*sets))[0])
        runs = [compare(out, want, tol) for out in got]  # one list of per-output rows per call
        checked = [r for run in runs for r in run]
        row["rel_err"] = max(r.rel for r in checked)
        if not all(r.ok for r in checked):
            # the worst call's count: on a GPU both calls are of set 0, so a sum would double it
            nonfinite = max(sum(r.nonfinite for r in run) for run in runs)
            row["error"] = f"wrong: rel {row['rel_err']:.1e}, {nonfinite} non-finite"
        elif timed is not None:  # the interpreter's times say nothing about the kernels
            t = time_calls(lambda i: timed(*sets), settings)
            k = len(sets)
            row.update(median_ms=t.median_ms / k, p20_ms=t.p20_ms / k, p80_ms=t.p80_ms / k)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ----------------------------------------------------------------------------------------------
# output


def format_row(r: dict) -> str:
    timing = (f"{r['median_ms']:8.4f} ms ({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) {r['gb_s']:6.0f} GB/s"
              if "median_ms" in r
              else r.get("error", f"checked (rel {r.get('rel_err', float('nan')):.1e}), not timed"))
    regs = f"  regs/stack {r['regs/stack']:<9}" if "regs/stack" in r else ""
    return (f"{r['dtype']:<5} {r['mode']:<8} {r['variant']:<38}{regs} {timing}"
            + ("  planned" if r["planned"] else ""))


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"## {title}", "", "| mode | variant | regs/stack (sm_90) | median ms | p20-p80 | GB/s | "
             "speed vs the plan | |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        med = f"{r['median_ms']:.4f}" if "median_ms" in r else r.get("error", "not timed")
        spread = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if "median_ms" in r else ""
        gbs = f"{r['gb_s']:.0f}" if "gb_s" in r else ""
        vs = f"{r['vs_plan']:.2f}x" if "vs_plan" in r else ""
        lines.append(f"| {r['mode']} | {r['variant']} | {r.get('regs/stack', '')} | {med} | {spread} | "
                     f"{gbs} | {vs} | {'planned' if r['planned'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune_layernorm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["product"], choices=sorted(harness.LN_SHAPES))
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(harness.DTYPES))
    ap.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    ap.add_argument("--resources", action="store_true", help="sm_90 registers/stack per variant")
    ap.add_argument("--interpret", action="store_true",
                    help="Triton's interpreter: check every variant, time none")
    ap.add_argument("--out", help="write the tables as Markdown to this file (else print them at the end)")
    args = ap.parse_args(argv)
    if not args.interpret and jax.default_backend() != "gpu":
        print(f"tune_layernorm: no GPU (jax backend {jax.default_backend()!r}); pass --interpret to "
              "check the variants in Triton's interpreter without timing them", file=sys.stderr)
        return 2
    launcher = INTERPRETED if args.interpret else COMPILED
    settings = timer_settings(jax.default_backend())
    device = device_info().get("device", "?")
    title = f"fused add+LayerNorm variants, {device}, jax {jax.__version__}, triton {version('triton')}"
    print(title)
    tables, failed, plans_broken = [], 0, 0
    pairs = list(itertools.product(args.shape, args.dtype))
    for shape, dtype in pairs:
        rows = tune(shape, dtype, launcher, settings, args.grid, args.resources)
        wrong, broken = tune_failures(rows)
        failed, plans_broken = failed + wrong, plans_broken + broken
        tables.append(markdown(rows, f"{harness.shape_label('layernorm', shape)}, {dtype}"))
        if args.out:  # after every shape and dtype: a run cut short keeps what it timed
            write_tables_so_far(Path(args.out), title, tables, len(pairs))
            print(f"wrote {args.out} ({len(tables)} of {len(pairs)})")
    if not args.out:  # the tables, as --out would have written them, for a log to keep
        print("\n" + "\n".join(tables), end="")
    return tune_exit_status(failed, plans_broken)


if __name__ == "__main__":
    sys.exit(main())
