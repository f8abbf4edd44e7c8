"""A small Tiny ImageNet in the exact real layout, for tests and smoke runs with no download.

    root = write_fake_tiny_imagenet(tmp_path)          # tmp_path/tiny-imagenet-200/...
    train = load_dataset("tiny-imagenet", tmp_path, "train")

Images are 64x64 JPEGs: mostly RGB, every `grayscale_every`-th one grayscale ("L") and the first val image
CMYK, as in the real data where some images are not RGB. Val labels are spread over the classes in an order
that differs from the file order, so a loader that ignored val_annotations.txt would get them wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from vit.data.tiny_imagenet import DATASET_DIRNAME


def fake_wnid(i: int) -> str:
    return f"n{9000000 + i:08d}"


def _save_image(path: Path, rng: np.random.Generator, mode: str) -> None:
    # A smooth gradient plus noise: compresses like a photo, and differs between images.
    yy, xx = np.mgrid[0:64, 0:64]
    base = rng.integers(0, 256, size=3)
    slope = rng.uniform(-2, 2, size=(2, 3))
    pixels = base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 12, size=(64, 64, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image.convert(mode).save(path, format="JPEG", quality=90)


def write_fake_tiny_imagenet(
    dest: str | os.PathLike,
    *,
    num_classes: int = 3,
    train_per_class: int = 4,
    val_images: int = 6,
    test_images: int = 2,
    grayscale_every: int = 3,
    seed: int = 0,
) -> Path:
    """Write dest/tiny-imagenet-200 and return its path."""
    rng = np.random.default_rng(seed)
    root = Path(dest) / DATASET_DIRNAME
    root.mkdir(parents=True)
    wnids = [fake_wnid(i) for i in range(num_classes)]
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    # words.txt lists many more wnids than the dataset uses, like the real one.
    words = [f"{w}\tclass {i}, fake thing {i}" for i, w in enumerate(wnids)]
    words += [f"{fake_wnid(1000 + i)}\tunused {i}" for i in range(5)]
    (root / "words.txt").write_text("\n".join(words) + "\n")

    count = 0
    for wnid in wnids:
        images_dir = root / "train" / wnid / "images"
        images_dir.mkdir(parents=True)
        boxes = []
        for j in range(train_per_class):
            name = f"{wnid}_{j}.JPEG"
            _save_image(images_dir / name, rng, "L" if count % grayscale_every == grayscale_every - 1 else "RGB")
            boxes.append(f"{name}\t0\t0\t63\t63")
            count += 1
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")

    val_dir = root / "val" / "images"
    val_dir.mkdir(parents=True)
    val_labels = rng.permutation(np.arange(val_images) % num_classes)
    lines = []
    for j, label in enumerate(val_labels):
        name = f"val_{j}.JPEG"
        mode = "CMYK" if j == 0 else ("L" if j % grayscale_every == grayscale_every - 1 else "RGB")
        _save_image(val_dir / name, rng, mode)
        lines.append(f"{name}\t{wnids[label]}\t1\t2\t60\t61")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")

    test_dir = root / "test" / "images"
    test_dir.mkdir(parents=True)
    for j in range(test_images):
        _save_image(test_dir / f"test_{j}.JPEG", rng, "RGB")
    return root
