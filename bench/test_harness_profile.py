"""bench.hlo.count_kernels / executable_profile: the kernels and XLA bytes beside each time; and
bench.harness.run_kernel_case's check-then-time: a wrong contender is recorded as failing and
never timed; the launcher a session gives the fused contenders (compiled only where it times)."""

import jax
import jax.numpy as jnp
import pytest

from bench import harness, hlo
from bench.timer import Timing

GPU_LIKE_HLO = """\
HloModule jit_f, is_scheduled=true

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add = f32[8]{0} add(%p0, %p1)
}

%command_buffer (p: f32[8], q: f32[8]) -> (f32[8], f32[8]) {
  %p = f32[8]{0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %fusion.1 = f32[8]{0} fusion(%p, %q), kind=kLoop, calls=%fused_add
  %fusion.2 = f32[8]{0} fusion(%fusion.1, %q), kind=kLoop, calls=%fused_add
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%fusion.1, %fusion.2)
}

ENTRY %main.9 (x: f32[8], y: f32[8]) -> (f32[8], f32[8], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %c = f32[] constant(0)
  %gemm = (f32[8]{0}, s8[0]{0}) custom-call(%x, %y), custom_call_target="__cublas$gemm"
  %gte = f32[8]{0} get-tuple-element(%gemm), index=0
  %cb = (f32[8]{0}, f32[8]{0}) call(%gte, %y), to_apply=%command_buffer
  %start = ((f32[8]{0}), f32[8]{0}) async-start(%x), calls=%fused_add
  %done = f32[8]{0} async-done(%start)
  %copy = f32[8]{0} copy(%done)
  ROOT %out = (f32[8]{0}, f32[8]{0}, f32[8]{0}) tuple(%copy, %gte, %done)
}
"""


def test_count_kernels_on_gpu_shaped_hlo():
    # custom call 1 + command buffer's 2 fusions + async-start 1 + copy 1 (done, gte, tuple,
    # parameters and the constant are not kernels)
    assert hlo.count_kernels(GPU_LIKE_HLO) == 5


def test_executable_profile_of_a_compiled_function():
    x = jnp.ones((64, 64))
    one = jax.jit(lambda a: a * 2.0).lower(x).compile()
    two = jax.jit(lambda a: jnp.sum(a * 2.0, axis=0) + jnp.sum(jnp.exp(a), axis=1)).lower(x).compile()
    p1, p2 = hlo.executable_profile(one), hlo.executable_profile(two)
    assert p1["kernels"] >= 1 and p2["kernels"] >= p1["kernels"]
    assert p1["hlo_mbytes"] is None or p1["hlo_mbytes"] >= 2 * 64 * 64 * 4 / 1e6 * 0.99


def test_a_wrong_contender_is_reported_failing_and_never_timed(monkeypatch):
    """With timing on: a contender 1% off the reference raises, leaves a "check FAILED" row and
    never reaches the timer; a right one is timed (the timer replaced by a stub: no clock here)."""
    timed = []
    monkeypatch.setattr(harness, "time_calls", lambda run, settings: timed.append(run) or Timing(1.0, 0.9, 1.1, 5, 1))
    monkeypatch.setattr(harness, "measure_peaks", lambda backend: {"copy_mib": 1, "copy_gb_s": 1.0})
    bench = harness.BenchSession(timing=True, seed=20240611)

    def make_inputs(shape, dtype, key):
        return (jax.random.normal(key, (4, 8), jnp.float32).astype(dtype),)

    def build(contender, shape):
        return (lambda x: x * 2.02) if contender == "wrong" else (lambda x: x * 2.0)

    def case(contender):
        return harness.KernelCase("check-then-time test", "layernorm", "fwd", "quick", contender, "fp32")

    run = dict(make_inputs=make_inputs, build=build, work=lambda shape: {"gbytes": 1e-6})
    with pytest.raises(AssertionError, match="differs from the reference"):
        harness.run_kernel_case(bench, case("wrong"), **run)
    assert timed == [] and [(r["contender"], r["status"]) for r in bench.rows] == [("wrong", "check FAILED")]
    assert bench.rows[0]["median_ms"] is None
    harness.run_kernel_case(bench, case("right"), **run)
    assert len(timed) == 1 and (bench.rows[-1]["contender"], bench.rows[-1]["status"]) == ("right", "timed")
    # the timed call runs the op on k input sets: each figure is per op, the call's divided by k
    row, k = bench.rows[-1], harness.rotation_count(4 * 8 * 4)
    assert k > 1 and row["ops_per_call"] == k
    assert (row["median_ms"], row["p20_ms"], row["p80_ms"]) == pytest.approx((1.0 / k, 0.9 / k, 1.1 / k))
    assert row["gb_s"] == pytest.approx(1e-6 / (1e-3 / k))


def test_an_interpreted_contender_is_checked_at_the_quick_shape_and_not_timed(monkeypatch):
    """--benchmark on a machine without a GPU: the fused kernels run in the interpreter, so a
    product-shape case is checked at the quick shape only, recorded as such and skipped."""
    monkeypatch.setattr(harness, "time_calls", lambda run, settings: pytest.fail("timed"))
    bench = harness.BenchSession(timing=True, seed=7, info={**harness.device_info(), "backend": "cpu"})
    built = []

    def build(contender, shape):
        built.append((contender, shape))
        return lambda x: x * 2.0

    case = harness.KernelCase("interpreter test", "layernorm", "fwd", "product", "fused", "fp32")
    with pytest.raises(pytest.skip.Exception, match="not timed"):
        harness.run_kernel_case(bench, case, make_inputs=lambda shape, dtype, key: (jnp.ones((2, 3), dtype),),
                                build=build, work=lambda shape: {"gbytes": 1e-6})
    assert built == [("reference", "quick"), ("fused", "quick")]
    (row,) = bench.rows
    assert (row["status"], row["median_ms"]) == ("checked, not timed", None)
    assert harness.shape_label("layernorm", "quick") in row["note"]


def test_a_session_times_only_compiled_kernels():
    """The launcher a session hands the fused contenders matches whether it times them: on a GPU
    backend COMPILED (jax-triton) and timed; elsewhere INTERPRETED and only checked. A timed
    session on the interpreter would time numpy behind a pure_callback as "fused"."""
    from kernels import COMPILED, INTERPRETED

    for backend, launcher in (("gpu", COMPILED), ("cpu", INTERPRETED)):
        bench = harness.BenchSession(timing=True, seed=7, info={**harness.device_info(), "backend": backend})
        assert bench.launcher is launcher and bench.interpret is not launcher.on_gpu, backend


# ----------------------------------------------------------------------------------------------
# bench.timer: how many calls per sample and how many samples, on a fake clock (nothing is timed
# here: each call advances the clock by exactly 1/64 s)


def fake_clock_run(monkeypatch, size=1):
    from bench import timer

    now = [0.0]
    monkeypatch.setattr(timer.time, "perf_counter", lambda: now[0])
    calls = []

    def run(i):
        calls.append(i)
        now[0] += 1 / 64
        return jnp.zeros((size,), jnp.float32)
    return run, calls


def test_timer_samples_until_both_minimums_are_met(monkeypatch):
    from bench.timer import TimerSettings, time_calls

    run, calls = fake_clock_run(monkeypatch)
    # 1/16 s per sample = 4 calls; at least 5 samples and 1 s: 16 samples
    t = time_calls(run, TimerSettings(target_sample_s=1 / 16, min_samples=5, min_total_s=1.0, max_total_s=20.0))
    assert (t.calls_per_sample, t.samples) == (4, 16)
    assert t.median_ms == t.p20_ms == t.p80_ms == 1000 / 64
    assert calls == list(range(1 + 16 * 4))  # a warm-up call, then fresh indices, none repeated
    run, _ = fake_clock_run(monkeypatch)
    t = time_calls(run, TimerSettings(target_sample_s=1 / 16, min_samples=40, min_total_s=0.1, max_total_s=20.0))
    assert t.samples == 40  # enough time, not yet enough samples


def test_timer_stops_at_max_total_with_three_samples(monkeypatch):
    from bench.timer import TimerSettings, time_calls

    run, _ = fake_clock_run(monkeypatch)
    t = time_calls(run, TimerSettings(target_sample_s=1 / 16, min_samples=1000, min_total_s=100.0,
                                      max_total_s=0.5))
    assert t.samples == 8  # 0.5 s of 1/16 s samples
    run, _ = fake_clock_run(monkeypatch)
    t = time_calls(run, TimerSettings(target_sample_s=1.0, min_samples=1000, min_total_s=100.0,
                                      max_total_s=0.5))
    assert (t.calls_per_sample, t.samples) == (64, 3)  # past max_total after one sample: still 3


def test_timer_caps_calls_in_flight_by_their_bytes(monkeypatch):
    from bench.timer import TimerSettings, time_calls

    run, _ = fake_clock_run(monkeypatch, size=1000)  # 4000 bytes per result
    t = time_calls(run, TimerSettings(target_sample_s=1.0, min_samples=3, min_total_s=0.0, max_total_s=1.0,
                                      max_inflight_bytes=10_000))
    assert t.calls_per_sample == 2


def test_rotation_count_covers_the_rotate_bytes_up_to_the_cap():
    from bench.timer import MAX_ROTATE_SETS, ROTATE_BYTES, rotation_count

    assert rotation_count(ROTATE_BYTES) == rotation_count(2 * ROTATE_BYTES) == 1
    assert rotation_count(ROTATE_BYTES // 3) == 4  # ceil: at least ROTATE_BYTES in all
    assert rotation_count(ROTATE_BYTES // 3 + 1) == 3
    assert rotation_count(1) == rotation_count(0) == MAX_ROTATE_SETS


# ----------------------------------------------------------------------------------------------
# the work formulas, counted tensor by tensor


def test_layernorm_bytes_count_every_tensor_read_and_written():
    import numpy as np

    m, n = 6, 10
    for dtype in (jnp.float32, jnp.bfloat16):
        act = lambda: np.empty((m, n), dtype)  # noqa: E731  x, r, y, dy, ds
        row, col = np.empty(m, np.float32), np.empty(n, np.float32)  # mean, rstd / gamma, beta, dgamma, dbeta
        fwd = sum(a.nbytes for a in (act(), act(), col, col, act(), row, row))  # x r gamma beta -> y mean rstd
        bwd = sum(a.nbytes for a in (act(), act(), act(), col, row, row, act(), col, col))  # dy x r gamma mean rstd -> ds dgamma dbeta
        itemsize = jnp.dtype(dtype).itemsize
        assert harness.layernorm_bytes(m, n, itemsize, "fwd") == fwd
        assert harness.layernorm_bytes(m, n, itemsize, "fwd+bwd") == fwd + bwd


def test_attention_flops_count_the_matmuls():
    b, l, h, dh = 2, 5, 3, 4
    matmul = 2 * b * h * l * l * dh  # one (L, Dh) x (Dh, L) or (L, L) x (L, Dh) product per head
    assert harness.attention_flops(b, l, h, dh, "fwd") == 2 * matmul  # QK^T, PV
    assert harness.attention_flops(b, l, h, dh, "fwd+bwd") == (2 + 5) * matmul  # + QK^T again, dP, dV, dQ, dK


def test_the_timed_executable_is_checked_before_it_is_timed(monkeypatch):
    """The timed executable (the op chained over k input sets, at the timed shape) is not the one
    first checked: its output on the checked set is checked again before any timing. Here the
    chain alone is 1% off: a "check FAILED" row, no timing."""
    timed = []
    monkeypatch.setattr(harness, "time_calls", lambda run, settings: timed.append(run) or Timing(1.0, 0.9, 1.1, 5, 1))
    monkeypatch.setattr(harness, "measure_peaks", lambda backend: {"copy_mib": 1, "copy_gb_s": 1.0})
    real_chain = harness.chain
    monkeypatch.setattr(harness, "chain", lambda fn, k: real_chain(lambda x: fn(x) * 1.01, k))
    bench = harness.BenchSession(timing=True, seed=5, info={**harness.device_info(), "backend": "gpu"})
    case = harness.KernelCase("chain check test", "layernorm", "fwd", "product", "chained", "fp32")
    built = []

    def build(contender, shape):
        built.append((contender, shape))
        return lambda x: x * 2.0

    with pytest.raises(AssertionError, match="differs from the reference"):
        harness.run_kernel_case(bench, case, make_inputs=lambda shape, dtype, key: (jax.random.normal(key, (4, 8)),),
                                build=build, work=lambda shape: {"gbytes": 1e-6})
    assert timed == [] and [r["status"] for r in bench.rows if r["group"] == case.group] == ["check FAILED"]
    # a compiled contender is first checked at the shape it is timed at, not the quick one
    assert built[:2] == [("reference", "product"), ("chained", "product")]


def test_each_dtype_row_gets_inputs_of_its_dtype():
    """The reference inputs are cached per (group, shape, dtype): a bf16 row after an fp32 row of
    the same group and shape must get bf16 inputs (else it checks, and times, the fp32 kernel)."""
    bench = harness.BenchSession(timing=False, seed=3)
    seen = []

    def build(contender, shape):
        return lambda x: seen.append((contender, jnp.dtype(x.dtype).name)) or x * 2.0

    for dtype in ("fp32", "bf16"):
        harness.run_kernel_case(
            bench, harness.KernelCase("dtype test", "layernorm", "fwd", "quick", "plain", dtype),
            make_inputs=lambda shape, dtype, key: (jax.random.normal(key, (4, 8)).astype(dtype),),
            build=build, work=lambda shape: {"gbytes": 1e-6})
    assert [d for c, d in seen if c == "plain"] == ["float32", "bfloat16"]
    # and the reference runs in float32 on their upcast, whatever the row's dtype
    assert [d for c, d in seen if c == "reference"] == ["float32", "float32"]


def test_a_forced_fused_kernel_is_not_timed_in_the_interpreter(monkeypatch):
    """Every "fused..." contender runs our kernels (fused-one-tile, fused-key-blocked too): on a
    machine without a GPU it is checked, never timed (numpy's speed is no kernel's)."""
    monkeypatch.setattr(harness, "time_calls", lambda run, settings: pytest.fail("timed"))
    bench = harness.BenchSession(timing=True, seed=7, info={**harness.device_info(), "backend": "cpu"})
    case = harness.KernelCase("forced kernel test", "layernorm", "fwd", "product", "fused-key-blocked", "fp32")
    with pytest.raises(pytest.skip.Exception, match="not timed"):
        harness.run_kernel_case(bench, case, make_inputs=lambda shape, dtype, key: (jnp.ones((2, 3), dtype),),
                                build=lambda contender, shape: lambda x: x * 2.0, work=lambda shape: {"gbytes": 1e-6})
    assert [r["status"] for r in bench.rows] == ["checked, not timed"]
