"""Device augmentations: crop, flip, label smoothing, mixup and cutmix (soft targets), and the train pipeline."""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit.data.augment import (
    cutmix,
    mix_params,
    mixup,
    paste_box,
    random_crop,
    random_flip,
    train_augment,
)
from vit.data.loader import normalize
from vit.layers import one_hot_targets

KEY = jax.random.key(0)


def random_images(b=32, h=9, w=7, c=3, seed=0):
    # Odd, unequal H and W so that a transposed or off-by-one crop cannot pass.
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=(b, h, w, c), dtype=np.uint8))


def test_crop_with_zero_padding_is_the_identity():
    images = random_images()
    np.testing.assert_array_equal(random_crop(KEY, images, 0), images)


@pytest.mark.parametrize("mode", ["reflect", "zero"])
def test_crop_is_a_window_of_the_padded_image_chosen_per_image(mode):
    pad = 2
    images = random_images()
    out = np.asarray(jax.jit(partial(random_crop, pad=pad, mode=mode))(KEY, images))
    assert out.shape == images.shape and out.dtype == np.uint8
    np_mode = "reflect" if mode == "reflect" else "constant"
    padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    h, w = images.shape[1:3]
    offsets = []
    for i in range(len(out)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(out[i], padded[i, dy : dy + h, dx : dx + w])
        ]
        assert matches, f"image {i} is not a {h}x{w} window of its padded self"
        offsets.append(matches[0])
    assert len(set(offsets)) > 5  # independent offsets per image, not one for the batch
    # every offset 0..2*pad along each axis, both edges of the padded image included
    assert {dy for dy, _ in offsets} == {dx for _, dx in offsets} == set(range(2 * pad + 1))
    np.testing.assert_array_equal(random_crop(KEY, images, pad, mode), out)  # same key, same crops
    assert not np.array_equal(random_crop(jax.random.key(1), images, pad, mode), out)


def test_reflect_crop_needs_images_larger_than_the_padding():
    # reflecting pad rows needs pad + 1 of them: pad == height (or width) is refused, one less is fine
    images = random_images(b=2, h=4, w=6)
    for pad in (4, 6):
        with pytest.raises(ValueError, match="reflect padding"):
            random_crop(KEY, images, pad, "reflect")
    assert random_crop(KEY, images, 3, "reflect").shape == images.shape
    assert random_crop(KEY, images, 4, "zero").shape == images.shape  # zero padding has no such limit


def test_flip_is_an_exact_mirror_of_about_half_the_images():
    images = random_images(b=64)
    out = np.asarray(jax.jit(random_flip)(KEY, images))
    mirrored = np.asarray(images)[:, :, ::-1, :]
    flipped = np.array([np.array_equal(o, m) for o, m in zip(out, mirrored)])
    kept = np.array([np.array_equal(o, x) for o, x in zip(out, np.asarray(images))])
    assert (flipped | kept).all()  # each image is either untouched or exactly mirrored
    assert 16 < flipped.sum() < 48
    np.testing.assert_array_equal(random_flip(KEY, images, p=1.0), mirrored)
    np.testing.assert_array_equal(random_flip(KEY, images, p=0.0), images)
    np.testing.assert_array_equal(random_flip(KEY, images), out)


def test_one_hot_targets():
    targets = np.asarray(one_hot_targets(jnp.array([0, 3, 1]), 4, 0.1))
    assert targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[1], [0.025, 0.025, 0.025, 0.925], rtol=1e-6)
    np.testing.assert_array_equal(one_hot_targets(jnp.array([2]), 3, 0.0), [[0.0, 0.0, 1.0]])


def labelled_batch(b=16, k=20):
    images = random_images(b=b, h=8, w=8).astype(jnp.float32) / 255
    labels = jnp.arange(b) % k
    return images, labels, one_hot_targets(labels, k, 0.1)


def test_lambda_is_symmetric_beta_alpha_alpha():
    # Beta(a, a) is symmetric about 1/2 with variance 1 / (4 (2a + 1)); 4000 draws pin both
    alpha, n = 0.4, 4000
    lam = np.asarray(jax.vmap(lambda k: mix_params(k, 2, alpha)[0])(jax.random.split(KEY, n)))
    assert lam.dtype == np.float32 and ((lam >= 0) & (lam <= 1)).all()
    se = np.sqrt(1 / (4 * (2 * alpha + 1)) / n)
    assert abs(lam.mean() - 0.5) < 6 * se
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.1 * lam.var()


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    images, _, targets = labelled_batch()
    mixed, mixed_targets = mixup(KEY, images, targets, 0.4)
    lam, partner = mix_params(KEY, images.shape[0], 0.4)  # what mixup drew from this key
    lam = float(lam)
    assert 0.0 < lam < 1.0
    assert sorted(np.asarray(partner).tolist()) == list(range(images.shape[0]))
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[partner], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[partner], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(mixed_targets).sum(axis=1), 1.0, rtol=1e-5)


def test_cutmix_pastes_one_box_and_targets_match_its_area():
    b, k, h, w = 16, 20, 12, 10
    # Image i is filled with the value i + 1: every pixel tells which image it came from.
    images = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
    targets = one_hot_targets(jnp.arange(b), k, 0.0)
    box_areas = []
    for seed in range(6):
        key = jax.random.key(seed)
        mixed, mixed_targets = cutmix(key, images, targets, 1.0)
        mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
        np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
        _, partner = mix_params(jax.random.split(key)[0], b, 1.0)  # the pairing cutmix drew from this key
        partner = np.asarray(partner)
        source = mixed[..., 0].astype(int) - 1  # (B, H, W): which image each pixel came from
        for i in range(b):
            assert set(np.unique(source[i])) <= {i, partner[i]}
        # One box for the whole batch, a full rectangle: find it in an image whose partner is another image.
        i = int(np.flatnonzero(partner != np.arange(b))[0])
        box = source[i] == partner[i]
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        assert box.sum() == len(rows) * len(cols)
        for j in np.flatnonzero(partner != np.arange(b)):
            np.testing.assert_array_equal(source[j] == partner[j], box)
        # targets = lam * y_a + (1 - lam) * y_b with lam the fraction of pixels still from image a.
        lam = 1.0 - box.sum() / (h * w)
        expected = lam * np.asarray(targets) + (1 - lam) * np.asarray(targets)[partner]
        np.testing.assert_allclose(mixed_targets, expected, rtol=1e-6, atol=1e-7)
        box_areas.append(int(box.sum()))
    assert any(0 < area < h * w for area in box_areas)  # real boxes were tested, not only empty ones


def test_cutmix_box_centre_ranges_over_each_axis():
    # a wide image (4 x 64), lambda 1/2: a box about 45 columns wide whose centre column is drawn
    # over all 64 columns (and its row over the 4 rows)
    b, h, w = 2, 4, 64
    images = jnp.broadcast_to(jnp.arange(1, b + 1, dtype=jnp.float32)[:, None, None, None], (b, h, w, 1))
    targets = one_hot_targets(jnp.arange(b), b, 0.0)
    partner = jnp.array([1, 0])
    lefts, rights = [], []
    for seed in range(8):
        mixed, _ = paste_box(jax.random.key(seed), images, targets, jnp.float32(0.5), partner)
        cols = np.flatnonzero((np.asarray(mixed)[0, ..., 0] == 2).any(axis=0))  # image 1's pixels in image 0
        lefts.append(cols.min())
        rights.append(cols.max())
    assert max(lefts) > 0 and min(rights) < w - 1  # boxes clipped at neither edge exist
    assert max(rights) > w // 2 + 8  # centres right of the middle are drawn too


def test_cutmix_box_centre_reaches_every_row_and_column():
    # 1 - lambda = 0.09 on a 4 x 5 image: a one-pixel box (int(4 * 0.3) = int(5 * 0.3) = 1) at the
    # centre itself; over 200 keys it lands in every row and every column, the last ones included
    h, w = 4, 5
    images = jnp.zeros((2, h, w, 1), jnp.float32).at[1].set(1.0)
    targets = one_hot_targets(jnp.arange(2), 2, 0.0)
    paste = jax.jit(jax.vmap(lambda key: paste_box(key, images, targets, jnp.float32(0.91), jnp.array([1, 0]))[0]))
    boxes = np.asarray(paste(jax.random.split(KEY, 200)))[:, 0, :, :, 0] == 1.0  # (keys, H, W)
    assert (boxes.sum(axis=(1, 2)) == 1).all()
    assert set(np.nonzero(boxes)[1]) == set(range(h)) and set(np.nonzero(boxes)[2]) == set(range(w))
    # a square image (as the model's are): row and column are drawn independently, so the box lands
    # in every cell, off the diagonal too
    square = images[:, :, :h]
    paste = jax.jit(jax.vmap(lambda key: paste_box(key, square, targets, jnp.float32(0.91), jnp.array([1, 0]))[0]))
    boxes = np.asarray(paste(jax.random.split(KEY, 200)))[:, 0, :, :, 0] == 1.0
    assert len(set(zip(*np.nonzero(boxes)[1:]))) == h * h


def test_cutmix_keeps_uint8_images():
    images = random_images(b=8, h=8, w=8)
    mixed, targets = cutmix(KEY, images, one_hot_targets(jnp.arange(8), 8), 1.0)
    assert mixed.dtype == jnp.uint8 and mixed.shape == images.shape and targets.shape == (8, 8)


@pytest.mark.parametrize("fn", [mixup, cutmix])
def test_mixing_is_deterministic_per_key(fn):
    images, _, targets = labelled_batch()
    a = fn(KEY, images, targets, 0.8)
    b = fn(KEY, images, targets, 0.8)
    c = fn(jax.random.key(5), images, targets, 0.8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    "mixing", [{}, {"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}],
    ids=["none", "mixup", "cutmix", "both"],
)
def test_train_augment_pipeline(mixing):
    images = random_images(b=8, h=8, w=8)
    labels = jnp.arange(8) % 5
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    step = partial(train_augment, num_classes=5, crop_pad=2, flip=True, smoothing=0.1, **mixing)
    if len(mixing) == 2:  # jit one configuration, the one with lax.cond (each compile of Beta takes seconds)
        step = jax.jit(step)
    x, t = step(KEY, images, labels, mean, std)
    assert x.shape == (8, 8, 8, 3) and x.dtype == jnp.float32 and t.shape == (8, 5) and t.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(t).sum(axis=1), 1.0, rtol=1e-5)
    assert np.abs(np.asarray(x)).max() <= (1 - 0.5) / 0.25 + 1e-5  # normalized
    x2, t2 = step(KEY, images, labels, mean, std)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(t, t2)
    if not mixing:  # no mixing: the targets are the smoothed labels
        np.testing.assert_allclose(t, one_hot_targets(labels, 5, 0.1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Each augmentation the step is configured with happens to the batch the gradient sees: the
# training step (vit.step.train_step_fn) is run with a grad_fn that records its inputs.

B, S, C = 48, 8, 3
MEAN, STD = np.array([0.4, 0.5, 0.6], np.float32), np.array([0.2, 0.25, 0.3], np.float32)


def seen_by_the_gradient(seed=0, num_classes=5, float_images=False, **hparams):
    """(images uint8, labels, x float32, targets) of one step with these TrainHParams fields
    (float_images: the step gets the images already normalized, as floats)."""
    from vit import ViTConfig, adamw_init, init_params
    from vit.ops import REFERENCE
    from vit.config import TrainHParams
    from vit.step import train_step_fn

    cfg = ViTConfig(image_size=S, patch_size=4, channels=C, d_model=8, heads=2, layers=1,
                    mlp_dim=8, num_classes=num_classes)
    params = init_params(jax.random.key(0), cfg)
    seen = {}

    def recording_grad_fn(p, x, targets, key):
        seen["x"], seen["targets"] = np.asarray(x), np.asarray(targets)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
        return jnp.float32(0.0), zeros, jnp.zeros((x.shape[0], num_classes), jnp.float32)

    step = train_step_fn(cfg, TrainHParams(**hparams), ops=REFERENCE, mean=MEAN, std=STD,
                         grad_fn=recording_grad_fn)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (B, S, S, C), dtype=np.uint8)
    labels = np.arange(B) % num_classes
    given = normalized(images) if float_images else images
    step(params, adamw_init(params), jnp.asarray(given), jnp.asarray(labels), jax.random.key(seed))
    return images, labels, seen["x"], seen["targets"]


def normalized(images):
    return (images.astype(np.float32) / 255 - MEAN) / STD


def by_hand(key, images, labels, *, flip, mix, erase_prob=0.0, rand_augment_ops=0):
    """train_augment's pipeline put together from its parts, on the keys it documents: crop,
    flip and mixup/cutmix on split(key, 6)[:3] (a run without erasing or RandAugment draws
    split(key, 4)'s, the same), RandAugment right after the flip on [5] (filled with the mean
    pixel the images are normalised by), normalising, erasing on
    [4], a 0.1-smoothed one-hot of 5 classes, then mixup or cutmix (mix: its one alpha, or {})."""
    from vit.data.augment import random_erase  # noqa: PLC0415
    from vit.data.randaugment import rand_augment  # noqa: PLC0415

    k_crop, k_flip, k_mix, _, k_erase, k_rand = jax.random.split(key, 6)
    x = random_crop(k_crop, images, 2)
    x = random_flip(k_flip, x) if flip else x
    fill = np.round(255 * MEAN)  # (102, 128, 153): not fill_colour's ImageNet mean
    x = rand_augment(k_rand, x, rand_augment_ops, 9.0, 0.5, fill=fill) if rand_augment_ops else x
    x = normalize(x, MEAN, STD)
    x = random_erase(k_erase, x, erase_prob) if erase_prob else x
    targets = one_hot_targets(labels, 5, 0.1)
    if mix:
        x, targets = (mixup if "mixup_alpha" in mix else cutmix)(k_mix, x, targets, *mix.values())
    return np.asarray(x), np.asarray(targets)


def geometric_matches(images, x, pad):
    """(B, offsets, 2) bool: x[i] is the (dy, dx) window of the reflect-padded image i, mirrored
    (index 1) or not (index 0)."""
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + S, dx:dx + S]
            out.append([np.isclose(x, normalized(w), rtol=0, atol=1e-5).all(axis=(1, 2, 3))
                        for w in (window, window[:, :, ::-1])])
    return np.array(out).transpose(2, 0, 1)


def test_step_without_augmentation_passes_the_batch_through():
    images, labels, x, targets = seen_by_the_gradient()
    np.testing.assert_allclose(x, normalized(images), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(targets, np.eye(5, dtype=np.float32)[labels])


def test_step_takes_float_images_as_they_are_with_smoothed_targets():
    # already-normalized float images are trained on as given, with label smoothing
    images, labels, x, targets = seen_by_the_gradient(float_images=True, label_smoothing=0.1)
    np.testing.assert_array_equal(x, normalized(images))
    np.testing.assert_allclose(targets, 0.02 + 0.9 * np.eye(5, dtype=np.float32)[labels], rtol=1e-6)


@pytest.mark.parametrize("hparams", [{"crop_pad": 2, "flip": True}, {"mixup_alpha": 0.8},
                                     {"rand_augment_ops": 2}, {"random_erase": 0.25},
                                     {"cutmix_alpha": 1.0}])
def test_step_refuses_to_augment_float_images(hparams):
    """Augmentation works on uint8 images: asked of floats, it used to be skipped in silence."""
    named = ", ".join(f"{k}={v!r}" for k, v in hparams.items())
    with pytest.raises(ValueError, match=rf"training images are float32, taken as normalised, "
                                         rf"and augmentation works on uint8 images: TrainHParams "
                                         rf"{re.escape(named)} would be skipped"):
        seen_by_the_gradient(float_images=True, **hparams)


def test_step_flips_about_half_the_images():
    images, _, x, _ = seen_by_the_gradient(flip=True)
    m = geometric_matches(images, x, pad=0)[:, 0]         # (B, 2): kept, mirrored
    assert m.any(axis=1).all()                            # each image kept or exactly mirrored
    assert 0.2 * B < m[:, 1].sum() < 0.8 * B, m[:, 1].sum()  # ... and many really are mirrored


def test_step_crops_at_random_offsets():
    pad = 2
    images, _, x, _ = seen_by_the_gradient(crop_pad=pad)
    m = geometric_matches(images, x, pad)[:, :, 0]         # (B, offsets), no mirroring
    assert m.any(axis=1).all()
    offsets = {int(np.flatnonzero(row)[0]) for row in m}
    centre = pad * (2 * pad + 1) + pad
    assert len(offsets) > 5 and not m[:, centre].all()    # moved, and not all the same way


def test_step_crops_and_flips_together_with_smoothing():
    pad = 1
    images, labels, x, targets = seen_by_the_gradient(crop_pad=pad, flip=True, label_smoothing=0.1)
    m = geometric_matches(images, x, pad)
    assert m.any(axis=(1, 2)).all()
    mirrored = m[:, :, 1].any(axis=1) & ~m[:, :, 0].any(axis=1)
    assert 0.2 * B < mirrored.sum() < 0.8 * B
    np.testing.assert_allclose(targets, 0.02 + 0.9 * np.eye(5, dtype=np.float32)[labels], rtol=1e-6)


def mixing_of(targets):
    """With B classes and label i for image i: (lam of each row, partner of each row)."""
    own = np.diag(targets)
    rest = targets - np.diag(own)
    partner = np.where(rest.max(axis=1) > 0, rest.argmax(axis=1), np.arange(len(targets)))
    return own, partner


def test_step_mixes_up_images_and_targets():
    images, _, x, targets = seen_by_the_gradient(num_classes=B, mixup_alpha=0.4)
    lam, partner = mixing_of(targets)
    moved = partner != np.arange(B)
    lam = lam[moved][0]
    assert moved.sum() > B // 2 and 0 < lam < 1
    xn = normalized(images)
    np.testing.assert_allclose(x, lam * xn + (1 - lam) * xn[partner], rtol=0, atol=1e-4)


@pytest.mark.parametrize("cutmix_prob", [0.0, 1.0], ids=["mixup", "cutmix"])
def test_with_both_mixings_each_draws_lambda_with_its_own_alpha(cutmix_prob):
    # alpha 50: Beta(50, 50) keeps lambda near 1/2; alpha 0.05 puts it near 0 or 1. The mixing
    # chosen (cutmix_prob 0: always mixup, 1: always cutmix) must draw with its own alpha.
    b = 16
    images = random_images(b=b, h=8, w=8)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    alphas = {"mixup_alpha": 50.0, "cutmix_alpha": 0.05} if cutmix_prob == 0.0 else \
             {"mixup_alpha": 0.05, "cutmix_alpha": 50.0}
    step = jax.jit(partial(train_augment, num_classes=b, crop_pad=0, flip=False,
                           cutmix_prob=cutmix_prob, **alphas))
    xn = np.asarray(normalize(images, mean, std))
    for seed in range(4):
        x, targets = (np.asarray(a) for a in step(jax.random.key(seed), images, jnp.arange(b), mean, std))
        lam, partner = mixing_of(targets)
        moved = partner != np.arange(b)
        pixels_from_a = np.isclose(x, xn, rtol=0, atol=1e-5).all(axis=-1)[moved].mean()
        if cutmix_prob == 0.0:
            assert pixels_from_a < 0.5, "expected mixup (blended pixels), got cutmix"
        else:
            assert pixels_from_a > 0.1, "expected cutmix (pixels copied), got mixup"
        # cutmix's box area is (1 - lambda) H W, clipped at the borders: lambda stays well inside (0, 1)
        assert 0.25 < lam[moved].min() <= lam[moved].max() < 0.9, (seed, lam[moved])


@pytest.mark.parametrize("both", [False, True], ids=["cutmix", "cutmix-or-mixup"])
def test_step_cuts_and_mixes(both):
    kinds = set()
    for seed in range(6):
        images, _, x, targets = seen_by_the_gradient(seed=seed, num_classes=B, cutmix_alpha=1.0,
                                                     mixup_alpha=0.4 if both else 0.0)
        xn = normalized(images)
        lam, partner = mixing_of(targets)
        from_a = np.isclose(x, xn, rtol=0, atol=1e-5).all(axis=-1)           # (B, S, S)
        from_b = np.isclose(x, xn[partner], rtol=0, atol=1e-5).all(axis=-1)
        if (from_a | from_b).all():  # cutmix: every pixel from the image or its partner
            moved = partner != np.arange(B)
            assert from_b[moved].any(), "cutmix pasted nothing"
            np.testing.assert_allclose(lam[moved], from_a[moved].mean(axis=(1, 2)), rtol=1e-5)
            kinds.add("cutmix")
        else:
            moved = partner != np.arange(B)
            lam = lam[moved][0]
            np.testing.assert_allclose(x, lam * xn + (1 - lam) * xn[partner], rtol=0, atol=1e-4)
            kinds.add("mixup")
    assert kinds == ({"cutmix", "mixup"} if both else {"cutmix"}), kinds
