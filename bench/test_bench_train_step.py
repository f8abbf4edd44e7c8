"""The whole training step, one jit (uint8 images normalised on the device, forward, backward,
AdamW with donated buffers): vit.make_train_step on the product ViT (ViTConfig(): 8 blocks, D=256,
64x64 images, 200 classes) at B=64 and B=512, and on ViT-S/16 at 224 px (configs/vit-s16.toml,
L=197, synthetic images, B=128; GPU only). Reports images/s and the projected time of one Tiny
ImageNet epoch (100,000 images).

Contenders (checked against the reference step first: loss and every gradient, read from AdamW's
first moment after one step from zero state, m = (1 - b1) g):
  fused      make_train_step(ops=fused_ops()): the Triton attention and add+LayerNorm kernels
             inside the hand-written forward/backward
  reference  make_train_step(): the hand-written jnp forward/backward
  autodiff   make_train_step(grad_fn=oracle.autodiff_grad_fn(config)): jax.value_and_grad of the
             reference forward, the step a plain-JAX user would write
  fused-attn, fused-ln
             the fused step with only one of the two ops swapped in (the other from the
             reference): where the fused step's time goes, measured by leaving one kernel out
  reference-bf16, fused-bf16
             the same steps with compute_dtype="bf16" (bf16 activations and matmul inputs, fp32
             accumulation, master weights and optimizer state), checked against the fp32
             reference with the bf16 tolerance; timed on a GPU only (bf16 is emulated on a CPU)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import vit
from bench import harness
from bench.hlo import executable_profile
from bench.steps import (CONTENDERS, config_for, copy_tree, make_batch, make_step,
                         model_flops_per_image, observed)
from bench.timer import rotation_count, time_calls, timer_settings
from oracle.compare import assert_close

NOTES = {
    "fused": "make_train_step(ops=fused_ops()): Triton attention + add+LN kernels",
    "reference": "make_train_step(): hand-written backward, jnp under XLA",
    "autodiff": "grad_fn=oracle.autodiff_grad_fn: jax.value_and_grad of the reference forward",
    "fused-attn": "fused attention kernels only; add+LN from the reference",
    "fused-ln": "fused add+LN kernels only; attention from the reference",
    "reference-bf16": "make_train_step(compute_dtype='bf16'): hand-written backward in bf16",
    "fused-bf16": "make_train_step(ops=fused_ops(), compute_dtype='bf16'): bf16 Triton kernels",
}


def pytest_generate_tests(metafunc):
    if "step_case" not in metafunc.fixturenames:
        return
    cases = [(shape, c) for shape in harness.shape_names(metafunc.config, "step")
             for c in CONTENDERS]
    metafunc.parametrize("step_case", cases, ids=[f"{s}-{c}" for s, c in cases])


_CACHE: dict = {}


def reference_step(bench, shape):
    """Initial state, a batch and the reference step's results on them (cached per shape)."""
    key = (shape, bench.seed)
    if key not in _CACHE:
        _CACHE.clear()
        config = config_for(shape)
        k_init, k_batch = jax.random.split(bench.key("train step", shape))
        params = vit.init_params(k_init, config)
        state = (params, vit.adamw_init(params))
        batch = make_batch(config, harness.STEP_BATCH[shape], k_batch)
        args = (*copy_tree(state), *batch, jax.random.PRNGKey(0))
        compiled = harness.compile_fn(make_step("reference", config), args, "fp32")
        _, opt_state, metrics = compiled(*args)
        _CACHE[key] = (config, state, batch, compiled, jax.block_until_ready(observed(opt_state, metrics)))
    return _CACHE[key]


def test_train_step(step_case, bench):
    shape, contender = step_case
    bf16 = harness.step_dtype(contender) == "bf16"
    row = dict(group="train step", shape=harness.shape_label("step", shape), contender=contender,
               mode="step", dtype=harness.step_dtype(contender))
    if shape in harness.GPU_ONLY_SHAPES and bench.backend != "gpu":
        reason = (f"GPU-only row: one {harness.shape_label('step', shape)} step is several TFLOP, "
                  "minutes on a CPU; not checked or timed here")
        bench.record(**row, status="not run", note=reason)
        pytest.skip(reason)
    interpreted = contender.startswith("fused") and bench.interpret
    check_shape = "quick" if interpreted else shape
    config, state, batch, ref_compiled, want = reference_step(bench, check_shape)
    args = (*copy_tree(state), *batch, jax.random.PRNGKey(0))
    if contender == "reference":
        compiled = ref_compiled
    else:
        launcher = bench.launcher if contender.startswith("fused") else None
        compiled = harness.compile_fn(make_step(contender, config, launcher), args, "fp32")
    params, opt_state, metrics = compiled(*args)
    try:
        tolerance = harness.STEP_TOLERANCE["bf16" if bf16 else "fp32"]
        err = assert_close(observed(opt_state, metrics), want, tolerance,
                           f"train step {contender} at {harness.shape_label('step', check_shape)}")
    except AssertionError as e:
        if bench.timing:
            bench.record(**row, status="check FAILED", note=str(e).splitlines()[0])
        raise
    if not bench.timing:
        return
    if interpreted:
        reason = (f"checked in Triton's interpreter at {harness.shape_label('step', 'quick')} (max rel err "
                  f"{err:.1e}); not timed: the interpreter says nothing about the kernels' speed")
        bench.record(**row, status="checked, not timed", check_rel_err=err, note=reason,
                     why="Triton's interpreter (no GPU)")
        pytest.skip(reason)
    if bf16 and bench.backend != "gpu":
        reason = (f"bf16 step checked (max rel err {err:.1e} vs the fp32 reference); timed on a "
                  "GPU only: a CPU emulates bf16 matmuls")
        bench.record(**row, status="checked, not timed", check_rel_err=err, note=reason,
                     why="bf16 on a CPU")
        pytest.skip(reason)

    bench.ensure_peaks()
    batch_size = harness.STEP_BATCH[shape]
    batches = [batch] + [make_batch(config, batch_size, bench.key("train step", shape, str(i)))
                         for i in range(1, rotation_count(batch[0].size))]
    carried = [params, opt_state, metrics]

    def run(i):  # params and optimizer state carried from call to call, as in training
        images, labels = batches[i % len(batches)]
        carried[:] = compiled(carried[0], carried[1], images, labels, jax.random.PRNGKey(i))
        return carried[2]

    t = time_calls(run, timer_settings(bench.backend))
    assert jnp.isfinite(carried[2]["loss"]), f"train step {contender}: loss became {carried[2]['loss']}"
    images_s = batch_size / (t.median_ms * 1e-3)
    bench.record(**row, status="timed", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                 images_s=images_s, epoch_s=harness.EPOCH_IMAGES / images_s, check_rel_err=err,
                 tflop_s=model_flops_per_image(config) * images_s / 1e12,  # % of peak = MFU
                 samples=t.samples, calls_per_sample=t.calls_per_sample,
                 **executable_profile(compiled),
                 note=NOTES[contender] + f"; {len(batches)} image batches")
