"""The machinery every benchmark shares: shapes, checks, the timer, the device's measured peaks, the
FLOP and byte formulas, and the results files. conftest.py wires it into pytest (``--benchmark``);
the tests in bench/test_bench_*.py build the contenders.

Validate first, then time (llm.c dev/cuda style): every contender's outputs (and gradients) are
compared with the reference on the same fresh random inputs before it gets a timing; a wrong fast
kernel fails its test and gets no number.

Timing: each contender is jit-compiled ahead of time (``jax.jit(fn).lower(...).compile()``, under
``jax.default_matmul_precision("highest")`` for float32 rows, so XLA's dots and the kernels' ieee
dots agree). For the attention and LayerNorm groups the timed executable applies the op to k fresh
random input sets in sequence (``chain``: up to ``ROTATE_BYTES`` of inputs, so nothing runs from a
warm cache, and one dispatch per k ops, so a 10-microsecond kernel is not timed at the host's
dispatch rate); its output on the checked set is checked again. The train step carries its state
from call to call and cycles through up to 16 fresh image batches. After one warm-up call each *sample* is
``n`` back-to-back calls (asynchronous dispatch) followed by one ``jax.block_until_ready`` on all
their results, divided by ``n`` (and by k); ``n`` is calibrated so a sample lasts
~``target_sample_s``. Median, 20th and 80th percentile over the samples.

Shapes: B batch, L tokens, H heads, Dh head width, D = H * Dh; LayerNorm on M = B * L rows of D.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ----------------------------------------------------------------------------------------------
# shapes: "quick" is what the checks use without --benchmark (and what the interpreter is checked
# at under --benchmark on a CPU); "product" is ViTConfig() at the product batch; "large" B=512.

ATTN_SHAPES = {"quick": (2, 65, 8, 32), "product": (64, 65, 8, 32), "large": (512, 65, 8, 32)}
LN_SHAPES = {"quick": (2, 65, 256), "product": (64, 65, 256), "large": (512, 65, 256)}
STEP_BATCH = {"quick": 4, "product": 64, "large": 512}
TIMED_SHAPES = ("product", "large")
EPOCH_IMAGES = 100_000  # one Tiny ImageNet training epoch

# fresh random input sets per timed call, until this many bytes (more than any L2 holds)
ROTATE_BYTES = 128 << 20
MAX_ROTATE_SETS = 16

# Checks: rel = max|got - want| / max|want| per tensor (meaningful where elementwise relative
# errors are not, at near-zero entries), and no non-finite value.
#   float32, ieee dots: kernels.gradcheck uses 1e-5 at its shapes; here column sums run over up
#     to 33,280 rows (LN dgamma at B=512) where summation order alone moves fp32 by ~eps*sqrt(M)
#   float32, tf32 dots: 10 mantissa bits, 2^-11 per product
#   bfloat16: inputs rounded to bf16, compared with the fp32 reference on the same rounded
#     inputs; outputs, P and dS rounded to 8 mantissa bits on the way
#   train step: loss and every gradient after 8 blocks (fp32)
# "bf16 step": a whole bf16 training step against the fp32 one compounds bf16 rounding through
# every layer, forward and backward; per-tensor errors seen on the tiny ViT: up to 2.3e-2 over 12
# seeds and 3.1e-2 once in CI (the bf16 tests in tests/test_precision.py bound the global norm).
TOLERANCE = {"float32": 3e-5, "tf32": 5e-3, "bfloat16": 3e-2, "step": 1e-4, "bf16 step": 6e-2}

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def tolerance_key(dtype: str, contender: str) -> str:
    if dtype == "bf16":
        return "bfloat16"
    return "tf32" if contender.endswith("tf32") else "float32"


# ----------------------------------------------------------------------------------------------
# device and versions


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info() -> dict:
    """backend, the device's name, a file-name slug ('cpu', 'nvidia-h100-80gb-hbm3') and versions."""
    backend = jax.default_backend()
    dev = jax.devices()[0]
    if backend == "cpu":
        name = f"cpu ({os.cpu_count()} cores, {_cpu_model()})"
        slug = "cpu"
    else:
        name = dev.device_kind
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or backend
    return {
        "backend": backend,
        "device": name,
        "device_slug": slug,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "triton": _version("triton"),
        "jax_triton": _version("jax-triton"),
    }


def fused_interpreted() -> bool:
    """The fused kernels run in Triton's interpreter wherever there is no GPU."""
    return jax.default_backend() != "gpu"


def matmul_precision(dtype: str):
    """float32 rows: full-precision dots for XLA ("highest"; TF32 otherwise on recent GPUs), to
    match the kernels' ieee dots. Half-precision rows keep XLA's default."""
    if dtype == "fp32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def compile_fn(fn, args, dtype: str):
    """Ahead-of-time jit: tracing, lowering and compilation all happen here, under the row's
    matmul precision, and never inside a timed call."""
    with matmul_precision(dtype):
        return jax.jit(fn).lower(*args).compile()


# What XLA compiled: device kernels per call and XLA's own count of the bytes they touch. The
# "why" beside a time: an op that runs in fewer kernels makes fewer passes over memory.

_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier",
                "after-all", "partition-id", "replica-id", "add-dependency"}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:to_apply|calls)=%?([\w.\-]+)")


def _opcode(rhs: str) -> str:
    """The opcode of an HLO instruction's right-hand side ('f32[2]{0} fusion(...)', or a tuple shape)."""
    if rhs.startswith("("):  # tuple-shaped result: skip the balanced parentheses
        depth = 0
        for i, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                rhs = rhs[i + 1:]
                break
    else:
        rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
    return rhs.lstrip().split("(", 1)[0].strip()


def count_kernels(hlo_text: str) -> int:
    """Device operations one call of an optimized HLO module runs: each fusion, custom call
    (cuBLAS, cuDNN, a Triton kernel), copy or other non-trivial instruction of the entry
    computation counts 1; a `call` (e.g. a GPU command buffer) counts what it calls; async
    -done/-update halves are not counted again."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            inst = _INSTRUCTION.match(line)
            if inst:
                computations[current].append(inst.group(1))

    def count(name: str, depth: int = 0) -> int:
        total = 0
        for rhs in computations.get(name, []):
            op = _opcode(rhs)
            if op in _NOT_KERNELS or op.endswith("-done") or op.endswith("-update"):
                continue
            called = _CALLS.search(rhs)
            if op == "call" and called and depth < 8:
                total += count(called.group(1), depth + 1)
            else:
                total += 1
        return total

    return count(entry) if entry else 0


def executable_profile(compiled) -> dict:
    """{"kernels": device ops per call, "hlo_mbytes": XLA's cost analysis "bytes accessed" / 1e6
    (custom calls, such as our Triton kernels, count 0 there; None if XLA gives no figure)}."""
    kernels = count_kernels(compiled.as_text())
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mbytes = float(cost["bytes accessed"]) / 1e6
    except Exception:  # noqa: BLE001  (a backend without cost analysis: no figure, not an error)
        mbytes = None
    return {"kernels": kernels, "hlo_mbytes": mbytes}


# ----------------------------------------------------------------------------------------------
# checks


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path) or "out", leaf) for path, leaf in flat]


def compare(got, want) -> list[tuple[str, tuple, float, int]]:
    """Per tensor: (name, shape, rel, non-finite count); rel = max|got - want| / max|want|."""
    g, w = _leaves(got), _leaves(want)
    if [n for n, _ in g] != [n for n, _ in w]:
        raise AssertionError(f"output structure differs: {[n for n, _ in g]} vs {[n for n, _ in w]}")
    rows = []
    for (name, a), (_, b) in zip(g, w):
        a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
        b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shape {a.shape}, expected {b.shape}")
        nonfinite = int(np.sum(~np.isfinite(a)))
        diff = np.abs(np.where(np.isfinite(a), a, np.inf) - b)
        scale = float(np.abs(b).max()) if b.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        rows.append((name, b.shape, max_abs / scale if scale > 0 else max_abs, nonfinite))
    return rows


def assert_close(got, want, tol: float, what: str) -> float:
    """Raise AssertionError with a per-tensor table unless every tensor is finite and within
    ``tol``; return the worst rel."""
    rows = compare(got, want)
    bad = [r for r in rows if r[3] or not r[2] <= tol]
    if bad:
        table = "\n".join(f"  {n:<40} {str(s):<16} rel {rel:.3e} non-finite {nf}" for n, s, rel, nf in rows)
        raise AssertionError(f"{what}: differs from the reference (tol rel {tol:g}):\n{table}")
    return max((r[2] for r in rows), default=0.0)


# ----------------------------------------------------------------------------------------------
# the timer


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    calls_per_sample: int


@dataclass(frozen=True)
class TimerSettings:
    target_sample_s: float
    min_samples: int
    min_total_s: float
    max_total_s: float  # stop once past this with at least 3 samples
    max_inflight_bytes: int = 1 << 30  # results held until a sample's block_until_ready


def timer_settings(backend: str) -> TimerSettings:
    if backend == "cpu":
        return TimerSettings(target_sample_s=0.2, min_samples=5, min_total_s=1.0, max_total_s=20.0)
    return TimerSettings(target_sample_s=0.02, min_samples=15, min_total_s=0.5, max_total_s=10.0)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def time_calls(run, settings: TimerSettings, *, chained: bool = False) -> Timing:
    """run(i) -> arrays: the i-th call of a compiled, already-checked function. One warm-up call,
    then samples of n calls each (see the module doc). chained: each call consumes (donates) the
    previous call's result, so only the last result is waited on (it depends on all the others)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(0))
    first = time.perf_counter() - t0
    n = max(1, min(1000, math.ceil(settings.target_sample_s / max(first, 1e-6))))
    n = max(1, min(n, settings.max_inflight_bytes // max(1, _nbytes(out))))
    del out
    samples: list[float] = []
    i = 1
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        outs = [run(i + j) for j in range(n)]
        jax.block_until_ready(outs[-1] if chained else outs)
        samples.append((time.perf_counter() - t0) / n)
        del outs
        i += n
        elapsed = time.perf_counter() - start
        if len(samples) >= settings.min_samples and elapsed >= settings.min_total_s:
            break
        if elapsed >= settings.max_total_s and len(samples) >= 3:
            break
    med, p20, p80 = np.percentile(np.asarray(samples) * 1e3, [50, 20, 80])
    return Timing(float(med), float(p20), float(p80), len(samples), n)


def rotation_count(set_bytes: int) -> int:
    """How many distinct input sets the timed calls cycle through."""
    return max(1, min(MAX_ROTATE_SETS, math.ceil(ROTATE_BYTES / max(1, set_bytes))))


# ----------------------------------------------------------------------------------------------
# formulas (the same for every contender of a group: effective throughput of the work the op must
# do, so rows compare like with like even where an implementation does more or less)


def attention_flops(b: int, l: int, h: int, dh: int, mode: str) -> float:
    """fwd: QK^T and PV, 2 * (2 * B*H*L*L*Dh) = 4 B H L^2 Dh. bwd with recompute: QK^T again,
    dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, i.e. 5 matmuls = 2.5 x fwd; fwd+bwd = 3.5 x fwd."""
    fwd = 4.0 * b * h * l * l * dh
    return fwd if mode == "fwd" else 3.5 * fwd


def layernorm_bytes(m: int, n: int, itemsize: int, mode: str) -> float:
    """Bytes an add+LayerNorm must move at least (activations at itemsize, gamma/beta/statistics fp32):
    fwd reads x, r (2 M N s), gamma, beta (2 N 4); writes y (M N s), mean, rstd (2 M 4).
    bwd reads dy, x, r (3 M N s), gamma (N 4), mean, rstd (2 M 4); writes ds (M N s), dgamma, dbeta (2 N 4).
    fwd+bwd = the sum."""
    fwd = 3 * m * n * itemsize + 2 * n * 4 + 2 * m * 4
    bwd = 4 * m * n * itemsize + 3 * n * 4 + 2 * m * 4
    return float(fwd if mode == "fwd" else fwd + bwd)


FORMULAS = {
    "attention TFLOP/s": "fwd = 4*B*H*L^2*Dh FLOP (QK^T and PV); fwd+bwd = 3.5 x fwd (backward = 2.5 x "
                         "fwd with the QK^T recompute); the same count for every contender",
    "add+layernorm GB/s": "fwd = 3*M*D*s + 2*D*4 + 2*M*4 bytes (read x, r, gamma, beta; write y, mean, "
                          "rstd); bwd = 4*M*D*s + 3*D*4 + 2*M*4 (read dy, x, r, gamma, mean, rstd; write ds, "
                          "dgamma, dbeta); M = B*L rows, s = activation bytes; the same count for every "
                          "contender",
    "train step": f"images/s = B / median; epoch = {EPOCH_IMAGES:,} images / (images/s)",
    "% of peak": "against this session's measured peak: a large matmul's TFLOP/s at the row's "
                 "precision, or a large elementwise copy's GB/s (read + write)",
}


# ----------------------------------------------------------------------------------------------
# measured peaks


def measure_peaks(backend: str) -> dict:
    """A large matmul's TFLOP/s (fp32 at "highest"; on a GPU also tf32 and bf16) and a large
    elementwise copy's GB/s (y = x + 1: read + write), once per session."""
    settings = timer_settings(backend)
    gpu = backend != "cpu"
    peaks = {}
    key = jax.random.PRNGKey(0)
    cases = [("fp32", 4096 if gpu else 2048, jnp.float32, "highest")]
    if gpu:
        cases += [("tf32", 8192, jnp.float32, "tensorfloat32"), ("bf16", 8192, jnp.bfloat16, "default")]
    for name, n, dtype, precision in cases:
        sets = [tuple(jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in jax.random.split(kk))
                for kk in jax.random.split(key, 2)]
        with jax.default_matmul_precision(precision):
            f = jax.jit(lambda a, b: a @ b).lower(*sets[0]).compile()
        t = time_calls(lambda i: f(*sets[i % 2]), settings)
        peaks[f"matmul_{name}_tflop_s"] = 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12
        peaks[f"matmul_{name}_n"] = n
    # in place (donated), so no call pays for a fresh output buffer (on a CPU, a new 64 MiB
    # buffer's page faults cost more than the copy itself)
    n = (1 << 26) if gpu else (1 << 24)
    x = [jax.random.normal(key, (n,), jnp.float32)]
    f = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(x[0]).compile()

    def copy(i):
        x[0] = f(x[0])
        return x[0]
    t = time_calls(copy, settings, chained=True)
    peaks["copy_gb_s"] = 2.0 * n * 4 / (t.median_ms * 1e-3) / 1e9
    peaks["copy_mib"] = n * 4 >> 20
    return peaks


def peak_for(row: dict, peaks: dict) -> float | None:
    if row.get("tflop_s") is not None:
        which = "tf32" if row["contender"].endswith("tf32") else row["dtype"]
        p = peaks.get(f"matmul_{which}_tflop_s")
        return row["tflop_s"] / p if p else None
    if row.get("gb_s") is not None and peaks.get("copy_gb_s"):
        return row["gb_s"] / peaks["copy_gb_s"]
    return None


# ----------------------------------------------------------------------------------------------
# the session: rows as they come, then the results files


@dataclass
class BenchSession:
    timing: bool  # --benchmark
    seed: int
    info: dict = field(default_factory=device_info)
    rows: list = field(default_factory=list)
    peaks: dict | None = None
    started: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    merge: bool = False  # --bench-merge: keep rows of an earlier run (same device, same day)

    @property
    def backend(self) -> str:
        return self.info["backend"]

    @property
    def interpret(self) -> bool:
        return self.backend != "gpu"

    def key(self, *salt: str):
        """A fresh key per (session seed, case): every case draws its own random inputs."""
        h = zlib.crc32("/".join(salt).encode()) & 0x7FFFFFFF
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), h)

    def ensure_peaks(self) -> dict:
        """Measured once, on first use, and recorded as rows of the group "device peak"."""
        if self.peaks is None:
            self.peaks = measure_peaks(self.backend)
            for name in ("fp32", "tf32", "bf16"):
                if f"matmul_{name}_tflop_s" in self.peaks:
                    n = self.peaks[f"matmul_{name}_n"]
                    self.record(group="device peak", shape=f"{n}x{n}x{n}", contender=f"matmul {name}",
                                mode="peak", dtype=name, status="measured",
                                tflop_s=self.peaks[f"matmul_{name}_tflop_s"],
                                note=f"jnp.matmul of two {n}x{n} matrices, 2*n^3 FLOP")
            mib = self.peaks["copy_mib"]
            self.record(group="device peak", shape=f"{mib} MiB", contender="copy", mode="peak",
                        dtype="fp32", status="measured", gb_s=self.peaks["copy_gb_s"],
                        note=f"x = x + 1 in place (donated) on {mib} MiB of float32: bytes read + written")
        return self.peaks

    def record(self, **row) -> dict:
        base = dict(group=None, shape=None, contender=None, mode=None, dtype=None, status=None,
                    median_ms=None, p20_ms=None, p80_ms=None, speedup_vs_reference=None, gb_s=None,
                    tflop_s=None, frac_of_peak=None, images_s=None, epoch_s=None, check_rel_err=None,
                    samples=None, calls_per_sample=None, ops_per_call=None, kernels=None,
                    hlo_mbytes=None, note="", why=None)
        base.update(row)
        base.update(device=self.info["device"], backend=self.backend, jax=self.info["jax"],
                    jaxlib=self.info["jaxlib"], triton=self.info["triton"],
                    jax_triton=self.info["jax_triton"], seed=self.seed,
                    timestamp=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        self.rows.append(base)
        return base


def finalize(rows: list[dict], peaks: dict | None) -> list[dict]:
    """Speedups (reference median / row median within group, shape and dtype) and % of peak."""
    ref = {(r["group"], r["shape"], r["dtype"]): r["median_ms"] for r in rows
           if r["contender"] == "reference" and r["median_ms"]}
    for r in rows:
        base = ref.get((r["group"], r["shape"], r["dtype"]))
        if r["median_ms"] and base:
            r["speedup_vs_reference"] = base / r["median_ms"]
        if r["median_ms"] and peaks:
            r["frac_of_peak"] = peak_for(r, peaks)
    return rows


def _timed(rows, group, shape, contender, dtype):
    for r in rows:
        if (r["group"], r["shape"], r["contender"], r["dtype"]) == (group, shape, contender, dtype):
            return r
    return None


def evaluate_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the targets, at the product shape (they are GPU targets)."""
    out = []

    def check(target, group, kind, a_key, b_key, need, strict):
        """Row a must be `need` x as fast as row b (ratio = b / a >= need; strict: > need)."""
        shape = shape_label(kind, "product")
        a, b = _timed(rows, group, shape, *a_key), _timed(rows, group, shape, *b_key)
        for r, (name, dtype) in ((a, a_key), (b, b_key)):
            if r is None:
                out.append((target, "-", f"not evaluated: no {name} ({dtype}) row in this run"))
                return
            if not r["median_ms"]:
                why = r.get("why") or r["note"]
                out.append((target, "-", f"not evaluated: {name} ({dtype}) {r['status']}: {why}"))
                return
        ratio = b["median_ms"] / a["median_ms"]
        measured = (f"{a_key[0]} {a['median_ms']:.3f} ms vs {b_key[0]} {b['median_ms']:.3f} ms "
                    f"= {ratio:.2f}x")
        met = ratio > need if strict else ratio >= need
        verdict = "met" if met else f"missed by {need / ratio:.2f}x: {ratio:.2f}x where {need:g}x is needed"
        out.append((target, measured, verdict))

    check("fused attention fwd+bwd >= 2x faster than reference (fp32)",
          "attention fwd+bwd", "attention", ("fused", "fp32"), ("reference", "fp32"), 2.0, False)
    check("fused attention fwd+bwd no slower than dot_product_attention(cudnn) (bf16)",
          "attention fwd+bwd", "attention", ("fused", "bf16"), ("dpa-cudnn", "bf16"), 1.0, False)
    check("fused add+LN fwd+bwd >= 1.5x faster than reference (fp32)",
          "add+layernorm fwd+bwd", "layernorm", ("fused", "fp32"), ("reference", "fp32"), 1.5, False)
    check("fused add+LN fwd+bwd faster than autodiff (fp32)",
          "add+layernorm fwd+bwd", "layernorm", ("fused", "fp32"), ("autodiff", "fp32"), 1.0, True)
    check("train step --fused faster than the reference step (fp32)",
          "train step", "step", ("fused", "fp32"), ("reference", "fp32"), 1.0, True)
    check("train step --fused faster than the autodiff step (fp32)",
          "train step", "step", ("fused", "fp32"), ("autodiff", "fp32"), 1.0, True)
    return out


def shape_label(kind: str, name: str) -> str:
    if kind == "attention":
        b, l, h, dh = ATTN_SHAPES[name]
        return f"B={b} L={l} H={h} Dh={dh}"
    if kind == "layernorm":
        b, l, d = LN_SHAPES[name]
        return f"B={b} L={l} D={d} ({b * l}x{d})"
    return f"B={STEP_BATCH[name]}" + (" (tiny ViT)" if name == "quick" else " (ViT 8x256, 64x64 images)")


# ----------------------------------------------------------------------------------------------
# results files


GROUP_ORDER = ["device peak", "attention fwd", "attention fwd+bwd", "add+layernorm fwd",
               "add+layernorm fwd+bwd", "train step"]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_tables(rows: list[dict]) -> str:
    lines = []
    groups = sorted({r["group"] for r in rows}, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else 99)
    for g in groups:
        lines += [f"### {g}", ""]
        if g == "device peak":
            lines += ["| measurement | value | note |", "| --- | --- | --- |"]
            for r in (r for r in rows if r["group"] == g):
                value = f"{r['tflop_s']:.3f} TFLOP/s" if r["tflop_s"] is not None else f"{r['gb_s']:.1f} GB/s"
                lines.append(f"| {r['contender']} | {value} | {r['note']} |")
            lines.append("")
            continue
        step = g == "train step"
        metric = "images/s | epoch (100k img)" if step else ("TFLOP/s" if g.startswith("attention") else "GB/s")
        lines += [f"| shape | contender | dtype | median ms | p20-p80 ms | speedup vs ref | {metric} | % of peak "
                  "| kernels | XLA MB | note |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if step else "")
                  + " ---: | ---: | ---: | --- |"]
        for r in (r for r in rows if r["group"] == g):
            if r["median_ms"] is None:
                t = f"{r['status']}" if r["status"] else "-"
                lines.append(f"| {r['shape']} | {r['contender']} | {r['dtype']} | {t} | - | - | -"
                             + (" | -" if step else "") + f" | - | - | - | {r['note']} |")
                continue
            spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
            speed = _fmt(r["speedup_vs_reference"], ".2f") + ("x" if r["speedup_vs_reference"] else "")
            if step:
                m = f"{r['images_s']:.1f} | {r['epoch_s'] / 60:.1f} min"
            elif g.startswith("attention"):
                m = _fmt(r["tflop_s"], ".3f")
            else:
                m = _fmt(r["gb_s"], ".1f")
            frac = "-" if r["frac_of_peak"] is None else f"{100 * r['frac_of_peak']:.1f}%"
            kernels = _fmt(r.get("kernels"), "d")
            mbytes = _fmt(r.get("hlo_mbytes"), ".1f")
            lines.append(f"| {r['shape']} | {r['contender']} | {r['dtype']} | {r['median_ms']:.3f} | {spread} | "
                         f"{speed} | {m} | {frac} | {kernels} | {mbytes} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    info = meta["info"]
    out = [f"# vitfuse benchmarks: {info['device']}, {meta['date']}", "",
           f"`python -m pytest bench/ --benchmark` at {meta['started']}; python {info['python']}, "
           f"jax {info['jax']} (jaxlib {info['jaxlib']}), triton {info['triton']}, "
           f"jax-triton {info['jax_triton']}; input seed {meta['seed']}.", ""]
    if meta.get("machine_note"):
        out += [f"**{meta['machine_note']}**", ""]
    out += ["## Targets (GPU, product shape)", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    out += [f"| {t} | {m} | {v} |" for t, m, v in meta["targets"]]
    out += ["", "## Results", "", markdown_tables(rows), "## Method", ""]
    out += [f"- {line}" for line in meta["method"]]
    out += ["", "Formulas:", ""] + [f"- {k}: {v}" for k, v in FORMULAS.items()] + [""]
    return "\n".join(out)


METHOD = [
    "Validate first, then time: each contender's outputs and gradients are compared with the reference "
    "(vit.layers, float32) on the same fresh random inputs (rel = max|diff| / max|ref| per tensor; "
    "tolerances: fp32 3e-5, tf32 5e-3, bf16 3e-2 against the fp32 reference on the same bf16 inputs, "
    "train step 1e-4 on the loss and every gradient, 6e-2 for a bf16 step against the fp32 one); "
    "a contender that fails gets no timing.",
    "Each contender is jit-compiled ahead of time (float32 rows under "
    "jax.default_matmul_precision('highest'), matching the kernels' ieee dots). Attention and "
    "add+LN: the timed executable applies the op to k fresh random input sets in sequence (k up to "
    "16, up to 128 MiB of inputs, so no call runs from a warm cache; an optimization barrier between "
    "applications keeps XLA from fusing or reordering them; one dispatch per k ops), and is checked "
    "again on the first set; per-op time = call time / k. A sample is n back-to-back calls (async "
    "dispatch) and one jax.block_until_ready on all results, divided by n (n calibrated to ~20 ms "
    "per sample on a GPU, ~200 ms on a CPU), after one warm-up call; median and 20th/80th "
    "percentiles over the samples (at least 15 samples on a GPU, 5 on a CPU, 3 for calls over ~7 s).",
    "Contenders: fused = our Triton kernels (kernels.fused_ops; fused-tf32 = the same with tf32 dots, "
    "labelled); reference = the hand-written jnp ops of vit.layers under XLA; autodiff = jax.vjp of the "
    "reference forward (oracle.autodiff_vjp; the step: oracle.autodiff_grad_fn); dpa-xla / dpa-cudnn = "
    "jax.nn.dot_product_attention(implementation='xla' / 'cudnn') on (B, L, H, Dh) q, k, v: the split "
    "of the packed (B, L, 3D) qkv and the merge of the output are part of its timed call, and its "
    "backward is jax.vjp. cuDNN runs bf16/fp16 only, so it is compared in bf16.",
    "fwd rows return the output only (as in evaluation; what a kernel writes for the backward, such as "
    "the LSE or LN's mean/rstd, is still paid); fwd+bwd rows return the output and every input "
    "gradient. The train step group times vit.make_train_step (one jit: uint8 images normalised on "
    "the device, forward, backward, AdamW; donated buffers), params and optimizer state carried from "
    "call to call.",
    "speedup vs ref = reference median / row median, within the same group, shape and dtype.",
    "kernels = device operations one call of the contender's own executable (one op, not the chained "
    "timed one) runs, counted in XLA's optimized HLO: each fusion, library or Triton custom call and "
    "copy counts 1. XLA MB = XLA's cost analysis of that executable, 'bytes accessed', in MB; our "
    "Triton kernels are custom calls, which XLA counts as 0 bytes, so for fused rows it covers only "
    "the XLA ops around them. Together they say how many passes over memory an op makes.",
]


def _row_key(r: dict) -> tuple:
    return (r["group"], r["shape"], r["contender"], r["dtype"])


def merge_rows(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """This run's rows, plus the earlier run's rows for cases this run did not produce (in the
    earlier run's order, ahead of this run's), so one file can be filled by several runs."""
    mine = {_row_key(r) for r in rows}
    return [r for r in earlier if _row_key(r) not in mine] + rows


def write_results(session: BenchSession, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path, str]:
    date = session.started[:10]
    info = session.info
    stem = f"{info['device_slug']}-{date}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    rows, runs, peaks = session.rows, [session.started], session.peaks
    if session.merge and json_path.exists():
        earlier = json.loads(json_path.read_text())
        rows = merge_rows(rows, earlier["rows"])
        runs = earlier["meta"].get("runs", [earlier["meta"]["started"]]) + runs
        peaks = peaks or earlier["meta"].get("peaks")
    rows = finalize(rows, peaks)
    machine_note = ""
    if info["backend"] == "cpu":
        machine_note = (f"Timings taken on a shared {os.cpu_count()}-core CPU machine where other "
                        "processes may have been running: indicative only. On the CPU the fused "
                        "kernels run in Triton's interpreter: checked, not timed.")
    if len(runs) > 1:
        machine_note += (" " if machine_note else "") + (
            f"Rows merged from {len(runs)} runs (--bench-merge), started {', '.join(runs)}; each "
            "row's own timestamp is in the JSON.")
    meta = {"date": date, "started": session.started, "runs": runs, "seed": session.seed, "info": info,
            "peaks": peaks, "machine_note": machine_note, "targets": evaluate_targets(rows),
            "method": METHOD, "formulas": FORMULAS,
            "command": "python -m pytest bench/ --benchmark", "argv": sys.argv}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = markdown(rows, meta)
    md_path.write_text(text)
    summary = "\n".join([f"targets ({'GPU, product shape'}):"]
                        + [f"  {t}: {v}" + (f" [{m}]" if m != "-" else "") for t, m, v in meta["targets"]]
                        + ["", markdown_tables(rows)])
    return json_path, md_path, summary


# ----------------------------------------------------------------------------------------------
# one stateless contender (attention, add+LayerNorm): check, then time


@dataclass(frozen=True)
class KernelCase:
    group: str  # e.g. "attention fwd+bwd"
    kind: str  # "attention" | "layernorm" (shape tables)
    mode: str  # "fwd" | "fwd+bwd"
    shape: str  # "quick" | "product" | "large"
    contender: str
    dtype: str  # "fp32" | "bf16"

    @property
    def id(self) -> str:
        return f"{self.mode}-{self.shape}-{self.dtype}-{self.contender}"


_REFERENCE_CACHE: dict = {}
_REFERENCE_CACHE_SIZE = 2


def reference_case(bench: BenchSession, case: KernelCase, shape: str, make_inputs, build):
    """(args, want) for one group, shape and dtype: fresh random inputs in the row's dtype, and the
    float32 reference's outputs on the same values (upcast). Cached for the contenders that follow."""
    key = (case.group, shape, case.dtype, bench.seed)
    if key not in _REFERENCE_CACHE:
        while len(_REFERENCE_CACHE) >= _REFERENCE_CACHE_SIZE:
            _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
        args = make_inputs(shape, DTYPES[case.dtype], bench.key(case.group, shape, case.dtype))
        args32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), args)
        want = jax.block_until_ready(compile_fn(build("reference", shape), args32, "fp32")(*args32))
        _REFERENCE_CACHE[key] = (args, want)
    return _REFERENCE_CACHE[key]


def chain(fn, k: int):
    """One executable applying fn to k input sets in sequence: sets[i+1] passes through an
    optimization barrier together with fn(sets[i]), so XLA can neither fuse nor reorder the k
    applications (no horizontal fusion, no CSE: the sets differ) and adds no work. One dispatch
    per k ops, so small ops are timed on the device rather than at the host's dispatch rate."""
    def chained(*sets):
        outs = []
        for i, args in enumerate(sets):
            if i:
                _, args = jax.lax.optimization_barrier((outs[-1], args))
            outs.append(fn(*args))
        return outs
    assert k >= 1
    return chained


def run_kernel_case(bench: BenchSession, case: KernelCase, *, make_inputs, build, work, note="",
                    skip_reason=None, untimed_reason=None, optional=False):
    """make_inputs(shape, dtype, key) -> args tuple; build(contender, shape) -> fn(*args);
    work(shape) -> {"tflop": ...} or {"gbytes": ...} per call. optional: a contender that may be
    unavailable on this device (cuDNN): failing to compile or run skips it, with the error,
    instead of failing."""
    import pytest  # noqa: PLC0415

    label = shape_label(case.kind, case.shape)
    row = dict(group=case.group, shape=label, contender=case.contender, mode=case.mode, dtype=case.dtype)
    what = f"{case.group} {case.contender} ({case.dtype})"

    def unavailable(e):
        reason = f"unavailable here: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        if bench.timing:
            bench.record(**row, status="not run", note=reason)
        pytest.skip(reason)

    def checked(outputs, want, at):
        try:
            return assert_close(outputs, want, tol, f"{what} at {shape_label(case.kind, at)}")
        except AssertionError as e:
            if bench.timing:
                bench.record(**row, status="check FAILED", note=str(e).splitlines()[0])
            raise

    if skip_reason:
        if bench.timing:
            bench.record(**row, status="not run", note=skip_reason)
        pytest.skip(skip_reason)
    interpreted = case.contender.startswith("fused") and bench.interpret
    check_shape = "quick" if interpreted else case.shape
    args, want = reference_case(bench, case, check_shape, make_inputs, build)
    tol = TOLERANCE[tolerance_key(case.dtype, case.contender)]
    try:
        compiled = compile_fn(build(case.contender, check_shape), args, case.dtype)
        outputs = jax.block_until_ready(compiled(*args))
    except Exception as e:  # noqa: BLE001  (optional: any error means not available here)
        if not optional:
            raise
        unavailable(e)
    err = checked(outputs, want, check_shape)
    profile = executable_profile(compiled) if bench.timing and not interpreted else None
    del compiled, outputs
    if not bench.timing:
        return
    if interpreted:
        untimed_reason = (f"checked in Triton's interpreter at {shape_label(case.kind, 'quick')} "
                          f"(max rel err {err:.1e}); not timed: the interpreter runs each kernel "
                          "program in numpy on the CPU, which says nothing about the kernel's speed")
    if untimed_reason:
        bench.record(**row, status="checked, not timed", check_rel_err=err, note=untimed_reason,
                     why="Triton's interpreter (no GPU)" if interpreted else untimed_reason)
        pytest.skip(untimed_reason)

    # the timed executable: k fresh input sets (set 0 the checked one) chained in one call,
    # checked again on set 0 before it is timed
    bench.ensure_peaks()
    sets = [args]
    for i in range(1, rotation_count(_nbytes(args))):
        sets.append(make_inputs(case.shape, DTYPES[case.dtype],
                                bench.key(case.group, case.shape, case.dtype, str(i))))
    sets = tuple(sets)
    try:
        timed = compile_fn(chain(build(case.contender, case.shape), len(sets)), sets, case.dtype)
        outputs = jax.block_until_ready(timed(*sets))
    except Exception as e:  # noqa: BLE001
        if not optional:
            raise
        unavailable(e)
    err = max(err, checked(outputs[0], want, case.shape))
    del outputs
    t = time_calls(lambda i: timed(*sets), timer_settings(bench.backend))
    k = len(sets)
    per_op = Timing(t.median_ms / k, t.p20_ms / k, t.p80_ms / k, t.samples, t.calls_per_sample)
    w = work(case.shape)
    seconds = per_op.median_ms * 1e-3
    bench.record(**row, status="timed", median_ms=per_op.median_ms, p20_ms=per_op.p20_ms,
                 p80_ms=per_op.p80_ms, tflop_s=w["tflop"] / seconds if "tflop" in w else None,
                 gb_s=w["gbytes"] / seconds if "gbytes" in w else None, check_rel_err=err,
                 samples=t.samples, calls_per_sample=t.calls_per_sample, ops_per_call=k,
                 kernels=profile["kernels"], hlo_mbytes=profile["hlo_mbytes"],
                 note=note + (f"; {k} input sets chained per call" if k > 1 else ""))
