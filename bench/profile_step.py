"""Where a training step's GPU time goes, kernel by kernel, measured with Nsight Compute (ncu).

Run one step under ncu (bench/gpu.sh's "profile" part does this for the reference and the fused
step), then summarise the CSV it wrote:

    ncu --profile-from-start off --clock-control none --print-units base --csv --page raw \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \\
        --log-file ncu-fused.csv python -m bench.profile_step run fused
    python -m bench.profile_step summarize ncu-fused.csv

`run` builds the step exactly as `pytest bench/ --benchmark` times it (bench/steps
.make_step; contenders reference, fused, autodiff, fused-attn, fused-ln, reference-bf16,
fused-bf16), runs three steps with the profiler off (the first compiles), then brackets the
profiled steps with cudaProfilerStart/Stop, so ncu sees only them (not XLA's compile-time
autotuning). `summarize` totals time and DRAM bytes per kernel and per kind (our Triton kernels,
library GEMMs, XLA's fusions). Kernel times under ncu are serialised, one kernel at a time, so
their sum is the step's GPU work without overlap or launch gaps; compare it with the benchmark's
median to see how much of the step is not kernel time.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import glob
import os
import re
import sys
from collections import defaultdict

from cmdline import positive_int

METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
           "launch__registers_per_thread")
OUR_KERNELS = re.compile(r"^_(attn_fwd|attn_bwd|flash_fwd|flash_bwd_delta|flash_bwd|ln_fwd|ln_bwd|"
                         r"ln_bwd_reduce)(_poisoned)?$")
GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|cudnn|sm\d\d_", re.I)


def _cudart():
    """The CUDA runtime library JAX loaded (for cudaProfilerStart/Stop), or None."""
    names = [ctypes.util.find_library("cudart")]
    for base in sys.path:
        names += sorted(glob.glob(os.path.join(base, "nvidia", "**", "libcudart.so*"), recursive=True))
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            lib.cudaProfilerStart, lib.cudaProfilerStop  # noqa: B018  (both must exist)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def run(contender: str, steps: int) -> int:
    import jax  # noqa: PLC0415

    from bench import harness  # noqa: PLC0415
    from bench.steps import make_batch, make_step  # noqa: PLC0415
    from kernels import COMPILED  # noqa: PLC0415
    import vit  # noqa: PLC0415

    if jax.default_backend() != "gpu":
        print(f"profile_step: needs a GPU (jax backend {jax.default_backend()!r})", file=sys.stderr)
        return 2
    config = vit.ViTConfig()
    params = vit.init_params(jax.random.PRNGKey(0), config)
    state = [params, vit.adamw_init(params)]
    images, labels = make_batch(config, harness.STEP_BATCH["product"], jax.random.PRNGKey(1))
    step = make_step(contender, config, COMPILED)  # donates params and state: fresh ones
    for i in range(3):  # compile + warm-up, profiler off
        state[0], state[1], metrics = step(state[0], state[1], images, labels, jax.random.PRNGKey(i))
    jax.block_until_ready(metrics)
    lib = _cudart()
    if lib is None:
        print("profile_step: libcudart not found; ncu will see nothing with --profile-from-start off",
              file=sys.stderr)
        return 1
    lib.cudaProfilerStart()
    for i in range(steps):
        state[0], state[1], metrics = step(state[0], state[1], images, labels, jax.random.PRNGKey(10 + i))
    jax.block_until_ready(metrics)
    lib.cudaProfilerStop()
    print(f"profile_step: {contender}, {steps} step(s) of batch {harness.STEP_BATCH['product']} profiled; "
          f"loss {float(metrics['loss']):.4f}")
    return 0


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_ncu_csv(path: str) -> list[dict]:
    """Rows {"name", "ns", "bytes", "regs"} of an `ncu --csv --page raw --print-units base` log
    (ncu's own "==PROF==" lines and the units row are skipped)."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and not line.startswith("==")]
    table = list(csv.reader(lines))
    if not table:
        return []
    header = table[0]
    try:
        name_col = header.index("Kernel Name")
        cols = {m: header.index(m) for m in METRICS}
    except ValueError as e:
        raise ValueError(f"{path}: not an ncu raw CSV with the metrics {METRICS}: {e}") from None
    rows = []
    for rec in table[1:]:
        if len(rec) < len(header):
            continue
        ns = _number(rec[cols["gpu__time_duration.sum"]])
        if ns is None:  # the units row
            continue
        read, write = (_number(rec[cols[m]]) or 0.0 for m in METRICS[1:3])
        rows.append({"name": rec[name_col], "ns": ns, "bytes": read + write,
                     "regs": _number(rec[cols["launch__registers_per_thread"]])})
    return rows


def kind_of(name: str) -> str:
    short = name.split("(")[0].split("<")[0].strip()
    if OUR_KERNELS.match(short):
        return "vitfuse Triton kernels"
    if GEMM.search(name):
        return "library GEMM/conv (cuBLAS, cuDNN, CUTLASS)"
    return "XLA fusions and copies"


def summarize(path: str, top: int = 20) -> str:
    rows = read_ncu_csv(path)
    if not rows:
        return f"{path}: no kernels profiled"
    total_ns = sum(r["ns"] for r in rows)
    by_kind, by_name = defaultdict(lambda: [0, 0.0, 0.0]), defaultdict(lambda: [0, 0.0, 0.0, None])
    for r in rows:
        for table, key in ((by_kind, kind_of(r["name"])), (by_name, r["name"].split("(")[0][:80])):
            entry = table[key]
            entry[0] += 1
            entry[1] += r["ns"]
            entry[2] += r["bytes"]
        by_name[r["name"].split("(")[0][:80]][3] = r["regs"]
    out = [f"{os.path.basename(path)}: {len(rows)} kernels, {total_ns / 1e3:.1f} us of kernel time "
           f"(serialised), {sum(r['bytes'] for r in rows) / 1e6:.1f} MB DRAM traffic", "",
           f"{'kind':<46} {'kernels':>7} {'us':>10} {'share':>6} {'MB':>9}"]
    for kind, (n, ns, b) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        out.append(f"{kind:<46} {n:>7} {ns / 1e3:>10.1f} {100 * ns / total_ns:>5.1f}% {b / 1e6:>9.1f}")
    out += ["", f"top {top} kernels by time:", f"{'kernel':<80} {'calls':>5} {'us':>9} {'share':>6} "
            f"{'GB/s':>7} {'regs':>4}"]
    for name, (n, ns, b, regs) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        gbs = b / ns if ns else 0.0  # bytes per ns = GB/s
        out.append(f"{name:<80} {n:>5} {ns / 1e3:>9.1f} {100 * ns / total_ns:>5.1f}% {gbs:>7.0f} "
                   f"{'-' if regs is None else int(regs):>4}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run profiled step(s) (under ncu)")
    r.add_argument("contender", choices=["reference", "fused", "autodiff", "fused-attn", "fused-ln",
                                         "reference-bf16", "fused-bf16"])
    r.add_argument("--steps", type=positive_int, default=1)
    s = sub.add_parser("summarize", help="totals per kernel and kind of an ncu CSV")
    s.add_argument("csv")
    s.add_argument("--top", type=positive_int, default=20)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args.contender, args.steps)
    try:
        print(summarize(args.csv, args.top))
    except (OSError, ValueError) as e:
        print(f"profile_step summarize: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
