"""AdamW, global-norm clipping and the learning-rate schedule, as pure functions over pytrees.

AdamW (Loshchilov & Hutter), step t = 1, 2, ...:
    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)
    p = p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * mask * p)
The weight decay is decoupled (not part of g) and scaled by lr, as in optax.adamw and PyTorch.

Which params are decayed (decay_mask): the dense weight matrices only (patch projection, QKV,
attention output, FFN, head). Not decayed: biases, LayerNorm gamma/beta, the CLS token and the
position embeddings - shrinking those towards zero has no regularising meaning.

Layer-wise learning-rate decay (layer_lr_scales, TrainHParams.layer_decay): each parameter's lr
times a factor that shrinks towards the input, for fine-tuning (train.py --init-from).

Which params are trained at all (trainable_mask): every one, or the head alone (a linear probe);
the step (vit/step.py) gives the others a zero gradient, so that the gradient norm and clipping
count the trained ones only, and keeps them as they were.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vit.config import TRAINABLE


def decay_mask(params):
    """True for the dense weight matrices (leaves named 'w'), False for everything else."""
    def is_weight(path, leaf):
        last = path[-1]
        return getattr(last, "key", None) == "w"
    return jax.tree_util.tree_map_with_path(is_weight, params)


def trainable_mask(params, trainable: str = "all"):
    """True for the parameters a run of `trainable` (TRAINABLE) updates, False for those it keeps."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {trainable!r}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: trainable == "all" or getattr(path[0], "key", None) == "head", params)


def adamw_init(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=jnp.float32)  # noqa: E731
    return {"step": jnp.zeros((), jnp.int32),
            "m": jax.tree_util.tree_map(zeros, params),
            "v": jax.tree_util.tree_map(zeros, params)}


def layer_lr_scales(params, layer_decay: float = 1.0):
    """Each parameter's factor on the learning rate under layer-wise decay (BEiT, MAE and DINOv2
    fine-tune so): with L blocks, block i (0-based) gets layer_decay ** (L - i), the patch
    projection, CLS token and positions layer_decay ** (L + 1), the head and the final LayerNorm
    1; layers near the input move least. layer_decay 1: every factor 1."""
    blocks = len(params.get("blocks", []))

    def scale(path, leaf):
        top = getattr(path[0], "key", None)
        if top == "blocks":
            return layer_decay ** (blocks - path[1].idx)
        return layer_decay ** (blocks + 1) if top in ("patch", "embed") else 1.0
    return jax.tree_util.tree_map_with_path(scale, params)


def adamw_update(params, grads, state, lr, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 mask=None, lr_scale=None):
    """One AdamW step; returns (new params, new state). lr_scale: a tree of factors on lr (the
    decay's too, as a parameter group's lr is in PyTorch), e.g. layer_lr_scales'; None: 1."""
    if mask is None:
        mask = decay_mask(params)
    step = state["step"] + 1
    t = step.astype(jnp.float32)
    bias1 = 1.0 - b1 ** t
    bias2 = 1.0 - b2 ** t
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state["v"], grads)

    if lr_scale is None:
        lr_scale = jax.tree_util.tree_map(lambda p: 1.0, params)

    def apply(p, m, v, decay, scale):
        update = (m / bias1) / (jnp.sqrt(v / bias2) + eps)
        if decay:
            update = update + weight_decay * p
        return (p - lr * scale * update).astype(p.dtype)

    new_params = jax.tree_util.tree_map(apply, params, m, v, mask, lr_scale)
    return new_params, {"step": step, "m": m, "v": v}


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(grads, max_norm):
    """g * min(1, max_norm / ||g||); returns (clipped grads, the norm before clipping)."""
    norm = global_norm(grads)
    if max_norm is None or max_norm <= 0:
        return grads, norm
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-12))
    return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads), norm


def learning_rate(step, *, base_lr, total_steps, warmup_steps=0, schedule="constant",
                  min_lr=0.0):
    """Linear warmup over warmup_steps (base_lr * (step + 1) / warmup_steps: base_lr / warmup_steps
    at step 0, base_lr at step warmup_steps - 1), then constant or cosine to min_lr.

    step counts from 0 (the update being made); works on traced integers."""
    s = jnp.asarray(step, jnp.float32)
    warm = base_lr * (s + 1.0) / max(warmup_steps, 1)
    if schedule == "constant":
        after = jnp.asarray(base_lr, jnp.float32)
    elif schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        frac = jnp.clip((s - warmup_steps) / span, 0.0, 1.0)
        after = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * frac))
    else:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    return jnp.where(s < warmup_steps, warm, after)
