"""Random erasing (vit.data.augment.random_erase; train.random_erase, the probability per image):
DeiT's one box of unit-normal noise per erased image, of 2% to 1/3 of the image with height /
width from 0.3 to 1/0.3, drawn after normalisation and before mixup or cutmix, and the train step
applying it without moving any other random draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit.data.augment import random_erase
from vit.runconfig import ConfigError, from_dict

from test_data_augment import seen_by_the_gradient

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


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_probability_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match=rf"train.random_erase is a probability per image: it "
                                          rf"must be in \[0, 1\], got {value}"):
        from_dict({"train": {"random_erase": value}})
    assert from_dict({"train": {"random_erase": 1.0}}).train.hparams.random_erase == 1.0
