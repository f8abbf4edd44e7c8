"""Types shared by every dataset: one split of images with labels, and the error for bad input.

Kept free of jax so that `python -m vit.data download` and the decoding workers start quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DOWNLOAD_HINT = (
    "get Tiny ImageNet with `python -m vit.data download --dest DIR` "
    "(or train on `--dataset digits`, which needs no download)"
)


class DatasetError(Exception):
    """Input data that cannot be used as it is; the message says which file and what to do."""


@dataclass
class Dataset:
    """One split of a dataset.

    images: uint8 (N, H, W, C); for Tiny ImageNet a read-only memmap of the decoded cache.
    labels: int32 (N,), indices into class_names.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str
    split: str = ""
    # Paths (with the reason) of images left out because skip_bad_images=True.
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
