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


def check_same_classes(trained_on, found, where, run_dir):
    """A DatasetError unless the class names `found` in a dataset (where: its folder, as the message
    names it) are those a run was trained on (None: a checkpoint from before they were saved; not
    checked): the same labels would mean other classes, or not fit the model's head."""
    if trained_on is None or list(trained_on) == list(found):
        return
    trained_on, found = list(trained_on), list(found)
    if len(found) != len(trained_on):
        missing = [c for c in trained_on if c not in set(found)]
        extra = [c for c in found if c not in set(trained_on)]
        named = "; ".join(f"{what}: {', '.join(map(repr, names[:3]))}{', ...' if len(names) > 3 else ''}"
                          for what, names in (("missing there", missing), ("not in the run", extra))
                          if names)
        detail = f"{len(found)} classes there, {len(trained_on)} in the run" + (f"; {named}" if named else "")
    else:
        i = next(i for i, (a, b) in enumerate(zip(found, trained_on)) if a != b)
        detail = f"class {i} is {found[i]!r} there and {trained_on[i]!r} in the run"
    raise DatasetError(f"{where} does not hold the classes the run in {run_dir} was trained on "
                       f"({detail}); give the --data-dir it was trained on")


def check_same_count(trained_on, found: int, where, run_dir, meaning: str):
    """A DatasetError unless the `found` training images (where: their folder, as the message
    names it) are as many as the run in run_dir was trained on (None: a checkpoint from before
    the count was saved; not checked); meaning: what another count would mean, and what to do."""
    if trained_on is not None and trained_on != found:
        raise DatasetError(f"{where} holds {found} training images, and the run in {run_dir} was "
                           f"trained on {trained_on}: {meaning}")


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
