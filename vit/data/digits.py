"""scikit-learn's bundled 8x8 handwritten digits: a dataset that needs no download (smoke runs, CI).

1797 grayscale images with values 0..16, scaled here to uint8 0..255 as (N, 8, 8, 1).
The train/val split is fixed: stratified 80/20 with a constant seed, so every run sees the same split.
"""

from __future__ import annotations

import numpy as np

from vit.data.common import Dataset, DatasetError

SPLIT_SEED = 0
VAL_FRACTION = 0.2
CLASS_NAMES = [str(d) for d in range(10)]


def load_digits_split(split: str) -> Dataset:
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DatasetError(f"unknown split {split!r} for digits; expected 'train' or 'val'")
    digits = load_digits()
    # 0..16 -> 0..255; 16 * 255 / 16 = 255 exactly, the rest rounded to the nearest level.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    index = np.arange(len(labels))
    train_index, val_index = train_test_split(
        index, test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    chosen = np.sort(train_index if split == "train" else val_index)
    return Dataset(
        images=np.ascontiguousarray(images[chosen]),
        labels=labels[chosen],
        class_names=list(CLASS_NAMES),
        name="digits",
        split=split,
    )
