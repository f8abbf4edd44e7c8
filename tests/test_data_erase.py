"""Random erasing (vit.data.augment.random_erase; train.random_erase, the probability per image):
DeiT's one box of unit-normal noise per erased image, of 2% to 1/3 of the image with height /
width from 0.3 to 1/0.3, drawn after normalisation and before mixup or cutmix, and the train step
applying it without moving any other random draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit.data.augment import random_erase, train_augment
from vit.runconfig import ConfigError, from_dict

from test_data_augment import MEAN, STD, by_hand, seen_by_the_gradient

KEY = jax.random.key(7)


def boxes(before, after):
    """(top, bottom, left, right) of each image's changed pixels, or None where none changed;
    an AssertionError unless they fill that rectangle exactly (nothing changed outside it)."""
    changed = np.any(np.asarray(before) != np.asarray(after), axis=-1)
    found = []
    for mask in changed:
        if not mask.any():
            found.append(None)
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert mask[top:bottom, left:right].all() and mask.sum() == (bottom - top) * (right - left)
        found.append((top, bottom, left, right))
    return found


def test_each_erased_image_gets_one_box_of_deits_area_and_aspect():
    h, w = 32, 24
    images = jax.random.normal(jax.random.key(1), (256, h, w, 3))
    found = boxes(images, random_erase(KEY, images, 1.0))
    placed = [b for b in found if b is not None]
    assert len(placed) >= 250  # p = 1: all but an image whose 10 draws all stuck out
    heights = np.array([b[1] - b[0] for b in placed])
    widths = np.array([b[3] - b[2] for b in placed])
    assert heights.max() < h and widths.max() < w  # strictly inside, as timm's test
    area = heights * widths / (h * w)
    # rounding the sides moves the area by up to about (sqrt(area) + 1/4) / side of each
    assert area.min() >= 0.01 and area.max() <= 0.4 and 0.14 <= area.mean() <= 0.21, area.mean()
    aspect = heights / widths
    assert aspect.min() < 0.5 and aspect.max() > 2.0 and np.all((aspect > 0.2) & (aspect < 5))
    tops = np.array([b[0] for b in placed])
    assert tops.min() == 0 and np.max(tops + heights) == h  # the box reaches both edges


def test_a_box_never_spans_a_whole_side():
    """timm's test is strict (h < H and w < W): on 3x3 images a third of the area at aspect 3
    rounds to a full 3-pixel side, which is redrawn, not erased."""
    images = jax.random.normal(jax.random.key(2), (2000, 3, 3, 1))
    placed = [b for b in boxes(images, random_erase(KEY, images, 1.0)) if b is not None]
    assert len(placed) > 1000
    assert max(b[1] - b[0] for b in placed) <= 2 and max(b[3] - b[2] for b in placed) <= 2


def test_the_box_holds_unit_normal_noise_and_p_of_the_images_get_one():
    images = jnp.zeros((4000, 8, 8, 3))
    out = np.asarray(random_erase(KEY, images, 0.25))
    noise = out[out != 0]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02, (noise.mean(), noise.std())
    share = np.mean([b is not None for b in boxes(images, out)])
    assert 0.22 <= share <= 0.28, share  # binomial sd 0.007 at p = 0.25
    assert np.array_equal(np.asarray(random_erase(KEY, images, 0.0)), np.asarray(images))


def test_the_noise_is_drawn_from_the_key():
    """Two keys, two fields of noise: where both erase a pixel its values differ (noise drawn once,
    as with numpy's seeded generator at trace time, would fill every step's boxes alike)."""
    images = jnp.zeros((64, 16, 16, 3))
    one, two = (np.asarray(random_erase(jax.random.key(k), images, 1.0)) for k in (1, 2))
    both = (one != 0) & (two != 0)
    assert both.sum() > 1000 and np.mean(one[both] == two[both]) < 0.01


def test_the_train_step_erases_after_normalising_and_moves_no_other_draw():
    """The same step with random_erase 1 and 0: crop, flip and the targets alike, the images
    differing in one box each, of noise; with mixup the targets (its lambda and partners) alike."""
    hp = {"crop_pad": 2, "flip": True, "label_smoothing": 0.1}
    _, _, plain, targets = seen_by_the_gradient(seed=3, **hp)
    _, _, erased, erased_targets = seen_by_the_gradient(seed=3, random_erase=1.0, **hp)
    assert np.array_equal(targets, erased_targets)
    found = boxes(plain, erased)
    assert sum(b is not None for b in found) >= len(found) - 1
    noise = np.concatenate([erased[i, box[0]:box[1], box[2]:box[3]].ravel()
                            for i, box in enumerate(found) if box is not None])
    assert noise.size > 100 and 0.8 < noise.std() < 1.2, noise.std()  # noise of the normalised scale
    _, _, _, mixed = seen_by_the_gradient(seed=3, mixup_alpha=0.4, **hp)
    _, _, _, erased_mixed = seen_by_the_gradient(seed=3, mixup_alpha=0.4, random_erase=1.0, **hp)
    assert np.array_equal(mixed, erased_mixed)


def test_the_sides_are_rounded_and_an_image_that_no_draw_fits_stays_whole():
    """One area and one aspect give every box the same sides, round(sqrt(area * aspect)) high and
    round(sqrt(area / aspect)) wide (timm's int(round(...))): a quarter of a 12x10 image (30 px) at
    height / width 2 is 8 x 4 (sqrt 60 = 7.75, sqrt 15 = 3.87; truncated 7 x 3), at every top and
    left that keeps it inside. At aspect 9 (16 rows of 12) no draw fits: the image stays whole."""
    images = jax.random.normal(jax.random.key(3), (64, 12, 10, 2))
    found = boxes(images, random_erase(KEY, images, 1.0, area=(0.25, 0.25), aspect=(2.0, 2.0)))
    assert {(b[1] - b[0], b[3] - b[2]) for b in found} == {(8, 4)}
    assert {b[0] for b in found} == set(range(12 - 8 + 1)) and {b[2] for b in found} == set(range(10 - 4 + 1))
    unfit = random_erase(KEY, images, 1.0, area=(0.25, 0.25), aspect=(9.0, 9.0))
    assert np.array_equal(np.asarray(unfit), np.asarray(images))


def test_boxes_are_as_often_wide_as_tall_placed_independently_with_noise_per_channel():
    """On square images: height / width is log-uniform, symmetric about 1 (a ratio uniform on
    0.3..3.3 would make 77% of the boxes tall); the top and the left are drawn apart (drawn from
    one key, a square box sits on the diagonal); each channel gets noise of its own (not grey)."""
    images = jnp.zeros((1000, 64, 64, 3))
    out = np.asarray(random_erase(jax.random.key(3), images, 1.0))
    top, bottom, left, right = np.array([b for b in boxes(images, out) if b is not None]).T
    heights, widths = bottom - top, right - left
    assert top.size >= 990 and abs(np.mean(heights > widths) - np.mean(heights < widths)) < 0.12
    square = heights == widths
    assert square.sum() >= 10 and np.mean(top[square] == left[square]) < 0.5, (top[square], left[square])
    assert abs(np.corrcoef(top + heights / 2, left + widths / 2)[0, 1]) < 0.1
    erased = out[out[..., 0] != 0]
    assert erased.shape[0] > 10**5 and np.all(np.abs(np.corrcoef(erased.T) - np.eye(3)) < 0.02)


@pytest.mark.parametrize("flip, mix", [(False, {}), (True, {"mixup_alpha": 0.4}),
                                       (True, {"cutmix_alpha": 1.0})])
def test_train_augment_erases_between_normalising_and_mixing_with_a_key_of_its_own(flip, mix):
    """train_augment is its pipeline without erasing (crop, flip, normalise, then mixup or cutmix,
    on the keys a run without erasing drew), each image erased right after normalising with a
    key no other draw takes (test_data_augment.by_hand); without a flip too, and with the box of
    noise mixed like the rest."""
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8))
    labels = jnp.asarray(np.arange(16) % 5)
    key = jax.random.key(11)
    got = {}
    for p in (0.5, 0.0):
        got[p] = train_augment(key, images, labels, MEAN, STD, num_classes=5, crop_pad=2, flip=flip,
                               smoothing=0.1, erase_prob=p, **mix)
        want = by_hand(key, images, labels, flip=flip, mix=mix, erase_prob=p)
        np.testing.assert_array_equal(np.asarray(got[p][0]), want[0])
        np.testing.assert_array_equal(np.asarray(got[p][1]), want[1])
    assert np.mean(np.asarray(got[0.5][0]) != np.asarray(got[0.0][0])) > 0.02  # some boxes erased


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_probability_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match=rf"train.random_erase is a probability per image: it "
                                          rf"must be in \[0, 1\], got {value}"):
        from_dict({"train": {"random_erase": value}})
    assert from_dict({"train": {"random_erase": 1.0}}).train.hparams.random_erase == 1.0
