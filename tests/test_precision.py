"""bf16 mixed precision: bf16 activations and matmul inputs with float32 accumulation, float32
master weights, optimizer state, LayerNorm statistics, softmax and loss.

Tolerances (documented in README): bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per
operation); through a 2-layer model the gradients agree with float32 to a few percent of the
global gradient norm and the loss to 1%."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from kernels import fused_ops
from vit.ops import REFERENCE
from vit.config import TrainHParams
from vit.step import hand_written_grads, make_train_step

from kernel_checks import LAUNCHER


def small(norm="post"):
    return vit.ViTConfig(image_size=16, patch_size=4, channels=3, d_model=64, heads=4, layers=2,
                         mlp_dim=128, num_classes=10, norm=norm)


def data(cfg, n=16):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    images = jax.random.randint(k1, (n, 16, 16, 3), 0, 256).astype(jnp.uint8)
    return images, jax.random.randint(k2, (n,), 0, cfg.num_classes)


@pytest.mark.parametrize("compute_dtype, dtype", [("bf16", jnp.bfloat16), ("fp32", jnp.float32)])
def test_the_forward_gets_weights_and_images_in_the_compute_dtype(monkeypatch, compute_dtype, dtype):
    """Traced only (jax.eval_shape): the train and eval steps hand the model a compute copy of the
    float32 master weights and the images in the compute dtype; gradients come back float32."""
    from vit import step as step_module

    seen = []
    forward = step_module.model_forward

    def spy(params, x, *args, **kwargs):
        seen.append(({leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}, x.dtype))
        return forward(params, x, *args, **kwargs)

    monkeypatch.setattr(step_module, "model_forward", spy)
    cfg = small()
    params = jax.eval_shape(lambda: vit.init_params(jax.random.PRNGKey(0), cfg))  # shapes only
    images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    targets = jax.ShapeDtypeStruct((2, cfg.num_classes), jnp.float32)
    grads = jax.eval_shape(hand_written_grads(cfg, compute_dtype=compute_dtype), params,
                           jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32), targets, None)[1]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
    jax.eval_shape(step_module.eval_step_fn(cfg, compute_dtype=compute_dtype), params, images, labels,
                   jax.ShapeDtypeStruct((2,), jnp.bool_))
    assert seen == [({jnp.dtype(dtype)}, jnp.dtype(dtype))] * 2


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_bf16_gradients_close_to_fp32(norm):
    cfg = small(norm)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, labels = data(cfg)
    x = images.astype(jnp.float32) / 255.0 - 0.5
    targets = vit.layers.one_hot_targets(labels, cfg.num_classes)
    l32, g32, _ = jax.jit(hand_written_grads(cfg, REFERENCE, "fp32"))(params, x, targets, None)
    l16, g16, logits = jax.jit(hand_written_grads(cfg, REFERENCE, "bf16"))(params, x, targets, None)
    assert logits.dtype == jnp.float32
    for g in jax.tree_util.tree_leaves(g16):
        assert g.dtype == jnp.float32          # gradients for the float32 master weights
    assert float(l16) == pytest.approx(float(l32), rel=1e-2)
    norm32 = float(vit.optim.global_norm(g32))
    diff = float(vit.optim.global_norm(jax.tree_util.tree_map(lambda a, b: a - b, g16, g32)))
    assert diff <= 0.05 * norm32, (diff, norm32)
    assert diff > 0  # it really ran in bf16


def test_bf16_step_tracks_fp32_step():
    cfg = small()
    images, labels = data(cfg)
    hp = TrainHParams(lr=1e-3, weight_decay=0.01)
    curves, final = {}, {}
    for compute_dtype in ("fp32", "bf16"):
        params = vit.init_params(jax.random.PRNGKey(0), cfg)
        state = vit.adamw_init(params)
        step = make_train_step(cfg, hp, compute_dtype=compute_dtype)
        losses = []
        for i in range(8):
            params, state, m = step(params, state, images, labels, jax.random.PRNGKey(i))
            losses.append(float(m["loss"]))
        curves[compute_dtype], final[compute_dtype] = losses, params
        for leaf in jax.tree_util.tree_leaves((params, state["m"], state["v"])):
            assert leaf.dtype == jnp.float32   # master weights and Adam moments stay float32
    np.testing.assert_allclose(curves["bf16"], curves["fp32"], rtol=3e-2)
    assert curves["bf16"][-1] < 0.7 * curves["bf16"][0]


def test_bf16_fused_matches_bf16_reference_and_fp32():
    """Kernels in bf16 (interpreted on the CPU, compiled on a GPU) vs the reference in bf16, and
    both vs float32."""
    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=32, heads=2, layers=2,
                        mlp_dim=48, num_classes=5)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    targets = vit.layers.one_hot_targets(jnp.array([0, 1, 2, 3]), 5)
    out = {}
    for name, ops, compute_dtype in (("ref32", REFERENCE, "fp32"), ("ref16", REFERENCE, "bf16"),
                                     ("fused16", fused_ops(LAUNCHER), "bf16")):
        loss, grads, _ = jax.jit(hand_written_grads(cfg, ops, compute_dtype))(params, x, targets,
                                                                              None)
        out[name] = (float(loss), grads)
    norm = float(vit.optim.global_norm(out["ref32"][1]))

    def dist(a, b):
        return float(vit.optim.global_norm(jax.tree_util.tree_map(lambda u, v: u - v,
                                                                  out[a][1], out[b][1])))
    assert dist("fused16", "ref16") <= 0.03 * norm
    assert dist("fused16", "ref32") <= 0.05 * norm
    assert out["fused16"][0] == pytest.approx(out["ref32"][0], rel=2e-2)
