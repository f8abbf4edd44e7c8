"""One jit-compiled training step: preprocess -> forward -> hand-written backward -> AdamW.

    step(params, opt_state, images, labels, key) -> (params, opt_state, metrics)

images: uint8 (B, S, S, C) straight from the data pipeline (normalised on the device here) or
already-normalised floats; labels: int (B,). Everything happens inside one jax.jit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from vit import layers
from vit.config import ViTConfig
from vit.model import model_backward, model_forward
from vit.data.augment import train_augment
from vit.data.loader import normalize as normalize_uint8
from vit.ops import get_ops
from vit.optim import adamw_update, clip_by_global_norm, decay_mask, learning_rate


@dataclass(frozen=True)
class TrainHParams:
    """Optimisation and augmentation settings of one run (the [train] section of a config)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"       # "constant" | "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr: float = 0.0
    clip_norm: float = 0.0           # 0 = no clipping
    label_smoothing: float = 0.0
    crop_pad: int = 0                # random crop after (reflect) padding by this many pixels
    flip: bool = False               # random horizontal flip
    mixup_alpha: float = 0.0         # 0 = off
    cutmix_alpha: float = 0.0        # 0 = off; with both on, each batch picks one (p = 0.5)

    def replace(self, **changes) -> "TrainHParams":
        return dataclasses.replace(self, **changes)


PRECISIONS = ("fp32", "bf16")


def compute_dtype(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def cast_params(params, precision: str):
    """The compute copy of the float32 master weights (a no-op for fp32)."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def hand_written_grads(config: ViTConfig, ops, precision: str = "fp32"):
    """(params, images, targets, key) -> (loss, grads, logits) via the hand-written backward.

    bf16: activations and matmul inputs in bf16 with float32 accumulation; LayerNorm statistics,
    softmax, logits and the loss in float32; gradients returned in float32 for the float32
    master weights and optimizer state."""
    dtype = compute_dtype(precision)

    def grad_fn(params, images, targets, key):
        compute_params = cast_params(params, precision)
        logits, cache = model_forward(compute_params, images.astype(dtype), config, ops, key)
        loss, c_loss = layers.cross_entropy_forward(logits, targets)
        dlogits = layers.cross_entropy_backward(c_loss).astype(dtype)
        grads, _ = model_backward(compute_params, cache, dlogits, config, ops)
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
        return loss, grads, logits
    return grad_fn


def normalize(images, mean, std):
    """uint8 -> float32 (x / 255 - mean) / std per channel; floats pass through unchanged."""
    if images.dtype != jnp.uint8:
        return images
    return normalize_uint8(images, mean, std)


def _stats(mean, std, channels):
    """Per-channel normalisation constants; without them, plain x / 255."""
    if mean is None:
        return (0.0,) * channels, (1.0,) * channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def train_step_fn(config: ViTConfig, hp: TrainHParams, *, ops, mean=None, std=None,
                  grad_fn: Callable | None = None, precision: str = "fp32"):
    """The un-jitted step (params, opt_state, images, labels, key) -> (params, opt_state, metrics).

    make_train_step jits it for one device; vit.parallel jits it with shardings for many."""
    grad_fn = grad_fn or hand_written_grads(config, ops, precision)
    mean, std = _stats(mean, std, config.channels)

    def step(params, opt_state, images, labels, key):
        k_aug, k_drop = jax.random.split(key)
        if images.dtype == jnp.uint8:  # crop/flip, normalise, (smoothed) one-hot, mixup/cutmix
            x, targets = train_augment(
                k_aug, images, labels, mean, std, num_classes=config.num_classes,
                crop_pad=hp.crop_pad, flip=hp.flip, smoothing=hp.label_smoothing,
                mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha)
        else:
            x = images
            targets = layers.one_hot_targets(labels, config.num_classes, hp.label_smoothing)
        loss, grads, logits = grad_fn(params, x, targets, k_drop if config.has_dropout else None)
        grads, grad_norm = clip_by_global_norm(grads, hp.clip_norm)
        lr = learning_rate(opt_state["step"], base_lr=hp.lr, total_steps=hp.total_steps,
                           warmup_steps=hp.warmup_steps, schedule=hp.schedule, min_lr=hp.min_lr)
        params, opt_state = adamw_update(params, grads, opt_state, lr, b1=hp.b1, b2=hp.b2,
                                         eps=hp.eps, weight_decay=hp.weight_decay,
                                         mask=decay_mask(params))
        correct = jnp.argmax(logits, axis=-1) == labels
        metrics = {"loss": loss, "accuracy": jnp.mean(correct.astype(jnp.float32)),
                   "grad_norm": grad_norm, "lr": lr}
        return params, opt_state, metrics

    return step


def make_train_step(config: ViTConfig, hp: TrainHParams, *, fused=False, interpret=None,
                    mean=None, std=None, grad_fn: Callable | None = None, donate=True,
                    precision: str = "fp32"):
    """The jitted single-device step. grad_fn overrides how gradients are taken (tests and
    benchmarks pass JAX autodiff from the oracle package as a baseline; the product always uses
    the hand-written backward)."""
    step = train_step_fn(config, hp, ops=get_ops(fused, interpret), mean=mean, std=std,
                         grad_fn=grad_fn, precision=precision)
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def eval_step_fn(config: ViTConfig, *, ops, mean=None, std=None, precision: str = "fp32"):
    """Un-jitted (params, images, labels, valid) -> sums of loss, top-1 and top-5 hits over the
    valid rows, and the logits."""
    mean, std = _stats(mean, std, config.channels)

    def eval_step(params, images, labels, valid):
        x = normalize(images, mean, std)
        logits, _ = model_forward(cast_params(params, precision), x.astype(compute_dtype(precision)),
                                  config, ops)
        z = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
        nll = -jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
        k = min(5, config.num_classes)
        top5 = jax.lax.top_k(logits, k)[1]
        hit1 = top5[:, 0] == labels
        hit5 = jnp.any(top5 == labels[:, None], axis=-1)
        w = valid.astype(jnp.float32)
        return {"loss_sum": jnp.sum(nll * w), "top1": jnp.sum(hit1 * w),
                "top5": jnp.sum(hit5 * w), "count": jnp.sum(w), "logits": logits}

    return eval_step


def make_eval_step(config: ViTConfig, *, fused=False, interpret=None, mean=None, std=None,
                   precision: str = "fp32"):
    return jax.jit(eval_step_fn(config, ops=get_ops(fused, interpret), mean=mean, std=std,
                                precision=precision))
