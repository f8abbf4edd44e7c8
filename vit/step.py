"""One jit-compiled training step: preprocess -> forward -> hand-written backward -> AdamW.

    step(params, opt_state, images, labels, key) -> (params, opt_state, metrics)

images: uint8 (B, S, S, C) straight from the data pipeline (normalised and augmented on the device
here) or already-normalised floats (trained on as given: a TrainHParams asking to augment them is a
ValueError); labels: int (B,). Everything happens inside one jax.jit.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vit import layers
from vit.config import COMPUTE_DTYPES, TrainHParams, ViTConfig
from vit.data.augment import train_augment
from vit.data.loader import normalize
from vit.model import model_backward, model_forward
from vit.ops import REFERENCE, Ops
from vit.optim import (adamw_update, clip_by_global_norm, decay_mask, layer_lr_scales,
                       learning_rate, trainable_mask)


def jnp_dtype(compute_dtype: str):
    """"fp32" | "bf16" -> the jnp dtype of activations and matmul inputs."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return jnp.bfloat16 if compute_dtype == "bf16" else jnp.float32


def cast_params(params, compute_dtype: str):
    """The compute copy of the float32 master weights (a no-op for fp32)."""
    dtype = jnp_dtype(compute_dtype)
    if dtype == jnp.float32:
        return params
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


def hand_written_grads(config: ViTConfig, ops: Ops = REFERENCE, compute_dtype: str = "fp32"):
    """(params, images, targets, key) -> (loss, grads, logits) via the hand-written backward.

    bf16: activations and matmul inputs in bf16 with float32 accumulation; LayerNorm statistics,
    softmax, logits and the loss in float32; gradients returned in float32 for the float32
    master weights and optimizer state."""
    dtype = jnp_dtype(compute_dtype)

    def grad_fn(params, images, targets, key):
        compute_params = cast_params(params, compute_dtype)
        logits, cache = model_forward(compute_params, images.astype(dtype), config, ops, key)
        loss, c_loss = layers.cross_entropy_forward(logits, targets)
        dlogits = layers.cross_entropy_backward(c_loss).astype(dtype)
        grads, _ = model_backward(compute_params, cache, dlogits, config, ops)
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), grads)
        return loss, grads, logits
    return grad_fn


def accumulated_grads(grad_fn: Callable, accum_steps: int) -> Callable:
    """grad_fn taken over `accum_steps` micro-batches one after another (gradient accumulation).

        (params, x (B, ...), targets (B, K), key) -> (loss, grads, logits (B, K)), as grad_fn

    The loss and every gradient grad_fn returns is a mean over its rows, so with micro-batches of
    equal size m = B / accum_steps the whole batch's values are the means of the micro-batches':

        loss = (1/A) sum_j loss_j        grads = (1/A) sum_j grads_j        (A = accum_steps)

    the same as grad_fn on the whole batch up to the order of float summation. A lax.scan runs
    the micro-batches, so only one micro-batch's activations (the forward's cache) are live at a
    time: memory for m rows, not B. Micro-batch j holds rows j, j + A, j + 2A, ...: on a
    data-parallel mesh (the batch split over the devices in contiguous blocks) every micro-batch
    is then spread over all devices. The logits come back in the batch's own row order.
    Dropout: micro-batch j draws its masks with jax.random.fold_in(key, j) (so they are not the
    masks of one whole-batch draw; without dropout nothing else differs)."""
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r}")
    if accum_steps == 1:
        return grad_fn

    def grad_fn_accumulated(params, x, targets, key):
        rows = x.shape[0]
        if rows % accum_steps:
            raise ValueError(f"a batch of {rows} rows does not split into accum_steps = "
                             f"{accum_steps} micro-batches of equal size")
        m = rows // accum_steps

        def micro_batches(a):  # (B, ...) -> (A, m, ...); micro-batch j = rows j, j + A, ...
            return jnp.swapaxes(a.reshape(m, accum_steps, *a.shape[1:]), 0, 1)

        def one_micro_batch(carry, inputs):
            loss_sum, grad_sum = carry
            j, x_j, targets_j = inputs
            key_j = None if key is None else jax.random.fold_in(key, j)
            loss, grads, logits = grad_fn(params, x_j, targets_j, key_j)
            grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, grads)
            return (loss_sum + loss.astype(jnp.float32), grad_sum), logits

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss_sum, grad_sum), logits = jax.lax.scan(
            one_micro_batch, (jnp.zeros((), jnp.float32), zeros),
            (jnp.arange(accum_steps), micro_batches(x), micro_batches(targets)))
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
        logits = jnp.swapaxes(logits, 0, 1).reshape(rows, *logits.shape[2:])
        return loss_sum / accum_steps, grads, logits

    return grad_fn_accumulated


def _stats(mean, std, channels):
    """Per-channel normalisation constants; without them, plain x / 255."""
    if mean is None:
        return (0.0,) * channels, (1.0,) * channels
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def step_keys(seed: int):
    """global_step (0-based) -> the random key of a run's step there, from its seed alone, so that
    a resume draws what an unbroken run would: vit/training.py gives it to the step, which splits
    it (augmentation, dropout), and evaluate.py --augment draws step 0's augmentation from it.
    The seed's key is made once, not at every step."""
    seed_key = jax.random.PRNGKey(seed)
    return lambda global_step: jax.random.fold_in(seed_key, global_step)


def scheduled_lr(hp: TrainHParams, step):
    """The learning rate of optimizer step `step` (0-based) under hp's schedule: what the train
    step applies, and what train.py logs for an epoch."""
    return learning_rate(step, base_lr=hp.lr, total_steps=hp.total_steps,
                         warmup_steps=hp.warmup_steps, schedule=hp.schedule, min_lr=hp.min_lr)


# the TrainHParams that augment uint8 images (each off at 0 / False)
AUGMENTATIONS = ("crop_pad", "flip", "rand_augment_ops", "random_erase", "mixup_alpha",
                 "cutmix_alpha")


def training_inputs(config: ViTConfig, hp: TrainHParams, images, labels, key, mean=None, std=None):
    """What a training step trains on: (x, targets (B, K) float32) of a batch, given the step's
    augmentation key (the first of split(step key)). uint8 images are cropped, flipped,
    RandAugment-ed, normalised, erased, one-hot (smoothed) and mixed
    (vit.data.augment.train_augment: x float32);
    floats are taken as normalised and left as they are, so hp asking to augment them is a
    ValueError (it was skipped without a word). The step calls it under its jit;
    evaluate.py --augment calls it to draw a run's first batch as its first step saw it."""
    if images.dtype != jnp.uint8:
        asked = [f"{k}={getattr(hp, k)!r}" for k in AUGMENTATIONS if getattr(hp, k)]
        if asked:
            raise ValueError(f"the training images are {images.dtype}, taken as normalised, and "
                             f"augmentation works on uint8 images: TrainHParams {', '.join(asked)} "
                             "would be skipped; give the step uint8 images (it normalises them "
                             "with mean and std), or switch those off")
        return images, layers.one_hot_targets(labels, config.num_classes, hp.label_smoothing)
    mean, std = _stats(mean, std, config.channels)
    return train_augment(key, images, labels, mean, std, num_classes=config.num_classes,
                         crop_pad=hp.crop_pad, flip=hp.flip, smoothing=hp.label_smoothing,
                         mixup_alpha=hp.mixup_alpha, cutmix_alpha=hp.cutmix_alpha,
                         erase_prob=hp.random_erase, rand_augment_ops=hp.rand_augment_ops,
                         rand_augment_magnitude=hp.rand_augment_magnitude,
                         rand_augment_std=hp.rand_augment_std)


def train_step_fn(config: ViTConfig, hp: TrainHParams, *, ops: Ops = REFERENCE, mean=None,
                  std=None, grad_fn: Callable | None = None, compute_dtype: str = "fp32"):
    """The un-jitted step (params, opt_state, images, labels, key) -> (params, opt_state, metrics).

    make_train_step jits it for one device; vit.parallel jits it with shardings for many. The
    batch is augmented whole (mixup partners come from all of it), then its gradients are taken
    in hp.accum_steps micro-batches (accumulated_grads) before one clip and one AdamW update."""
    grad_fn = accumulated_grads(grad_fn or hand_written_grads(config, ops, compute_dtype),
                                hp.accum_steps)

    def step(params, opt_state, images, labels, key):
        # a new random draw takes a third key here: jax.random.split(key, 3) gives the same first
        # two keys as split(key) (jax's default partitionable threefry), so runs that do not use
        # it keep their random numbers; each step's key is fold_in(seed key, global step)
        k_aug, k_drop = jax.random.split(key)
        x, targets = training_inputs(config, hp, images, labels, k_aug, mean, std)
        loss, grads, logits = grad_fn(params, x, targets, k_drop if config.has_dropout else None)
        trained = trainable_mask(params, hp.trainable)  # frozen: a zero gradient (XLA then drops
        grads = jax.tree_util.tree_map(                 # the backward work only they needed)
            lambda g, t: g if t else jnp.zeros_like(g), grads, trained)
        grads, grad_norm = clip_by_global_norm(grads, hp.clip_norm)
        lr = scheduled_lr(hp, opt_state["step"])
        updated, opt_state = adamw_update(params, grads, opt_state, lr, b1=hp.b1, b2=hp.b2,
                                          eps=hp.eps, weight_decay=hp.weight_decay,
                                          mask=decay_mask(params),
                                          lr_scale=None if hp.layer_decay == 1.0 else
                                          layer_lr_scales(params, hp.layer_decay))
        # frozen ones as they were (not merely a zero step: moments from a run that trained them,
        # resumed with another hp.trainable, would still move them)
        params = jax.tree_util.tree_map(lambda new, old, t: new if t else old, updated, params,
                                        trained)
        correct = jnp.argmax(logits, axis=-1) == labels
        metrics = {"loss": loss, "accuracy": jnp.mean(correct.astype(jnp.float32)),
                   "grad_norm": grad_norm, "lr": lr}
        return params, opt_state, metrics

    return step


def make_train_step(config: ViTConfig, hp: TrainHParams, *, ops: Ops = REFERENCE, mean=None,
                    std=None, grad_fn: Callable | None = None, donate=True,
                    compute_dtype: str = "fp32"):
    """The jitted single-device step. grad_fn overrides how gradients are taken (tests and
    benchmarks pass JAX autodiff from the oracle package as a baseline; the product always uses
    the hand-written backward). donate: the step reuses the memory of the params and opt_state
    it is given, which are deleted then: use the ones it returns (donate=False keeps them).
    Labels must be class indices 0..K-1: under jit they cannot be checked, and one outside is a
    row of zero targets (no loss, no gradient); vit.loss and loss_and_grads check known ones."""
    step = train_step_fn(config, hp, ops=ops, mean=mean, std=std, grad_fn=grad_fn,
                         compute_dtype=compute_dtype)
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def eval_step_fn(config: ViTConfig, *, ops: Ops = REFERENCE, mean=None, std=None,
                 compute_dtype: str = "fp32"):
    """Un-jitted (params, images, labels, valid) -> sums of loss, top-1 and top-5 hits over the
    valid rows, and the logits."""
    mean, std = _stats(mean, std, config.channels)

    def eval_step(params, images, labels, valid):
        x = normalize(images, mean, std) if images.dtype == jnp.uint8 else images
        logits, _ = model_forward(cast_params(params, compute_dtype),
                                  x.astype(jnp_dtype(compute_dtype)), config, ops)
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


def make_eval_step(config: ViTConfig, *, ops: Ops = REFERENCE, mean=None, std=None,
                   compute_dtype: str = "fp32"):
    return jax.jit(eval_step_fn(config, ops=ops, mean=mean, std=std, compute_dtype=compute_dtype))


def evaluate_batches(eval_step, params, batches, on_batch=None) -> dict:
    """Run an eval step (make_eval_step's, or vit.parallel's) over batches of (images, labels,
    valid) -> {"loss", "top1", "top5"} means over the valid rows, and their "count". The one
    validation loop of train.py and evaluate.py; on_batch(out, labels, valid) sees each batch's
    outputs (evaluate.py counts its confusion matrix there)."""
    sums = {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for images, labels, valid in batches:
        out = eval_step(params, images, labels, valid)
        for key in sums:
            sums[key] += float(out[key])
        if on_batch is not None:
            on_batch(out, labels, valid)
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "top1": sums["top1"] / n, "top5": sums["top5"] / n,
            "count": int(sums["count"])}
