"""Check, then time: what every benchmark shares. The shapes, the session that collects rows, the
work formulas, and ``run_kernel_case`` (one stateless contender: checked against the reference,
then timed). conftest.py wires it into pytest (``--benchmark``); bench/test_bench_*.py build the
contenders. Beside it: timer.py (the timer), hlo.py (kernels and bytes per call), device.py
(versions, measured peaks), report.py (targets, tables, results files), steps.py (the train
step contenders).

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

Rows, for whoever adds one:
- A row's key is (group, shape label, contender, dtype): report._row_key, and
  conftest._item_row_key builds the same key from a test's parameters (a KernelCase, or the
  train step's step_case). The shape enters as its label (shape_label, "B=64 L=65 H=8 Dh=32"):
  new numbers for a shape make rows no earlier results file holds (--bench-continue, --bench-merge).
- Order: under --benchmark the rows report.target_rows() needs run first
  (conftest.pytest_collection_modifyitems), then the rest in collection order (each file's
  pytest_generate_tests loops; within them, the order of its contender list). The results files
  and their tables keep the order rows were recorded in (an earlier file's rows first:
  report.merge_rows); plot.py draws a group's bars in the order contenders first appear there.
- Names carry meaning: "fused..." runs our Triton kernels (without a GPU: interpreted, checked at
  "quick", never timed; report._row_evidence); "...-tf32" gets tf32's tolerance (tolerance);
  "reference", or "reference-<dtype>", is the speedup base of its group, shape and dtype
  (report.finalize), so a variant of the reference needs another name; a step contender
  "...-bf16" is a bf16 row (step_dtype).
- XLA options: XLA_FLAGS is read once per process, so a row cannot set it. Per executable,
  ``jax.jit(fn).lower(*args).compile(compiler_options)`` takes a dict such as
  {"xla_backend_optimization_level": 0}; compile_fn and run_kernel_case do not pass one today.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import zlib
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from bench.device import device_info, measure_peaks
from bench.hlo import executable_profile
from bench.timer import Timing, chain, nbytes, rotation_count, time_calls, timer_settings
from oracle.compare import TOLERANCE, assert_close, exact_float32_dots, kernel_tolerance

# ----------------------------------------------------------------------------------------------
# shapes: "quick" is what the checks use without --benchmark (and what the interpreter is checked
# at under --benchmark on a CPU); "product" is ViTConfig() at the product batch; "large" B=512;
# the standard ViT sizes at a typical per-GPU batch (configs/vit-*.toml): "vit-s" ViT-S/16 and
# "vit-b" ViT-B/16 at 224 px (L = 197, Dh = 64, 6 and 12 heads), "vit-b-384" ViT-B/16 at 384 px
# (L = 577); "vit-s16" the whole ViT-S/16 train step at 224 px on synthetic images.

ATTN_SHAPES = {"quick": (2, 65, 8, 32), "product": (64, 65, 8, 32), "large": (512, 65, 8, 32),
               "vit-s": (128, 197, 6, 64), "vit-b": (64, 197, 12, 64),
               "vit-b-384": (16, 577, 12, 64)}
LN_SHAPES = {"quick": (2, 65, 256), "product": (64, 65, 256), "large": (512, 65, 256),
             # ViT-S/16's and ViT-B/16's LayerNorms at 224 px (not timed by the bench: for
             # bench.tune_layernorm, where a width that is not a power of two pads its tiles)
             "vit-s": (128, 197, 384), "vit-b": (64, 197, 768)}
STEP_BATCH = {"quick": 4, "product": 64, "large": 512, "vit-s16": 128}
TIMED_SHAPES = {"attention": ("product", "large", "vit-s", "vit-b", "vit-b-384"),
                "layernorm": ("product", "large"), "step": ("product", "large", "vit-s16")}
GPU_ONLY_SHAPES = {"vit-s16"}  # a CPU takes minutes per step there: not run on a CPU
EPOCH_IMAGES = 100_000  # one Tiny ImageNet training epoch

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def shape_names(config, kind: str) -> tuple[str, ...]:
    """The shapes a group ("attention", "layernorm", "step") is parametrised over: the reduced
    one, or its timed ones."""
    return TIMED_SHAPES[kind] if config.getoption("vitfuse_benchmark") else ("quick",)


def tolerance(dtype: str, contender: str) -> float:
    """A contender's check tolerance (oracle/compare.py) at the benchmark's sizes. A contender
    named ...-tf32 (tf32 dots, 10 mantissa bits) gets tf32's; every other one float32's, the
    ...-tf32x3 ones included: 3xTF32 claims float32 accuracy, so it is held to what the ieee
    kernels are held to at these sizes ("float32 long sums"), not to tf32's looser bound."""
    return kernel_tolerance(DTYPES[dtype], "tf32" if contender.endswith("-tf32") else "ieee",
                            long_sums=True)


def step_dtype(contender: str) -> str:
    """A train-step row's dtype: its contender's name ends in -bf16 for a bf16 step."""
    return "bf16" if contender.endswith("-bf16") else "fp32"


STEP_TOLERANCE = {"fp32": TOLERANCE["train step"], "bf16": TOLERANCE["bf16 train step"]}


# ----------------------------------------------------------------------------------------------
# compiling, and the work formulas


def matmul_precision(dtype: str):
    """float32 rows: full-precision dots for XLA ("highest"; TF32 otherwise on recent GPUs), to
    match the kernels' ieee dots. Half-precision rows keep XLA's default."""
    if dtype == "fp32":
        return exact_float32_dots()
    return contextlib.nullcontext()


def compile_fn(fn, args, dtype: str):
    """Ahead-of-time jit: tracing, lowering and compilation all happen here, under the row's
    matmul precision, and never inside a timed call."""
    with matmul_precision(dtype):
        return jax.jit(fn).lower(*args).compile()


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


def shape_label(kind: str, name: str) -> str:
    if kind == "attention":
        b, l, h, dh = ATTN_SHAPES[name]
        return f"B={b} L={l} H={h} Dh={dh}"
    if kind == "layernorm":
        b, l, d = LN_SHAPES[name]
        return f"B={b} L={l} D={d} ({b * l}x{d})"
    model = {"quick": "tiny ViT", "vit-s16": "ViT-S/16, 224x224 images"}.get(name, "ViT 8x256, 64x64 images")
    return f"B={STEP_BATCH[name]} ({model})"


# ----------------------------------------------------------------------------------------------
# the session: rows as they come (report.py writes them out)


@dataclass
class BenchSession:
    timing: bool  # --benchmark
    seed: int
    info: dict = field(default_factory=device_info)
    rows: list = field(default_factory=list)
    peaks: dict | None = None
    started: str = field(default_factory=lambda: _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    merge: bool = False  # --bench-merge: keep rows of an earlier run (same device, same day)
    # the results file of the earlier run, as it was before this run's first write replaced it
    # (report.merged_results, at the start; {} when there was none): read once, since this run
    # rewrites the file
    earlier: dict | None = None
    # --bench-continue: an earlier results file of this device (any day; report.continued_results),
    # read at the session's start; its measured rows are not run again and are kept in this run's
    # files (report.write_results)
    continued: dict | None = None
    rows_written: int = 0  # how many of self.rows the results files on disk hold

    @property
    def backend(self) -> str:
        return self.info["backend"]

    @property
    def interpret(self) -> bool:
        """The fused kernels run in Triton's interpreter here (no GPU): checked, not timed."""
        return self.backend != "gpu"

    @property
    def launcher(self):
        """The fused kernels' launcher here: kernels.COMPILED on a GPU, kernels.INTERPRETED elsewhere."""
        from kernels.launch import COMPILED, INTERPRETED  # noqa: PLC0415  (needs triton: fused rows)

        return INTERPRETED if self.interpret else COMPILED

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
                    jax_triton=self.info["jax_triton"], code=self.info.get("code"), seed=self.seed,
                    timestamp=_dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        self.rows.append(base)
        return base


# ----------------------------------------------------------------------------------------------
# one stateless contender (attention, add+LayerNorm): check, then time


@dataclass(frozen=True)
class KernelCase:
    group: str  # e.g. "attention fwd+bwd"
    kind: str  # "attention" | "layernorm" (shape tables)
    mode: str  # "fwd" | "fwd+bwd"
    shape: str  # a key of ATTN_SHAPES / LN_SHAPES: "quick", "product", "large", "vit-s", ...
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
    tol = tolerance(case.dtype, case.contender)
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
    for i in range(1, rotation_count(nbytes(args))):
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
