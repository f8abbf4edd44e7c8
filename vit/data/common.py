"""Types shared by every dataset: one split of images with labels, and the error for bad input.

Itself free of jax, like the dataset modules; importing any of them still runs vit/__init__.py,
which imports jax and the model (about 0.5 s, measured: `import vit.data.cache` 0.58 s, numpy and
PIL alone 0.14 s), once per spawned decoding worker.
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
    # Whether this load decoded the images into the cache (False: the cache was up to date).
    decoded_now: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
