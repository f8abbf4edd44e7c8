"""PIL's Image.transform(size, AFFINE, matrix, resample, fillcolor) on uint8 batches, in jnp.

Output pixel (x, y) samples the input at (xi, yi) = (a·(x + ½) + b·(y + ½) + c,
d·(x + ½) + e·(y + ½) + f). A sample outside [0, W) x [0, H) is the fill colour. Inside, the
pixel centres around (xi - ½, yi - ½) are interpolated, with x0 = floor(xi - ½), dx = xi - ½ - x0
(and y0, dy alike), coordinates past an edge clamped to it (PIL's XCLIP/YCLIP: edge pixels
repeated), then clipped to [0, 255] and truncated to uint8:

  bicubic   the 4x4 pixels x0 - 1 .. x0 + 2 by y0 - 1 .. y0 + 2: each row's four values
            v1..v4 interpolated at dx, then the four row results at dy, each as PIL's BICUBIC
            macro, v2 + d·((v3 - v1) + d·((2·(v1 - v2) + v3 - v4) + d·(v2 - v1 + v4 - v3))):
            Keys' cubic convolution with a = -1, which can overshoot [0, 255] (hence the clip)
  bilinear  the 2x2 pixels x0 .. x0 + 1 by y0 .. y0 + 1 (never outside [0, 255])

PIL computes in double precision, this in float32 (see tests/test_data_randaugment.py for
what that changes: one level where PIL's value is within float32's error of a whole number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INTERPOLATIONS = ("bicubic", "bilinear")


def cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro: the value at d in [0, 1) between v2 and v3 (a = -1)."""
    return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (v2 - v1 + v4 - v3)))


def sample(image, xi, yi, interpolation="bicubic"):
    """(H', W', C) float32 whole numbers in [0, 255]: `image` (H, W, C) interpolated at the
    points (xi, yi) (H', W'), clipped and truncated (the clip here, not left to the uint8 cast,
    whose handling of values out of range is the backend's)."""
    h, w, _ = image.shape
    x0, y0 = jnp.floor(xi - 0.5), jnp.floor(yi - 0.5)
    dx, dy = (xi - 0.5 - x0)[..., None], (yi - 0.5 - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    taps = range(-1, 3) if interpolation == "bicubic" else range(2)
    cols = [jnp.clip(x0 + k, 0, w - 1) for k in taps]
    rows = [jnp.clip(y0 + k, 0, h - 1) for k in taps]
    px = image.astype(jnp.float32)
    if interpolation == "bicubic":
        across = [cubic(*(px[r, c] for c in cols), dx) for r in rows]
        return jnp.floor(jnp.clip(cubic(*across, dy), 0, 255))
    top, bottom = ((px[r, cols[0]] + (px[r, cols[1]] - px[r, cols[0]]) * dx) for r in rows)
    return jnp.floor(top + (bottom - top) * dy)


def affine(images: jax.Array, matrix: jax.Array, fill, interpolation: str = "bicubic") -> jax.Array:
    """Image.transform(size, AFFINE, matrix, BICUBIC (or BILINEAR), fillcolor=fill) per image of
    a uint8 batch (B, H, W, C); matrix (B, 6), PIL's inverse map (a, b, c, d, e, f)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    _, h, w, _ = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                          jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
    fill = jnp.asarray(fill, jnp.float32)

    def one(image, m):
        xi = m[0] * xs + m[1] * ys + m[2]
        yi = m[3] * xs + m[4] * ys + m[5]
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        value = sample(image, xi, yi, interpolation)
        return jnp.where(inside[..., None], value, fill).astype(jnp.uint8)

    return jax.vmap(one)(images, matrix.astype(jnp.float32))
