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


# ---------------------------------------------------------------------------------------------------------------
# An image folder (train/<class>/, val/<class>/) with everything a user's folder may hold.

# Each class is one colour (learnable in a few steps); the names are awkward on purpose.
FAKE_FOLDER_CLASSES = {"blue.v2": (30, 60, 220), "green-3 #x": (40, 190, 60), "red fish (ñ)": (220, 40, 30)}
# (width, height, format, mode) cycled over the images of a class: odd sizes, both orientations,
# grayscale JPEG and PNG, alpha, palette, 16-bit grayscale.
FAKE_FOLDER_KINDS = [
    (37, 23, "JPEG", "RGB"),
    (20, 51, "PNG", "RGBA"),
    (64, 64, "PNG", "L"),
    (9, 13, "JPEG", "L"),
    (101, 77, "PNG", "P"),
    (33, 33, "PNG", "I;16"),
    (48, 30, "PNG", "RGB"),
]


def fake_colour_image(colour, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image of one colour with noise and a soft gradient."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.asarray(colour, float) + 20 * (yy / max(height, 1))[..., None] + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels + 0 * xx[..., None], 0, 255).astype(np.uint8), "RGB")


def save_as(image: Image.Image, path: Path, fmt: str, mode: str) -> None:
    """Save an RGB image as fmt in the given mode (RGBA: a transparent border; I;16: 16-bit grayscale)."""
    if mode == "RGBA":
        alpha = np.zeros((image.height, image.width), np.uint8)
        alpha[2:-2, 2:-2] = 255
        out = image.convert("RGBA")
        out.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "I;16":
        out = Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)
    elif mode == "P":
        out = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    else:
        out = image.convert(mode)
    out.save(path, format=fmt)


def write_fake_image_folder(
    dest: str | os.PathLike,
    *,
    classes: dict | None = None,
    train_per_class: int = 7,
    val_per_class: int = 3,
    seed: int = 0,
) -> Path:
    """Write dest/train/<class>/... and dest/val/<class>/... and return dest.

    Every class folder gets images of all FAKE_FOLDER_KINDS; every third image sits in a nested
    sub-folder ("more/batch 1/"). Also a stray non-image file per class and a hidden folder, which
    the loader must ignore."""
    rng = np.random.default_rng(seed)
    classes = FAKE_FOLDER_CLASSES if classes is None else classes
    root = Path(dest)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            (folder / "notes.txt").write_text("not an image\n")
            (folder / ".hidden").mkdir()
            (folder / ".hidden" / "ignored.png").write_bytes(b"not even a PNG")
            for j in range(count):
                width, height, fmt, mode = FAKE_FOLDER_KINDS[(j + len(name)) % len(FAKE_FOLDER_KINDS)]
                where = folder / "more" / "batch 1" if j % 3 == 2 else folder
                where.mkdir(parents=True, exist_ok=True)
                suffix = ".jpg" if fmt == "JPEG" else ".PNG" if j % 2 else ".png"
                save_as(fake_colour_image(colour, width, height, rng), where / f"img {j}{suffix}", fmt, mode)
    return root
