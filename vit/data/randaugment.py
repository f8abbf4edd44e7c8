"""RandAugment (Cubuk et al. 2020) as DeiT trains with it: timm's `rand-m9-mstd0.5-inc1`, on device.

Each image gets `num_ops` layers; a layer draws one of the 15 ops of timm's
_RAND_INCREASING_TRANSFORMS (OPS, uniform, with replacement), applies it with probability `prob`,
at a level drawn per application as N(magnitude, magnitude_std²) clipped to [0, 10], with a random
sign for the ops that have one. Levels map to arguments as timm's *_level_to_arg functions do.

Every op is a pure jnp function of a uint8 batch (B, H, W, C) and per-image arguments (B,),
returning uint8, with PIL's semantics (timm runs PIL): C = 3 is PIL's "RGB", C = 1 its "L".
The ops fall into three kinds, and rand_augment computes one result of each kind per layer:

  LUT ops     AutoContrast, Equalize, Invert, PosterizeIncreasing, SolarizeIncreasing,
              SolarizeAdd: out[..., c] = lut[c, x[..., c]], a table of 256 entries per channel
  blend ops   Color, Contrast, Brightness, Sharpness (ImageEnhance): PIL's blend of a degenerate
              image d with x, out = floor(d + factor·(x - d)) clipped to [0, 255], in float32
  affine ops  Rotate, ShearX, ShearY, TranslateXRel, TranslateYRel (Image.transform, AFFINE,
              BICUBIC, as DeiT's interpolation='bicubic' makes timm's ops resample): output
              pixel centre (x + 0.5, y + 0.5) samples the input at (a·x' + b·y' + c,
              d·x' + e·y' + f), bicubic over 4x4 pixels (vit/data/resample.py); a sample
              outside the image is the fill colour

At level 0 (magnitude 0, std 0) timm leaves the image unchanged under every op but four:
AutoContrast, Equalize and Invert take no level, and PosterizeIncreasing keeps 4 bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit.data.resample import affine

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
LUT_OPS = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing",
           "SolarizeAdd")
BLEND_OPS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

# timm fills with img_mean, round(255 · the mean its images are normalised by): for DeiT the
# ImageNet mean. train_augment passes the training set's own (vitfuse normalises by it), so a
# filled pixel normalises to about 0; without one (rand_augment's fill=None), the ImageNet mean
# for RGB and timm's _FILL grey, 128, in every channel of other images.
FILL_RGB = (124, 116, 104)
FILL_GREY = 128


def fill_colour(channels: int) -> tuple[int, ...]:
    return FILL_RGB if channels == 3 else (FILL_GREY,) * channels


# ---------------------------------------------------------------------------------------------
# LUT ops: tables (B, C, 256) uint8 and their application

def apply_lut(images: jax.Array, luts: jax.Array) -> jax.Array:
    """out[b, h, w, c] = luts[b, c, images[b, h, w, c]] (PIL's Image.point, a table per band)."""
    channel = jnp.arange(images.shape[-1])
    return jax.vmap(lambda lut, x: lut[channel, x.astype(jnp.int32)])(luts, images)


def histograms(images: jax.Array) -> jax.Array:
    """(B, C, 256) int32 pixel counts of each value per image and channel (PIL's histogram)."""
    b, h, w, c = images.shape
    count = jax.vmap(jax.vmap(lambda v: jnp.bincount(v, length=256), in_axes=1))
    return count(images.reshape(b, h * w, c).astype(jnp.int32))


_VALUES = np.arange(256, dtype=np.int32)  # numpy: a jnp array made at import would start JAX's backend


@functools.cache
def _autocontrast_rounded_down() -> np.ndarray:
    """Sorted keys (lo·256 + hi)·256 + i where PIL's autocontrast table is one below
    floor((i - lo)·255 / (hi - lo)) (clipped to [0, 255]). PIL computes int(i·scale + offset)
    in double precision, scale = 255 / (hi - lo), offset = -lo·scale; where the exact value is
    an integer k the double can land just below it and int() gives k - 1 (e.g. lo 0, hi 25,
    i 25 gives 254). A value that is not an integer is at least 1/255 from one, far beyond the
    double's error, so these keys (12094 of the 2^23 (lo < hi, i) triples) are every difference."""
    keys = []
    values = np.arange(256, dtype=np.float64)
    for lo in range(255):
        hi = np.arange(lo + 1, 256)[:, None]
        scale = 255.0 / (hi - lo)
        pil = np.clip((values * scale + (-lo * scale)).astype(np.int64), 0, 255)  # int(): toward 0
        exact = np.clip((np.arange(256) - lo) * 255 // (hi - lo), 0, 255)
        hi_idx, i = np.nonzero(pil != exact)
        keys.append((lo * 256 + hi[hi_idx, 0]) * 256 + i)
    return np.concatenate(keys).astype(np.int32)


def autocontrast_lut(hist: jax.Array) -> jax.Array:
    """ImageOps.autocontrast (cutoff 0) per channel: the lowest value present lo maps to 0, the
    highest hi to 255, linearly between (truncated as PIL's doubles do); identity when hi <= lo."""
    present = hist > 0
    lo = jnp.argmax(present, axis=-1)[..., None]
    hi = 255 - jnp.argmax(present[..., ::-1], axis=-1)[..., None]
    span = jnp.maximum(hi - lo, 1)
    lut = jnp.clip(jnp.floor_divide((_VALUES - lo) * 255, span), 0, 255)
    keys = jnp.asarray(_autocontrast_rounded_down())
    key = (lo * 256 + hi) * 256 + _VALUES
    at = jnp.clip(jnp.searchsorted(keys, key), 0, keys.shape[0] - 1)
    lut = lut - (keys[at] == key)
    return jnp.where(hi > lo, lut, _VALUES).astype(jnp.uint8)


def equalize_lut(hist: jax.Array) -> jax.Array:
    """ImageOps.equalize per channel, PIL's integer algorithm: step = (pixels - count of the
    highest value present) // 255, lut[i] = (step // 2 + pixels below i) // step; identity when
    one value or none is present or step is 0. PIL stores a table entry of 256 as 255."""
    present = hist > 0
    highest = 255 - jnp.argmax(present[..., ::-1], axis=-1)
    last = jnp.take_along_axis(hist, highest[..., None], axis=-1)[..., 0]
    step = (jnp.sum(hist, axis=-1) - last) // 255
    below = jnp.cumsum(hist, axis=-1) - hist
    safe = jnp.maximum(step, 1)[..., None]
    lut = jnp.minimum((safe // 2 + below) // safe, 255)
    keep = (jnp.sum(present, axis=-1) <= 1) | (step == 0)
    return jnp.where(keep[..., None], _VALUES, lut).astype(jnp.uint8)


def invert_lut(channels: int, batch: int) -> jax.Array:
    return jnp.broadcast_to(255 - _VALUES, (batch, channels, 256)).astype(jnp.uint8)


def posterize_lut(bits: jax.Array, channels: int) -> jax.Array:
    """ImageOps.posterize: keep the top `bits` (B,) bits of each value, i & ~(2^(8 - bits) - 1)."""
    shift = (8 - bits.astype(jnp.int32))[:, None, None]
    lut = jnp.right_shift(_VALUES, shift) << shift
    return jnp.broadcast_to(lut, (bits.shape[0], channels, 256)).astype(jnp.uint8)


def solarize_lut(threshold: jax.Array, channels: int) -> jax.Array:
    """ImageOps.solarize: values at or above `threshold` (B,) are inverted."""
    t = threshold.astype(jnp.int32)[:, None, None]
    lut = jnp.where(_VALUES < t, _VALUES, 255 - _VALUES)
    return jnp.broadcast_to(lut, (t.shape[0], channels, 256)).astype(jnp.uint8)


def solarize_add_lut(add: jax.Array, channels: int, threshold: int = 128) -> jax.Array:
    """timm's solarize_add: values below `threshold` get `add` (B,) added, capped at 255."""
    a = add.astype(jnp.int32)[:, None, None]
    lut = jnp.where(_VALUES < threshold, jnp.minimum(_VALUES + a, 255), _VALUES)
    return jnp.broadcast_to(lut, (a.shape[0], channels, 256)).astype(jnp.uint8)


def autocontrast(images):
    return apply_lut(images, autocontrast_lut(histograms(images)))


def equalize(images):
    return apply_lut(images, equalize_lut(histograms(images)))


def invert(images):
    return apply_lut(images, invert_lut(images.shape[-1], images.shape[0]))


def posterize(images, bits):
    return apply_lut(images, posterize_lut(bits, images.shape[-1]))


def solarize(images, threshold):
    return apply_lut(images, solarize_lut(threshold, images.shape[-1]))


def solarize_add(images, add):
    return apply_lut(images, solarize_add_lut(add, images.shape[-1]))


# ---------------------------------------------------------------------------------------------
# blend ops (ImageEnhance): a degenerate image d per op, then PIL's blend

def grayscale(images: jax.Array) -> jax.Array:
    """(B, H, W) int32: PIL's convert("L") of RGB, (19595·R + 38470·G + 7471·B + 2^15) >> 16;
    a 1-channel image as it is; for other channel counts (no PIL mode) the rounded mean."""
    x = images.astype(jnp.int32)
    c = images.shape[-1]
    if c == 3:
        return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return (jnp.sum(x, axis=-1) + c // 2) // c


def blend(degenerate: jax.Array, images: jax.Array, factor: jax.Array) -> jax.Array:
    """Image.blend(degenerate, images, factor): d + factor·(x - d) in float32 (PIL's C float),
    truncated and clipped to [0, 255]; factor (B,)."""
    d = degenerate.astype(jnp.float32)
    diff = (images.astype(jnp.int32) - degenerate.astype(jnp.int32)).astype(jnp.float32)
    out = d + factor.astype(jnp.float32)[:, None, None, None] * diff
    return jnp.clip(jnp.floor(out), 0, 255).astype(jnp.uint8)


def color_degenerate(images):
    """ImageEnhance.Color's: the grayscale image in every channel (the image itself for "L")."""
    return jnp.broadcast_to(grayscale(images)[..., None], images.shape)


def contrast_degenerate(images):
    """ImageEnhance.Contrast's: one grey, int(mean of the grayscale image + 0.5), in every pixel."""
    gray = grayscale(images)
    pixels = gray.shape[1] * gray.shape[2]
    total = jnp.sum(gray, axis=(1, 2))
    mean = (2 * total + pixels) // (2 * pixels)  # = floor(total / pixels + 1/2), in integers
    return jnp.broadcast_to(mean[:, None, None, None], images.shape)


def sharpness_degenerate(images):
    """ImageEnhance.Sharpness's: ImageFilter.SMOOTH, the 3x3 kernel [[1, 1, 1], [1, 5, 1],
    [1, 1, 1]] / 13 rounded to nearest, s = floor(sum / 13 + 1/2) = (2·sum + 13) // 26, on the
    inner pixels; PIL's filter leaves the border rows and columns as they are."""
    x = images.astype(jnp.int32)
    h, w = x.shape[1], x.shape[2]
    total = 4 * x[:, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + x[:, dy:h - 2 + dy, dx:w - 2 + dx]
    smooth = (2 * total + 13) // 26
    return x.at[:, 1:-1, 1:-1].set(smooth)


def color(images, factor):
    return blend(color_degenerate(images), images, factor)


def contrast(images, factor):
    return blend(contrast_degenerate(images), images, factor)


def brightness(images, factor):
    return blend(jnp.zeros_like(images), images, factor)


def sharpness(images, factor):
    return blend(sharpness_degenerate(images), images, factor)


# ---------------------------------------------------------------------------------------------
# affine ops: PIL's inverse maps (a, b, c, d, e, f) (B, 6), sampled by resample.affine

def rotate_matrix(degrees: jax.Array, height: int, width: int) -> jax.Array:
    """Image.rotate(degrees) (counter-clockwise, about the centre (W/2, H/2)): PIL's map with
    angle = -radians(degrees), a = e = cos, b = sin, d = -sin, and c, f such that the centre
    maps to itself."""
    angle = -jnp.deg2rad(degrees.astype(jnp.float32))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return jnp.stack([cos, sin, c, -sin, cos, f], axis=-1)


def shear_x_matrix(factor):
    one, zero = jnp.ones_like(factor), jnp.zeros_like(factor)
    return jnp.stack([one, factor, zero, zero, one, zero], axis=-1)


def shear_y_matrix(factor):
    one, zero = jnp.ones_like(factor), jnp.zeros_like(factor)
    return jnp.stack([one, zero, zero, factor, one, zero], axis=-1)


def translate_matrix(pixels_x, pixels_y):
    """Samples at (x + pixels_x, y + pixels_y): the image moves left/up by positive shifts."""
    one, zero = jnp.ones_like(pixels_x), jnp.zeros_like(pixels_x)
    return jnp.stack([one, zero, pixels_x, zero, one, pixels_y], axis=-1)


def rotate(images, degrees):
    _, h, w, c = images.shape
    return affine(images, rotate_matrix(degrees, h, w), fill_colour(c))


def shear_x(images, factor):
    return affine(images, shear_x_matrix(factor), fill_colour(images.shape[-1]))


def shear_y(images, factor):
    return affine(images, shear_y_matrix(factor), fill_colour(images.shape[-1]))


def translate_x_rel(images, fraction):
    """timm's translate_x_rel: a shift of fraction·W pixels."""
    return affine(images, translate_matrix(fraction * images.shape[2], jnp.zeros_like(fraction)),
                  fill_colour(images.shape[-1]))


def translate_y_rel(images, fraction):
    return affine(images, translate_matrix(jnp.zeros_like(fraction), fraction * images.shape[1]),
                  fill_colour(images.shape[-1]))


# ---------------------------------------------------------------------------------------------
# RandAugment: timm's level -> argument maps, one op per image per layer

def op_arguments(level: jax.Array, sign: jax.Array) -> dict[str, jax.Array]:
    """Each op's argument at `level` (B,) in [0, 10] with `sign` (B,) ±1, as timm's
    *_level_to_arg (sign for the geometric and the enhance ops; _LEVEL_DENOM = 10)."""
    frac = level / 10.0
    enhance = jnp.maximum(0.1, 1.0 + sign * frac * 0.9)  # 1 = unchanged; kept >= 0.1
    return {
        "Rotate": sign * frac * 30.0,  # degrees
        "PosterizeIncreasing": 4 - jnp.floor(frac * 4).astype(jnp.int32),  # bits kept, 4 .. 0
        "SolarizeIncreasing": 256 - jnp.floor(frac * 256).astype(jnp.int32),  # threshold
        "SolarizeAdd": jnp.floor(frac * 110).astype(jnp.int32),  # added below 128
        "ColorIncreasing": enhance, "ContrastIncreasing": enhance,
        "BrightnessIncreasing": enhance, "SharpnessIncreasing": enhance,
        "ShearX": sign * frac * 0.3, "ShearY": sign * frac * 0.3,
        "TranslateXRel": sign * frac * 0.45, "TranslateYRel": sign * frac * 0.45,  # of the side
    }


def _slots(names):
    """For each op index, its position among `names` (0 for ops of another kind)."""
    return jnp.array([names.index(n) if n in names else 0 for n in OPS], jnp.int32)


_KIND = np.array([0 if n in LUT_OPS else 1 if n in BLEND_OPS else 2 for n in OPS], np.int32)


@jax.jit  # one compiled call when run eagerly (tests); inlined in the jitted train step
def apply_op(images: jax.Array, op: jax.Array, level: jax.Array, sign: jax.Array,
             fill=None) -> jax.Array:
    """OPS[op[i]] at level[i] (sign[i]) on image i; op, level, sign (B,); fill (C,): the colour
    the geometric ops bring in (None: fill_colour(C)).

    Rather than all 15 ops per image, one result of each kind: a LUT chosen among the six
    tables, a blend with the degenerate image chosen among four (each one cheap pass over
    the image), a bicubic sample (16 pixels gathered per output pixel) with the matrix chosen
    among five. That is a few passes over the batch per layer (plus one histogram and the
    16 gathers), not 15 full ops."""
    b, h, w, c = images.shape
    arg = op_arguments(level.astype(jnp.float32), sign.astype(jnp.float32))
    pick = jnp.arange(b)
    hist = histograms(images)
    luts = jnp.stack([autocontrast_lut(hist), equalize_lut(hist), invert_lut(c, b),
                      posterize_lut(arg["PosterizeIncreasing"], c),
                      solarize_lut(arg["SolarizeIncreasing"], c),
                      solarize_add_lut(arg["SolarizeAdd"], c)], axis=1)
    by_lut = apply_lut(images, luts[pick, _slots(LUT_OPS)[op]])
    # chosen elementwise, not gathered from a stack: (B, 4, H, W, C) int32 would be 2.4 GB
    # for a batch of 1024 224 px images
    slot = _slots(BLEND_OPS)[op][:, None, None, None]
    degenerate = jnp.where(slot == 0, color_degenerate(images), jnp.where(
        slot == 1, contrast_degenerate(images), jnp.where(
            slot == 2, 0, sharpness_degenerate(images))))
    by_blend = blend(degenerate, images, arg["ColorIncreasing"])
    zero = jnp.zeros_like(level, jnp.float32)
    matrices = jnp.stack([rotate_matrix(arg["Rotate"], h, w), shear_x_matrix(arg["ShearX"]),
                          shear_y_matrix(arg["ShearY"]),
                          translate_matrix(arg["TranslateXRel"] * w, zero),
                          translate_matrix(zero, arg["TranslateYRel"] * h)], axis=1)
    fill = fill_colour(c) if fill is None else fill
    by_affine = affine(images, matrices[pick, _slots(AFFINE_OPS)[op]], fill)
    kind = jnp.asarray(_KIND)[op][:, None, None, None]
    return jnp.where(kind == 0, by_lut, jnp.where(kind == 1, by_blend, by_affine))


def draw(key: jax.Array, batch: int, num_ops: int = 2, magnitude: float = 9.0,
         magnitude_std: float = 0.5, prob: float = 0.5) -> tuple[jax.Array, ...]:
    """RandAugment's random numbers, each (num_ops, batch): the op index (uniform over OPS, with
    replacement), whether it applies (probability prob), its level clip(N(magnitude,
    magnitude_std²), 0, 10) and its sign (±1 at even odds; used by the ops that have one)."""
    k_op, k_on, k_level, k_sign = jax.random.split(key, 4)
    op = jax.random.randint(k_op, (num_ops, batch), 0, len(OPS))
    on = jax.random.bernoulli(k_on, prob, (num_ops, batch))
    noise = jax.random.normal(k_level, (num_ops, batch))
    level = jnp.clip(magnitude + magnitude_std * noise, 0.0, 10.0)
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (num_ops, batch)), -1.0, 1.0)
    return op, on, level, sign


def rand_augment(key: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, fill=None) -> jax.Array:
    """timm's RandAugment on a uint8 batch (B, H, W, C): per image `num_ops` layers in turn, each
    OPS[op] at its level applied where `on` (the draws of `draw`). DeiT: 2, 9, 0.5, 0.5.
    fill (C,) 0..255: what rotate, shear and translate bring in (None: fill_colour(C))."""
    op, on, level, sign = draw(key, images.shape[0], num_ops, magnitude, magnitude_std, prob)
    for layer in range(num_ops):
        out = apply_op(images, op[layer], level[layer], sign[layer], fill)
        images = jnp.where(on[layer][:, None, None, None], out, images)
    return images
