"""The whole training step, one jit (uint8 images normalised on the device, forward, backward,
AdamW with donated buffers): vit.make_train_step on the product ViT (ViTConfig(): 8 blocks, D=256,
64x64 images, 200 classes) at B=64 and B=512. Reports images/s and the projected time of one Tiny
ImageNet epoch (100,000 images).

Contenders (checked against the reference step first: loss and every gradient, read from AdamW's
first moment after one step from zero state, m = (1 - b1) g):
  fused      make_train_step(fused=True): the Triton attention and add+LayerNorm kernels inside the
             hand-written forward/backward
  reference  make_train_step(): the hand-written jnp forward/backward
  autodiff   make_train_step(grad_fn=oracle.autodiff_grad_fn(config)): jax.value_and_grad of the
             reference forward, the step a plain-JAX user would write
  fused-attn, fused-ln
             the fused step with only one of the two ops swapped in (the other from the
             reference): where the fused step's time goes, measured by leaving one kernel out
  reference-bf16, fused-bf16
             the same steps with precision="bf16" (bf16 activations and matmul inputs, fp32
             accumulation, master weights and optimizer state), checked against the fp32
             reference with the bf16 tolerance; timed on a GPU only (bf16 is emulated on a CPU)
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

import oracle
import vit
from bench import harness
from bench.conftest import shape_names

CONTENDERS = ["reference", "fused", "autodiff", "fused-attn", "fused-ln", "reference-bf16", "fused-bf16"]
HPARAMS = vit.TrainHParams()  # lr 1e-4, no clipping, no augmentation: the step's own cost
TINY = vit.ViTConfig(image_size=16, patch_size=8, d_model=64, heads=2, layers=2, mlp_dim=128,
                     num_classes=10)  # quick checks: L=5, Dh=32
NOTES = {
    "fused": "make_train_step(fused=True): Triton attention + add+LN kernels",
    "reference": "make_train_step(): hand-written backward, jnp under XLA",
    "autodiff": "grad_fn=oracle.autodiff_grad_fn: jax.value_and_grad of the reference forward",
    "fused-attn": "fused attention kernels only; add+LN from the reference",
    "fused-ln": "fused add+LN kernels only; attention from the reference",
    "reference-bf16": "make_train_step(precision='bf16'): hand-written backward in bf16",
    "fused-bf16": "make_train_step(fused=True, precision='bf16'): bf16 Triton kernels",
}


def pytest_generate_tests(metafunc):
    if "step_case" not in metafunc.fixturenames:
        return
    cases = [(shape, c) for shape in shape_names(metafunc.config) for c in CONTENDERS]
    metafunc.parametrize("step_case", cases, ids=[f"{s}-{c}" for s, c in cases])


def config_for(shape):
    return TINY if shape == "quick" else vit.ViTConfig()


def make_batch(config, batch, key):
    k1, k2 = jax.random.split(key)
    images = jax.random.randint(k1, (batch, config.image_size, config.image_size, config.channels),
                                0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(k2, (batch,), 0, config.num_classes, jnp.int32)
    return images, labels


def make_step(contender, config, interpret):
    precision = "bf16" if contender.endswith("-bf16") else "fp32"
    if contender in ("fused-attn", "fused-ln"):
        fused = vit.ops.get_ops(True, interpret=True if interpret else None)
        swapped = ("attention_forward", "attention_backward") if contender == "fused-attn" else \
            ("add_layernorm_forward", "add_layernorm_backward")
        ops = SimpleNamespace(**{**vars(vit.ops.REFERENCE), "name": contender,
                                 **{name: getattr(fused, name) for name in swapped}})
        return jax.jit(vit.step.train_step_fn(config, HPARAMS, ops=ops), donate_argnums=(0, 1))
    if contender.startswith("fused"):
        return vit.make_train_step(config, HPARAMS, fused=True, precision=precision,
                                   interpret=True if interpret else None)
    if contender == "autodiff":
        return vit.make_train_step(config, HPARAMS, grad_fn=oracle.autodiff_grad_fn(config))
    return vit.make_train_step(config, HPARAMS, precision=precision)


def model_flops_per_image(c: vit.ViTConfig) -> float:
    """Training FLOPs of one image for model FLOP utilisation (MFU): 3 x the forward's matmul
    FLOPs (backward = 2 x forward), counting every block in full.
    Forward: patch projection 2*N*(P*P*C)*D; per block QKV 2*L*D*3D, output 2*L*D*D,
    FFN 2*2*L*D*F, attention QK^T and PV 2*2*L*L*D; head 2*D*K."""
    n, l, d, f = c.num_patches, c.seq_len, c.d_model, c.mlp_dim
    block = 2 * l * d * 3 * d + 2 * l * d * d + 4 * l * d * f + 4 * l * l * d
    forward = 2 * n * c.patch_dim * d + c.layers * block + 2 * d * c.num_classes
    return 3.0 * forward


def copy_tree(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def observed(opt_state, metrics):
    """What the check compares: the loss and every gradient (AdamW's m after one step / (1 - b1))."""
    return {"loss": metrics["loss"],
            "grads": jax.tree_util.tree_map(lambda m: m / (1.0 - HPARAMS.b1), opt_state["m"])}


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
        compiled = harness.compile_fn(make_step("reference", config, bench.interpret), args, "fp32")
        _, opt_state, metrics = compiled(*args)
        _CACHE[key] = (config, state, batch, compiled, jax.block_until_ready(observed(opt_state, metrics)))
    return _CACHE[key]


def test_train_step(step_case, bench):
    shape, contender = step_case
    bf16 = contender.endswith("-bf16")
    row = dict(group="train step", shape=harness.shape_label("step", shape), contender=contender,
               mode="step", dtype="bf16" if bf16 else "fp32")
    interpreted = contender.startswith("fused") and bench.interpret
    check_shape = "quick" if interpreted else shape
    config, state, batch, ref_compiled, want = reference_step(bench, check_shape)
    args = (*copy_tree(state), *batch, jax.random.PRNGKey(0))
    if contender == "reference":
        compiled = ref_compiled
    else:
        compiled = harness.compile_fn(make_step(contender, config, bench.interpret), args, "fp32")
    params, opt_state, metrics = compiled(*args)
    try:
        tolerance = harness.TOLERANCE["bf16 step" if bf16 else "step"]
        err = harness.assert_close(observed(opt_state, metrics), want, tolerance,
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
                         for i in range(1, harness.rotation_count(batch[0].size))]
    carried = [params, opt_state, metrics]

    def run(i):  # params and optimizer state carried from call to call, as in training
        images, labels = batches[i % len(batches)]
        carried[:] = compiled(carried[0], carried[1], images, labels, jax.random.PRNGKey(i))
        return carried[2]

    t = harness.time_calls(run, harness.timer_settings(bench.backend))
    assert jnp.isfinite(carried[2]["loss"]), f"train step {contender}: loss became {carried[2]['loss']}"
    images_s = batch_size / (t.median_ms * 1e-3)
    bench.record(**row, status="timed", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                 images_s=images_s, epoch_s=harness.EPOCH_IMAGES / images_s, check_rel_err=err,
                 tflop_s=model_flops_per_image(config) * images_s / 1e12,  # % of peak = MFU
                 samples=t.samples, calls_per_sample=t.calls_per_sample,
                 **harness.executable_profile(compiled),
                 note=NOTES[contender] + f"; {len(batches)} image batches")
