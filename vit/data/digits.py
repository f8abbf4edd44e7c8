"""scikit-learn's bundled 8x8 handwritten digits: a dataset that needs no download (smoke runs, CI).

1797 grayscale images with values 0..16, scaled here to uint8 0..255 as (N, 8, 8, 1).
The train/val split is fixed: stratified 80/20 with a constant seed, so every run sees the same split.
write_digits_folder writes them out as an image folder (`python -m vit.data digits-folder DEST`), to
try the image-folder path and fine-tuning with no download.
"""

from __future__ import annotations

from pathlib import Path

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


def write_digits_folder(dest, classes=None) -> dict[str, int]:
    """Both splits (their fixed split) as DEST/{train,val}/<digit>/<index>.png, 8x8 grayscale, for
    the digits in classes (default: all ten); -> {split: images written}. A DEST that holds
    anything is a DatasetError: another set's files would join the classes. Written into
    DEST.part (emptied first), renamed to DEST when whole: an interrupted write leaves no DEST."""
    dest = Path(dest)
    chosen = list(CLASS_NAMES) if classes is None else list(classes)
    unknown = [c for c in chosen if c not in CLASS_NAMES]
    if unknown or not chosen:
        raise DatasetError(f"digits are the classes {', '.join(CLASS_NAMES)}; got {unknown or 'none'}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DatasetError(f"{dest} is {'not empty' if dest.is_dir() else 'a file'}: give a new folder")
    import shutil  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    part, written = dest.with_name(dest.name + ".part"), {}
    shutil.rmtree(part, ignore_errors=True)
    for split in ("train", "val"):
        data = load_digits_split(split)
        keep = np.flatnonzero(np.isin(data.labels, [CLASS_NAMES.index(c) for c in chosen]))
        for i in keep:
            folder = part / split / CLASS_NAMES[data.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i, ..., 0], "L").save(folder / f"{i}.png")
        written[split] = len(keep)
    if dest.exists():
        dest.rmdir()  # empty (checked above)
    part.rename(dest)
    return written
