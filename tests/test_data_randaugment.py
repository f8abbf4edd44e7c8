"""RandAugment (vit.data.randaugment; train.rand_augment_ops, _magnitude, _std): each op against
PIL's (what timm's RandAugment runs, for DeiT's rand-m9-mstd0.5-inc1), the draws of rand_augment
(ops uniform per image and layer, prob, levels N(m, std²) clipped to [0, 10], signs), and the
train step applying it after crop and flip without moving any other random draw."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vit.data import randaugment as ra
from vit.data.resample import affine, sample

RNG = np.random.default_rng(0)
H, W = 20, 28  # not square: a swapped height and width shows


def random_images(channels, n=8):
    """uint8 (n, H, W, channels), each image of its own value range (some narrow, some of a few
    levels) so that autocontrast and equalize have something to do."""
    out = []
    for i in range(n):
        lo = int(RNG.integers(0, 200))
        hi = int(RNG.integers(lo + 1, 256))
        levels = [2, 5, 256][i % 3]
        values = RNG.integers(0, levels, (H, W, channels)) * (hi - lo) // max(levels - 1, 1) + lo
        out.append(np.clip(values, 0, 255).astype(np.uint8))
    return np.stack(out)


def smooth_images(channels, n=3):
    """uint8 images of smooth waves (up to about 40 levels per pixel): bicubic and bilinear
    sampling, or samples half a pixel apart, differ by far more than PIL's truncation."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    out = []
    for i in range(n):
        chans = [127.5 + 120 * np.sin(0.35 * x + 0.2 * y + i + c) * np.cos(0.25 * y - 0.1 * x + c)
                 for c in range(channels)]
        out.append(np.stack(chans, -1))
    return np.round(np.stack(out)).astype(np.uint8)


def pil(images, fn):
    """fn applied to each image as a PIL image ("RGB" or "L"), back as an array like images."""
    out = []
    for x in np.asarray(images):
        y = fn(Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x))
        out.append(np.asarray(y).reshape(x.shape))
    return np.stack(out)


def per_image(fn, images, args):
    """fn(images, args) in jnp, an argument per image."""
    return np.asarray(fn(jnp.asarray(images), jnp.asarray(args)))


@pytest.mark.parametrize("channels", [3, 1])
def test_autocontrast_equalize_invert_are_pils(channels):
    images = random_images(channels, 24)
    for ours, theirs in ((ra.autocontrast, ImageOps.autocontrast), (ra.equalize, ImageOps.equalize),
                         (ra.invert, ImageOps.invert)):
        np.testing.assert_array_equal(np.asarray(ours(jnp.asarray(images))), pil(images, theirs),
                                      err_msg=ours.__name__)


def test_autocontrast_keeps_pils_rounding_down_of_whole_values():
    """PIL's doubles put some exact values a hair below their integer (lo 0, hi 25: 25 -> 254,
    not 255); every (lo, hi) pair of one channel's range, one image each."""
    lo, hi = np.triu_indices(256, 1)
    pick = RNG.choice(lo.size, 3000, replace=False)
    lo, hi = lo[pick], hi[pick]
    ramp = np.linspace(0, 1, 16)
    images = np.round(lo[:, None] + ramp[None] * (hi - lo)[:, None]).astype(np.uint8)
    images = images.reshape(-1, 4, 4, 1)
    want = pil(images, ImageOps.autocontrast)
    got = np.asarray(ra.autocontrast(jnp.asarray(images)))
    floor = np.clip((images.astype(int) - lo[:, None, None, None]) * 255
                    // (hi - lo)[:, None, None, None], 0, 255)
    assert np.sum(floor != want) > 100  # the values PIL rounds down are among these
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels", [3, 1])
def test_posterize_solarize_solarize_add_are_pils(channels):
    images = random_images(channels)
    n = len(images)
    bits = np.arange(n) % 5  # 0 .. 4, the bits PosterizeIncreasing keeps
    thresholds = np.array([0, 1, 64, 127, 128, 200, 255, 256])[:n]
    adds = np.array([0, 1, 11, 55, 99, 110, 30, 70])[:n]

    def each(fn, args):
        return np.stack([pil(images[i:i + 1], lambda im: fn(im, int(a)))[0] for i, a in enumerate(args)])

    def posterize(im, bits):
        """Pillow 13 refuses 0 bits (timm's level 10); the Pillow DeiT ran with applied its table
        i & ~(2^8 - 1), black, as ours does."""
        return ImageOps.posterize(im, bits) if bits else im.point(lambda i: 0)

    def solarize_add(im, add):  # timm's
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        return im.point(lut * len(im.getbands()))

    np.testing.assert_array_equal(per_image(ra.posterize, images, bits), each(posterize, bits))
    np.testing.assert_array_equal(per_image(ra.solarize, images, thresholds),
                                  each(ImageOps.solarize, thresholds))
    np.testing.assert_array_equal(per_image(ra.solarize_add, images, adds), each(solarize_add, adds))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_the_enhance_ops_are_pils(name, channels):
    """ImageEnhance at timm's factors for m 0 .. 10 (1 ± 0.09·m, at least 0.1), both sides of 1."""
    images = random_images(channels)
    factors = np.array([0.1, 0.19, 0.55, 1.0, 1.27, 1.63, 1.81, 1.9], np.float32)
    ours = {"Color": ra.color, "Contrast": ra.contrast, "Brightness": ra.brightness,
            "Sharpness": ra.sharpness}[name]
    theirs = getattr(ImageEnhance, name)
    want = np.stack([pil(images[i:i + 1], lambda im: theirs(im).enhance(float(f)))[0]
                     for i, f in enumerate(factors)])
    np.testing.assert_array_equal(per_image(ours, images, factors), want)


FILL = {3: (124, 116, 104), 1: (128,)}


def geometric_images(channels):
    """Smooth waves, and images of 2, 5 and 256 levels with sharp steps between neighbours: on
    those, bicubic overshoots [0, 255] (PIL clips) and a wrong cubic is off by many levels."""
    return np.concatenate([smooth_images(channels), random_images(channels, 6)])


def assert_close_to_pil(ours, theirs, fill, moved=True):
    """Geometric ops against PIL's BICUBIC: within 1 level wherever both sample inside the image,
    in at most 1% of those values (we see up to 0.1%), and the fill colour in the same pixels
    but for at most 2 per image (we see none). PIL samples and interpolates in double precision
    and truncates, we in float32 (a relative error of about 1e-7, some 1e-4 levels after the 16
    products of the cubic, and 1e-6 pixels in the sample point): where PIL's value lies within
    that of a whole number we can land on its other side, one level off, and a sample point
    within float32's error of an edge can fall on the other side of it. Bicubic needs no more
    than bilinear did (1 level, 2 edge pixels): its weights are polynomials of the same
    fractions, its clip to [0, 255] is exact, and it is continuous in the sample point, so a
    neighbourhood picked one pixel over near a whole coordinate changes the value by rounding
    only. A cubic with another a, a neighbourhood one pixel off, a missing clip (overshoot
    wraps around uint8) or a missing edge clamp is many levels off in many pixels."""
    fill = np.asarray(fill)
    ours_fill, their_fill = np.all(ours == fill, -1), np.all(theirs == fill, -1)
    assert np.all(np.sum(ours_fill != their_fill, axis=(1, 2)) <= 2)
    if moved:
        assert 0.02 < np.mean(their_fill) < 0.6  # the tested maps move the image, not all out
    both = ~ours_fill & ~their_fill
    diff = np.abs(ours.astype(int) - theirs.astype(int))[both]
    assert diff.max() <= 1 and np.mean(diff) < 0.01, (diff.max(), np.mean(diff))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("degrees", [27.0, -27.0, 9.5, -30.0])
def test_rotate_is_pils_bicubic_about_the_centre(degrees, channels):
    images = geometric_images(channels)
    want = pil(images, lambda im: im.rotate(degrees, resample=Image.BICUBIC,
                                            fillcolor=FILL[channels]))
    got = per_image(ra.rotate, images, np.full(len(images), degrees, np.float32))
    assert_close_to_pil(got, want, FILL[channels])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name, value", [("ShearX", 0.27), ("ShearX", -0.3), ("ShearY", 0.27),
                                         ("ShearY", -0.12), ("TranslateXRel", 0.405),
                                         ("TranslateXRel", -0.2), ("TranslateYRel", 0.405),
                                         ("TranslateYRel", -0.2)])
def test_shear_and_translate_are_timms_affine_maps(name, value, channels):
    """timm's: shear_x (1, f, 0, 0, 1, 0), shear_y (1, 0, 0, f, 1, 0), translate_x_rel
    (1, 0, pct·W, 0, 1, 0), translate_y_rel (1, 0, 0, 0, 1, pct·H), through Image.transform
    with BICUBIC (DeiT's interpolation)."""
    images = geometric_images(channels)
    matrix = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
              "TranslateXRel": (1, 0, value * W, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, value * H)}[name]
    want = pil(images, lambda im: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC,
                                               fillcolor=FILL[channels]))
    ours = {"ShearX": ra.shear_x, "ShearY": ra.shear_y, "TranslateXRel": ra.translate_x_rel,
            "TranslateYRel": ra.translate_y_rel}[name]
    got = per_image(ours, images, np.full(len(images), value, np.float32))
    assert_close_to_pil(got, want, FILL[channels])


@pytest.mark.parametrize("channels", [3, 1])
def test_bicubic_overshoot_is_clipped_and_edges_repeat_as_pils(channels):
    """Stripes of 0 and 255 (2 px wide, so every 4x4 neighbourhood holds both) moved by a
    fraction of a pixel: the cubic overshoots below 0 and above 255 beside every step (PIL
    clips to 0 and 255), and the taps past the edge (a move of 0.37 px left and up reads a
    row and column beyond the last) are the edge's. Not 0.4: at a round fraction one sum of
    weights times 255 is a whole number in doubles, and as every pixel has one of a few
    neighbourhoods, float32's level below it shows in 2.5% of them."""
    y, x = np.mgrid[0:H, 0:W]
    stripes = np.where(((x // 2) + (y // 3)) % 2 == 0, 0, 255)
    images = np.repeat(np.stack([stripes, 255 - stripes])[..., None], channels, -1).astype(np.uint8)
    matrix = (1, 0, 0.37, 0, 1, 0.37)
    want = pil(images, lambda im: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC,
                                               fillcolor=FILL[channels]))
    got = np.asarray(affine(jnp.asarray(images), jnp.tile(jnp.asarray(matrix, jnp.float32), (2, 1)),
                            FILL[channels]))
    assert np.mean((want == 0) | (want == 255)) > 0.3  # no neighbourhood is flat: all clipped
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32) + np.float32(0.5 + 0.37)
    values = np.asarray(sample(jnp.asarray(images[0]), jnp.asarray(xs), jnp.asarray(ys)))
    assert values.min() == 0 and values.max() == 255  # clipped before the cast, which may wrap
    assert not np.any(np.all(want == np.asarray(FILL[channels]), -1))  # nothing past the edge
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff) < 0.01, (diff.max(), np.mean(diff))


@pytest.mark.parametrize("channels", [3, 1])
def test_bilinear_stays_pils_bilinear(channels):
    """affine(..., "bilinear"): Image.transform with BILINEAR, same tolerance; a rotation's map."""
    images = geometric_images(channels)
    matrix = np.asarray(ra.rotate_matrix(jnp.full(len(images), 21.0), H, W))
    want = np.stack([pil(images[i:i + 1], lambda im: im.transform(
        im.size, Image.AFFINE, tuple(map(float, matrix[i])), resample=Image.BILINEAR,
        fillcolor=FILL[channels]))[0] for i in range(len(images))])
    got = np.asarray(affine(jnp.asarray(images), jnp.asarray(matrix), FILL[channels], "bilinear"))
    assert_close_to_pil(got, want, FILL[channels])
    with pytest.raises(ValueError, match="interpolation must be one of"):
        affine(jnp.asarray(images), jnp.asarray(matrix), FILL[channels], "nearest")


def timm_op(name, level, sign, channels):
    """timm's AugmentOp body for one op at `level` (after the magnitude noise and the clip) with
    its _randomly_negate outcome `sign`, as a function of a PIL image (double precision); the
    geometric ops resample BICUBIC, DeiT's interpolation='bicubic' passed on by timm."""
    frac, fill = level / 10.0, FILL[channels]
    enhance = max(0.1, 1.0 + sign * frac * 0.9)
    solarize_add = [min(255, i + int(frac * 110)) if i < 128 else i for i in range(256)]
    bits = 4 - int(frac * 4)

    def transform(matrix):
        return lambda im: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BICUBIC,
                                       fillcolor=fill)
    return {
        "AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize,
        "Invert": ImageOps.invert,
        "Rotate": lambda im: im.rotate(sign * frac * 30.0, resample=Image.BICUBIC, fillcolor=fill),
        "PosterizeIncreasing": lambda im: (ImageOps.posterize(im, bits) if bits else
                                           im.point(lambda i: 0)),
        "SolarizeIncreasing": lambda im: ImageOps.solarize(im, 256 - int(frac * 256)),
        "SolarizeAdd": lambda im: im.point(solarize_add * channels),
        "ColorIncreasing": lambda im: ImageEnhance.Color(im).enhance(enhance),
        "ContrastIncreasing": lambda im: ImageEnhance.Contrast(im).enhance(enhance),
        "BrightnessIncreasing": lambda im: ImageEnhance.Brightness(im).enhance(enhance),
        "SharpnessIncreasing": lambda im: ImageEnhance.Sharpness(im).enhance(enhance),
        "ShearX": transform((1, sign * frac * 0.3, 0, 0, 1, 0)),
        "ShearY": transform((1, 0, 0, sign * frac * 0.3, 1, 0)),
        "TranslateXRel": lambda im: transform((1, 0, sign * frac * 0.45 * im.size[0], 0, 1, 0))(im),
        "TranslateYRel": lambda im: transform((1, 0, 0, 0, 1, sign * frac * 0.45 * im.size[1]))(im),
    }[name]


APPLY_OP = ra.apply_op  # jitted
# levels whose arguments float32 and doubles agree on (e.g. 7.3: 2.92 -> 2 bits dropped,
# threshold 256 - 186, +80), with both signs, and the clip's ends 0 and 10; not 9 with sign -1,
# whose enhance factor 1 - 0.81 is an ulp below float(0.19) in float32 (100 -> 18, PIL's 19):
# levels are random draws, so an ulp of an argument is no one's exact value
LEVELS = np.array([0.0, 3.7, 7.3, 10.0, 0.0, 3.7, 7.3, 10.0, 9.0])
SIGNS = np.array([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0])


@pytest.mark.parametrize("channels", [3, 1])
def test_each_op_index_is_timms_op_with_timms_argument_at_each_level(channels):
    """apply_op (what rand_augment runs) against timm's ops on PIL, op by op, with timm's level
    to argument maps (rotate ±30°·m/10, posterize 4 - int(0.4·m) bits, solarize at 256 -
    int(25.6·m), solarize_add int(11·m), enhance max(0.1, 1 ± 0.09·m), shear ±0.03·m,
    translate ±0.045·m of the side)."""
    n = len(LEVELS)
    for index, name in enumerate(ra.OPS):
        geometric = name in ra.AFFINE_OPS
        images = smooth_images(channels, n) if geometric else random_images(channels, n)
        got = np.asarray(APPLY_OP(jnp.asarray(images), jnp.full(n, index), jnp.asarray(LEVELS),
                                  jnp.asarray(SIGNS)))
        want = np.stack([pil(images[i:i + 1], timm_op(name, LEVELS[i], SIGNS[i], channels))[0]
                         for i in range(n)])
        if geometric:
            assert_close_to_pil(got, want, FILL[channels], moved=False)
            moved = LEVELS > 0
            assert np.all(np.any(got[moved] != images[moved], axis=(1, 2, 3))), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_at_level_0_only_autocontrast_equalize_invert_and_posterize_change_images():
    """timm at magnitude 0 with std 0: every op with a level is the identity (rotate 0°, shear and
    translate 0, solarize at 256, +0, enhance factor 1) but PosterizeIncreasing, which keeps 4
    bits; AutoContrast, Equalize and Invert take no level."""
    images = jnp.asarray(random_images(3, 6))
    changing = {"AutoContrast", "Equalize", "Invert", "PosterizeIncreasing"}
    for index, name in enumerate(ra.OPS):
        for sign in (1.0, -1.0):
            got = np.asarray(APPLY_OP(images, jnp.full(6, index), jnp.zeros(6), jnp.full(6, sign)))
            unchanged = np.all(got == np.asarray(images), axis=(1, 2, 3))
            assert (not unchanged.any()) if name in changing else unchanged.all(), (name, unchanged)


DRAW = jax.jit(ra.draw, static_argnums=(1, 2))


def test_ops_are_drawn_uniformly_per_image_and_layer_with_prob_levels_and_signs():
    """6000 images x 2 layers: each of the 15 ops 800 times per layer (binomial sd 27; 5 sd
    allowed), the two layers' ops independent (the same op 1/15 of the time), applied with
    probability prob, levels N(9, 0.5²) clipped to [0, 10], signs ±1 at even odds."""
    n = 6000
    op, on, level, sign = map(np.asarray, DRAW(jax.random.key(0), n, 2, 9.0, 0.5, 0.5))
    assert op.shape == on.shape == level.shape == sign.shape == (2, n)
    for layer in range(2):
        counts = np.bincount(op[layer], minlength=len(ra.OPS))
        assert counts.size == 15 and np.all(np.abs(counts - n / 15) < 140), counts
    assert abs(np.mean(op[0] == op[1]) - 1 / 15) < 0.02
    assert abs(on.mean() - 0.5) < 0.02 and abs(np.mean(on[0] & on[1]) - 0.25) < 0.02
    assert level.min() >= 0 and level.max() == 10.0
    assert abs(level.mean() - 9.0) < 0.02 and abs(level.std() - 0.49) < 0.02, (level.mean(), level.std())
    assert 0.015 < np.mean(level == 10.0) < 0.032  # P(N(9, 0.5²) > 10) = 0.023, clipped to 10
    assert set(np.unique(sign)) == {-1.0, 1.0} and abs(sign.mean()) < 0.03
    _, on, level, _ = map(np.asarray, DRAW(jax.random.key(1), n, 3, 0.0, 0.0, 0.2))
    assert on.shape == (3, n) and abs(on.mean() - 0.2) < 0.02 and np.all(level == 0.0)


def test_whether_an_op_applies_its_level_and_sign_and_each_layers_are_drawn_apart():
    """on, level and sign of each layer: 6 draws pairwise uncorrelated (20000 images; |r| under
    4/sqrt(n) = 0.028, sd 0.007). A sign or level drawn from `on`'s key would make every applied
    op turn one way or weaker than m; one draw shared by the layers, both layers alike."""
    n = 20000
    _, on, level, sign = (np.asarray(a, np.float64) for a in DRAW(jax.random.key(2), n, 2, 5.0, 2.0, 0.5))
    corr = np.corrcoef(np.concatenate([on, level, sign]))  # rows: on 0, on 1, level 0, ...
    assert np.all(np.isfinite(corr)) and np.abs(corr - np.eye(6)).max() < 4 / np.sqrt(n), corr.round(3)


RAND_AUGMENT = jax.jit(ra.rand_augment, static_argnums=(2, 3, 4, 5))


@pytest.mark.parametrize("channels", [3, 1])
def test_rand_augment_applies_its_draws_layer_after_layer(channels):
    """rand_augment(key) is apply_op with draw(key)'s op, level and sign, layer 1 on the output of
    layer 0, each image kept where its draw is off; jitted, uint8 (B, H, W, C) in and out."""
    images = jnp.asarray(random_images(channels, 16))
    key = jax.random.key(3)
    op, on, level, sign = ra.draw(key, 16, 2, 9.0, 0.5, 0.5)
    want = images
    for layer in range(2):
        out = APPLY_OP(want, op[layer], level[layer], sign[layer])
        want = jnp.where(on[layer][:, None, None, None], out, want)
    got = RAND_AUGMENT(key, images, 2, 9.0, 0.5, 0.5)
    assert got.dtype == jnp.uint8 and got.shape == images.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    defaults = inspect.signature(ra.rand_augment).parameters
    assert [defaults[k].default for k in ("num_ops", "magnitude", "magnitude_std", "prob")] == [
        2, 9.0, 0.5, 0.5]  # DeiT's rand-m9-mstd0.5-inc1
    assert len({int(o) for o in np.asarray(op).ravel()}) > 8  # many ops in one batch


@pytest.mark.parametrize("prob", [0.5, 0.2])
def test_a_share_prob_of_the_images_changes_under_one_op(prob):
    """One layer at level 10: every op changes these images (narrow ranges, no constant image),
    so the share changed is prob's (binomial sd 0.025 on 400 images)."""
    images = jnp.asarray(np.stack([random_images(3, 1)[0] for _ in range(400)]))
    out = np.asarray(RAND_AUGMENT(jax.random.key(4), images, 1, 10.0, 0.0, prob))
    changed = np.any(out != np.asarray(images), axis=(1, 2, 3))
    assert abs(changed.mean() - prob) < 0.1, changed.mean()


def test_keys_differ_and_repeat():
    images = jnp.asarray(random_images(3, 32))
    one, again, two = (np.asarray(RAND_AUGMENT(jax.random.key(k), images, 2, 9.0, 0.5, 0.5))
                       for k in (5, 5, 6))
    np.testing.assert_array_equal(one, again)
    assert np.mean(np.any(one != two, axis=(1, 2, 3))) > 0.3


def test_split_6_extends_split_5_and_split_4():
    """train_augment's claim: the erasing key is split(key, 5)[4] = split(key, 6)[4] and the other
    draws' keys split(key, 4)'s, whatever the split's length (jax's partitionable threefry)."""
    for seed in (0, 11, 12345):
        key = jax.random.key(seed)
        six = jax.random.key_data(jax.random.split(key, 6))
        np.testing.assert_array_equal(six[:5], jax.random.key_data(jax.random.split(key, 5)))
        np.testing.assert_array_equal(six[:4], jax.random.key_data(jax.random.split(key, 4)))
        assert len({tuple(np.asarray(k).ravel()) for k in six}) == 6


@pytest.mark.parametrize("flip, mix", [(False, {}), (True, {"mixup_alpha": 0.4}),
                                       (True, {"cutmix_alpha": 1.0, "erase_prob": 0.5})])
def test_train_augment_runs_rand_augment_after_crop_and_flip_with_a_key_of_its_own(flip, mix):
    """train_augment with RandAugment is its pipeline without it (crop, flip, normalise, erase,
    then mixup or cutmix, on split(key, 5)'s keys: what a run without it drew), each uint8
    image augmented right after the flip with split(key, 6)[5], a key no other draw takes."""
    from vit.data.augment import train_augment

    from test_data_augment import MEAN, STD, by_hand
    images = jnp.asarray(random_images(3, 16))
    labels = jnp.asarray(np.arange(16) % 5)
    key = jax.random.key(11)
    mix = dict(mix)
    erase = mix.pop("erase_prob", 0.0)
    got = {}
    for ops in (2, 0):
        got[ops] = train_augment(key, images, labels, MEAN, STD, num_classes=5, crop_pad=2,
                                 flip=flip, smoothing=0.1, erase_prob=erase, rand_augment_ops=ops,
                                 **mix)
        want = by_hand(key, images, labels, flip=flip, mix=mix, erase_prob=erase, rand_augment_ops=ops)
        np.testing.assert_array_equal(np.asarray(got[ops][0]), want[0])
        np.testing.assert_array_equal(np.asarray(got[ops][1]), want[1])
    np.testing.assert_array_equal(np.asarray(got[2][1]), np.asarray(got[0][1]))
    assert np.mean(np.asarray(got[2][0]) != np.asarray(got[0][0])) > 0.2  # many images augmented


def test_the_train_step_reads_the_three_keys():
    from test_data_augment import seen_by_the_gradient

    hp = {"crop_pad": 1, "flip": True, "label_smoothing": 0.1}  # no mixing: images stay apart
    _, _, plain, targets = seen_by_the_gradient(seed=3, **hp)
    _, _, augmented, same_targets = seen_by_the_gradient(seed=3, rand_augment_ops=2, **hp)
    _, _, mild, _ = seen_by_the_gradient(seed=3, rand_augment_ops=2, rand_augment_magnitude=0.0,
                                         rand_augment_std=0.0, **hp)
    np.testing.assert_array_equal(targets, same_targets)
    changed, mildly = (np.mean(np.any(plain != x, axis=(1, 2, 3))) for x in (augmented, mild))
    # 2 layers at p 0.5: 3/4 of the images get an op, which at m9 changes them; at level 0 only
    # 4 of the 15 ops do (AutoContrast, Equalize, Invert, Posterize): 1 - (1 - 2/15)² = 1/4
    assert changed > 0.6 and 0.05 < mildly < 0.45, (changed, mildly)


@pytest.mark.parametrize("key, value, why", [
    ("rand_augment_ops", -1, "is the number of RandAugment ops per image: it must be >= 0"),
    ("rand_augment_magnitude", 10.5, r"is RandAugment's level: it must be in \[0, 10\]"),
    ("rand_augment_magnitude", -1.0, r"is RandAugment's level: it must be in \[0, 10\]"),
    ("rand_augment_std", -0.5, "is the spread of RandAugment's level: it must be >= 0")])
def test_bad_rand_augment_values_are_refused_by_name(key, value, why):
    from vit.runconfig import ConfigError, from_dict

    with pytest.raises(ConfigError, match=rf"train.{key} {why}.*got {value}"):
        from_dict({"train": {key: value}})
    hp = from_dict({"train": {"rand_augment_ops": 3, "rand_augment_magnitude": 10.0,
                              "rand_augment_std": 0.0}}).train.hparams
    assert (hp.rand_augment_ops, hp.rand_augment_magnitude, hp.rand_augment_std) == (3, 10.0, 0.0)
    assert from_dict({}).train.hparams.rand_augment_ops == 0  # off unless asked for
