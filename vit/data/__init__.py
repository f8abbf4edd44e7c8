"""Datasets for vitfuse: Tiny ImageNet (decoded once into a memory-mapped cache) and sklearn's 8x8 digits.

    from vit.data import load_dataset
    train = load_dataset("tiny-imagenet", "data", "train")   # Dataset(images uint8 (N,64,64,3), labels int32 (N,))
    val = load_dataset("digits", None, "val")                # no download needed

Batching and augmentation run on the device and need jax: import them from vit.data.loader and
vit.data.augment. This module only needs numpy, so the command line (`python -m vit.data`) starts fast.
"""

from __future__ import annotations

import os

from vit.data.common import DOWNLOAD_HINT, Dataset, DatasetError

DATASETS = ("tiny-imagenet", "digits")
DEFAULT_DATA_DIR = "data"  # where `python -m vit.data download` puts tiny-imagenet-200/

__all__ = ["DATASETS", "DEFAULT_DATA_DIR", "DOWNLOAD_HINT", "Dataset", "DatasetError", "load_dataset"]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    workers: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
) -> Dataset:
    """One split ("train" or "val") of dataset `name` ("tiny-imagenet" or "digits").

    data_dir: for tiny-imagenet, the folder holding wnids.txt or its parent holding tiny-imagenet-200/
    (default "data"); ignored by digits, which ships with scikit-learn.
    workers, skip_bad_images, progress: see vit.data.tiny_imagenet.load_tiny_imagenet.
    """
    if name == "tiny-imagenet":
        from vit.data.tiny_imagenet import load_tiny_imagenet

        return load_tiny_imagenet(
            DEFAULT_DATA_DIR if data_dir is None else data_dir,
            split,
            workers=workers,
            skip_bad_images=skip_bad_images,
            progress=progress,
        )
    if name == "digits":
        from vit.data.digits import load_digits_split

        return load_digits_split(split)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
