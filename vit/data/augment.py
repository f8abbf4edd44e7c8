"""Augmentations of device batches: pure jnp functions of a jax.random key, jit-able, independent per image
(crop, flip, RandAugment (vit.data.randaugment), random erasing) or paired within the batch (mixup, cutmix).

Shapes: images (B, H, W, C), labels (B,) int, targets (B, K) float32 (soft labels, rows sum to 1).

Mixup and cutmix pair each image a with a partner b (a random permutation of the batch) and one
λ ~ Beta(alpha, alpha) per batch; their targets are

    targets = λ·y_a + (1 - λ)·y_b

where y_a, y_b are the (possibly label-smoothed) targets of a and b. Mixup blends pixels with the same λ;
cutmix pastes a box of b into a, the box area being a fraction 1 - λ of the image, and then sets λ to the
fraction of pixels actually left from a (the box is clipped at the borders), so targets match the pixels.

Python arguments (pad, alpha, num_classes...) shape the computation: close over them (functools.partial)
or mark them static when jitting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vit.data.loader import normalize
from vit.data.randaugment import rand_augment
from vit.layers import one_hot_targets


def random_crop(key: jax.Array, images: jax.Array, pad: int, mode: str = "reflect") -> jax.Array:
    """Pad each side by `pad` pixels (mode "reflect" or "zero"), then crop back to (H, W) at a random offset
    per image. pad=0 returns the images unchanged."""
    if pad == 0:
        return images
    if mode not in ("reflect", "zero"):
        raise ValueError(f"mode must be 'reflect' or 'zero', got {mode!r}")
    b, h, w, c = images.shape
    if mode == "reflect" and (pad >= h or pad >= w):
        raise ValueError(f"reflect padding {pad} needs images larger than {pad} pixels, got {h}x{w}")
    padded = jnp.pad(
        images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect" if mode == "reflect" else "constant"
    )
    offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)  # top-left corner in the padded image

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, p: float = 0.5) -> jax.Array:
    """Mirror each image left-right with probability p."""
    flip = jax.random.bernoulli(key, p, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_erase(key: jax.Array, images: jax.Array, p: float, area=(0.02, 1 / 3),
                 aspect=(0.3, 1 / 0.3), attempts: int = 10) -> jax.Array:
    """Random erasing (Zhong et al. 2020) as DeiT trains with it (timm's RandomErasing, "pixel"
    mode): with probability p per image, one box is filled with N(0, 1) noise, a draw per pixel
    and channel; apply after normalize, so the noise has the data's own scale. The box covers a
    fraction of the image uniform in `area`, with height / width log-uniform in `aspect`, at a
    uniform position; of `attempts` draws the first that fits inside the image is used, and an
    image that none fits stays whole (timm's 10 tries)."""
    b, h, w, _ = images.shape
    k_on, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
    box_area = jax.random.uniform(k_area, (b, attempts), minval=area[0], maxval=area[1]) * (h * w)
    ratio = jnp.exp(jax.random.uniform(k_aspect, (b, attempts), minval=jnp.log(aspect[0]),
                                       maxval=jnp.log(aspect[1])))
    box_h = jnp.round(jnp.sqrt(box_area * ratio)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(box_area / ratio)).astype(jnp.int32)
    fits = (box_h < h) & (box_w < w)  # timm's test: strictly inside
    first = jnp.argmax(fits, axis=1)[:, None]
    box_h = jnp.take_along_axis(box_h, first, axis=1)[:, 0]
    box_w = jnp.take_along_axis(box_w, first, axis=1)[:, 0]
    on = jax.random.bernoulli(k_on, p, (b,)) & jnp.any(fits, axis=1)
    top = jax.random.randint(k_top, (b,), 0, h - box_h + 1)  # 0..H-h, as timm's randint
    left = jax.random.randint(k_left, (b,), 0, w - box_w + 1)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    in_box = (on[:, None, None] & (rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    return jnp.where(in_box[..., None], noise, images)


def mix_params(key: jax.Array, batch_size: int, alpha: float) -> tuple[jax.Array, jax.Array]:
    """(λ ~ Beta(alpha, alpha) as a float32 scalar, partner index of each image (B,)) used by mixup/cutmix."""
    key_lam, key_partner = jax.random.split(key)
    lam = jax.random.beta(key_lam, alpha, alpha).astype(jnp.float32)
    partner = jax.random.permutation(key_partner, batch_size)
    return lam, partner


def blend(images: jax.Array, targets: jax.Array, lam: jax.Array, partner: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mixup given λ and the partners: λ·x_a + (1-λ)·x_b (float32) and λ·y_a + (1-λ)·y_b."""
    x = images.astype(jnp.float32)
    mixed = lam * x + (1.0 - lam) * x[partner]
    return mixed, lam * targets + (1.0 - lam) * targets[partner]


def mixup(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """λ·x_a + (1-λ)·x_b with targets λ·y_a + (1-λ)·y_b; images become float32 (apply after normalize)."""
    lam, partner = mix_params(key, images.shape[0], alpha)
    return blend(images, targets, lam, partner)


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, ...]:
    """(y0, y1, x0, x1) of a box of about (1 - lam)·H·W pixels around a uniform random centre, clipped."""
    key_y, key_x = jax.random.split(key)
    side = jnp.sqrt(1.0 - lam)
    cut_h = (height * side).astype(jnp.int32)
    cut_w = (width * side).astype(jnp.int32)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy - cut_h // 2 + cut_h, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx - cut_w // 2 + cut_w, 0, width)
    return y0, y1, x0, x1


def paste_box(
    key: jax.Array, images: jax.Array, targets: jax.Array, lam: jax.Array, partner: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cutmix given λ and the partners: one random box (area ≈ (1-λ)·H·W) of b pasted into every a; targets
    use λ recomputed as the fraction of pixels left from a. Keeps the image dtype (uint8 or float)."""
    _, h, w, _ = images.shape
    y0, y1, x0, x1 = cutmix_box(key, h, w, lam)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    in_box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (H, W), same box for the batch
    mixed = jnp.where(in_box[None, :, :, None], images[partner], images)
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    return mixed, lam * targets + (1.0 - lam) * targets[partner]


def cutmix(key: jax.Array, images: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Paste the same random box of each partner b into image a; targets λ·y_a + (1-λ)·y_b with
    λ = 1 - box area / (H·W) after clipping. Works on any image dtype (uint8 or normalized floats)."""
    key_mix, key_box = jax.random.split(key)
    lam, partner = mix_params(key_mix, images.shape[0], alpha)
    return paste_box(key_box, images, targets, lam, partner)


def train_augment(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    mean,
    std,
    *,
    num_classes: int,
    crop_pad: int,
    flip: bool,
    crop_mode: str = "reflect",
    smoothing: float = 0.0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    cutmix_prob: float = 0.5,
    erase_prob: float = 0.0,
    rand_augment_ops: int = 0,
    rand_augment_magnitude: float = 9.0,
    rand_augment_std: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """The training pipeline of one uint8 batch: crop, flip, RandAugment (rand_augment_ops > 0),
    normalize, random erasing, smoothed one-hot, then mixup or cutmix (DeiT's order: RandAugment
    on the uint8 image as timm's PIL ops, erasing per image, mixing per batch).

    With both alphas > 0 each batch gets cutmix with probability cutmix_prob, else mixup.
    Returns float32 images (B, H, W, C) and float32 soft targets (B, K).
    """
    # split(key, 6)'s first five keys are split(key, 5)'s, and its first four split(key, 4)'s
    # (jax's partitionable threefry): the erasing and RandAugment keys change no other draw of
    # a run without them
    key_crop, key_flip, key_mix, key_choice, key_erase, key_rand = jax.random.split(key, 6)
    x = random_crop(key_crop, images, crop_pad, crop_mode)
    if flip:
        x = random_flip(key_flip, x)
    if rand_augment_ops > 0:  # filled with the mean the images are normalised by, as timm
        fill = jnp.clip(jnp.round(255 * jnp.asarray(mean, jnp.float32)), 0, 255)
        x = rand_augment(key_rand, x, rand_augment_ops, rand_augment_magnitude, rand_augment_std,
                         fill=fill)
    x = normalize(x, mean, std)
    if erase_prob > 0:
        x = random_erase(key_erase, x, erase_prob)
    targets = one_hot_targets(labels, num_classes, smoothing)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(key_choice, cutmix_prob)
        # One Beta draw with the chosen alpha (sampling Beta is the slow part to compile), then one of the two.
        key_lam, key_box = jax.random.split(key_mix)
        alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
        lam, partner = mix_params(key_lam, x.shape[0], alpha)
        x, targets = jax.lax.cond(
            use_cutmix,
            lambda: paste_box(key_box, x, targets, lam, partner),
            lambda: blend(x, targets, lam, partner),
        )
    elif mixup_alpha > 0:
        x, targets = mixup(key_mix, x, targets, mixup_alpha)
    elif cutmix_alpha > 0:
        x, targets = cutmix(key_mix, x, targets, cutmix_alpha)
    return x, targets
