"""Any image-folder dataset (torchvision ImageFolder's layout), resized once into the memory-mapped cache.

Layout:
    DIR/train/<class>/**/*.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}   (torchvision's IMG_EXTENSIONS)
                                                      any size; RGB, grayscale, palette, CMYK or with alpha
    DIR/val/<class>/**/*                              every val class must also be a train class

Classes are the folder names under train/, sorted (Python string order, as torchvision does): label i is
the i-th name. Images may sit in sub-folders of a class folder (found recursively, in sorted path order).
Names starting with "." (.DS_Store, .ipynb_checkpoints) are left out; files with other suffixes (.gif,
.heic, .txt, ...) too, counted by suffix in a note.

Every image becomes uint8 (S, S, 3) RGB, S = image_size, by `load_image` (the same function classifies
single files in `python evaluate.py RUN --predict`):
    1. decode, at any size (no decompression-bomb limit: these are the user's own files); a JPEG is
       decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side is still >= S
    2. apply the EXIF orientation (photos from phones)
    3. to RGB: grayscale is repeated over the channels, CMYK/palette converted, 16-bit grayscale scaled
       to 8 bits (float grayscale read in 0..1, or else 0..255), and alpha composited over white
    4. resize so the shorter side is S (Pillow's bicubic filter, antialiased when shrinking; aspect kept)
    5. crop the centre S x S

Cache, in DIR/vitfuse-cache/ (vit.data.cache): <split>_<S>px_{images,labels}.npy and a manifest whose
fingerprint covers every image (path, size, mtime), the class list, S and the method above, so changing any
of them rebuilds it; caches of several sizes live side by side.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vit.data.cache import CACHE_DIRNAME, SPLITS, BadImage, fingerprint, load_cached
from vit.data.common import Dataset, DatasetError

DEFAULT_IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow refuses images over 179 M pixels as possible decompression bombs (and warns over 89 M); a
# whole-slide, satellite or panorama image of one's own is not an attack
Image.MAX_IMAGE_PIXELS = None
# Part of every cache fingerprint: change it when load_image changes what it returns.
METHOD = (
    "v2: jpeg draft, exif orientation, deep grayscale to 8 bits (floats in 0..1 or 0..255), rgb (alpha "
    "over white), shorter side bicubic, centre crop")
LAYOUT_HELP = "DIR/train/<class>/*.jpg|png and DIR/val/<class>/*.jpg|png (torchvision's ImageFolder layout)"


# ---------------------------------------------------------------------------------------------------------------
# One image: decode, orient, RGB, resize the shorter side, centre crop.


def _to_8_bits(img: Image.Image) -> Image.Image:
    """A grayscale image deeper than 8 bits as "L": integers in 0..65535 (16-bit PNG and TIFF)
    keep their top 8 bits; floats (32-bit TIFF) are read in 0..1 (times 255) or else in 0..255.
    Values outside those ranges raise ValueError, rather than clip to black or white."""
    values = np.asarray(img)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if img.mode == "F":
        bad = int(np.size(values) - np.isfinite(values).sum())
        if bad or low < 0 or high > 255:
            what = (f"{bad} float pixel{'s are' if bad > 1 else ' is'} NaN or infinite" if bad
                    else f"float pixels from {low:g} to {high:g}")
            raise ValueError(f"{what}; float images are read in 0..1 or 0..255: scale it into "
                             "one of those, or save it as 8 or 16 bit")
        scale = 255.0 if high <= 1 else 1.0
        return Image.fromarray(np.rint(values.astype(np.float64) * scale).astype(np.uint8), "L")
    if low < 0 or high > 65535:
        raise ValueError(f"integer pixels from {low:g} to {high:g}; images deeper than 8 bits are "
                         "read in 0..65535 (16 bit): save it as 8 or 16 bit")
    return Image.fromarray((values.astype(np.int64) >> 8).astype(np.uint8), "L")


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """img as "RGB" or "L" (mode): deeper grayscale made 8 bits (_to_8_bits), alpha composited
    over white."""
    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        img = _to_8_bits(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == mode else img.convert(mode)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, aspect kept), then the centre size x size."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(path: str | os.PathLike, size: int, channels: int = 3) -> np.ndarray:
    """uint8 (size, size, channels) from an image file of any size and mode (see the module docstring).

    channels: 3 (RGB) or 1 (grayscale, ITU-R 601-2 luma). Raises BadImage naming the file.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as img:
            img.draft(None, (size, size))  # JPEG only: decode at a reduced scale, shorter side still >= size
            img.load()  # Image.open only reads the header: decode now, so a truncated file fails here
            try:
                img = ImageOps.exif_transpose(img)
            except (OSError, SyntaxError, ValueError, KeyError, TypeError):
                pass  # unreadable orientation metadata: keep the pixels as stored
            img = resize_center_crop(_to_mode(img, "RGB" if channels == 3 else "L"), size)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if os.path.islink(path) and not os.path.exists(path):
            raise BadImage(f"{path}: a broken link (to {os.readlink(path)}), not an image") from None
        raise BadImage(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return pixels.reshape(size, size, channels)


# ---------------------------------------------------------------------------------------------------------------
# Layout: the class folders and their images.


def _visible(name: str) -> bool:
    return not name.startswith(".")


def is_image_file(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMAGE_SUFFIXES)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in split_dir (hidden ones left out)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))


def images_in(class_dir: Path, others: list[str] | None = None) -> list[Path]:
    """Every image file under class_dir (sub-folders included, linked ones too), sorted by relative
    path; others (if given) takes the names of the files left out for their suffix. A linked
    folder already read (a link to '.') is not read again, and one holding the class folder (a
    link to a parent) not at all: such links would count the class's images over and over, or
    never end, and a parent's other classes are not this class."""
    found, seen = [], set()
    class_real = os.path.realpath(class_dir)
    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        holds_class = real != class_real and os.path.commonpath([real, class_real]) == real
        if real in seen or holds_class:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if _visible(d))  # sorted: the first path to a folder wins
        found += [Path(folder) / name for name in files if is_image_file(name)]
        if others is not None:
            others += [name for name in files if _visible(name) and not is_image_file(name)]
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def _split_dir(root: Path, split: str) -> Path:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"missing folder {split_dir}: an image-folder dataset needs {LAYOUT_HELP}")
    return split_dir


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def list_split(root: Path, split: str, classes: list[str] | None = None,
               others: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, class names) of root/split. classes: the train classes (labels index them);
    None lists train itself. others (if given) takes the names of the files in the class folders
    left out for their suffix."""
    split_dir = _split_dir(root, split)
    names = class_folders(split_dir)
    stray = sorted(e.name for e in os.scandir(split_dir) if e.is_file() and is_image_file(e.name))
    if stray:
        raise DatasetError(f"{split_dir / stray[0]} is not in a class folder ({len(stray)} such images); "
                           f"expected {LAYOUT_HELP}")
    if not names:
        raise DatasetError(f"no images in {split_dir}: it has no class folders; expected {LAYOUT_HELP}")
    if classes is None:
        classes = names
    else:  # names compared in one Unicode form: a folder copied from macOS spells "é" as e + accent
        unknown = [n for n in names if _nfc(n) not in {_nfc(c) for c in classes}]
        if unknown:
            raise DatasetError(
                f"{split_dir / unknown[0]} is a class that is not in {root / 'train'} ({len(unknown)} such "
                f"class{'es' * (len(unknown) > 1)}: {', '.join(map(repr, unknown[:5]))}); every {split} class "
                "needs training images")
    label_of = {_nfc(name): i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for name in names:
        found = images_in(split_dir / name, others)
        if not found:
            others = sum(len(files) for _, _, files in os.walk(split_dir / name))
            what = (f"{others} file{'s' if others > 1 else ''}, none an image named "
                    f"*{', *'.join(IMAGE_SUFFIXES)} (names starting with '.' are left out)"
                    if others else "it is empty")
            raise DatasetError(f"no images in class folder {split_dir / name} ({what}); "
                               f"remove the folder or add images")
        paths += found
        labels += [label_of[_nfc(name)]] * len(found)
    return paths, np.asarray(labels, dtype=np.int32), list(classes)


# ---------------------------------------------------------------------------------------------------------------
# The dataset.


def load_image_folder(
    data_dir: str | os.PathLike,
    split: str,
    *,
    image_size: int | None = None,
    workers: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """One split as uint8 (N, S, S, 3) memmap + int32 labels, S = image_size (default 64); decodes on first use.

    data_dir: the folder holding train/ and val/.
    workers: decoding processes (default: up to 8); only used when the cache is (re)built.
    skip_bad_images: leave out unreadable images instead of failing; Dataset.skipped lists them.
    cache_dir: where the decoded arrays go (default DIR/vitfuse-cache).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for an image folder; expected one of {SPLITS}")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DatasetError(f"data.image_size must be a positive integer, got {image_size!r}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist or is not a folder; expected {LAYOUT_HELP}")
    others: list[str] = []  # files of this split's class folders left out for their suffix
    train_paths, train_labels, classes = list_split(root, "train", others=others if split == "train" else None)
    if len(classes) == 1:  # every label the same: loss 0 and 100% accuracy from the first step
        raise DatasetError(f"{root / 'train'} holds one class folder ({classes[0]!r}), and a classifier "
                           "needs two or more: was the copy cut short?")
    if split == "train":
        paths, labels = train_paths, train_labels
    else:
        paths, labels, _ = list_split(root, split, classes, others)
    if others:
        print(note_left_out(root / split, others), file=sys.stderr)
    method = f"{METHOD}; size {size}; classes {len(classes)}: " + "\x00".join(classes)
    source_fingerprint = fingerprint(root, paths, method)
    cache_dir = Path(cache_dir) if cache_dir is not None else root / CACHE_DIRNAME
    images, labels, skipped, built = load_cached(
        cache_dir, f"{split}_{size}px", paths, labels, source_fingerprint, partial(load_image, size=size),
        (size, size, 3), workers=workers, skip_bad_images=skip_bad_images, progress=progress,
        what=f"image-folder {split} at {size}x{size}")
    if not len(labels):
        raise DatasetError(f"no images left in {root / split}: all {len(skipped)} were unreadable, "
                           f"e.g. {skipped[0] if skipped else '?'}")
    empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if not n]
    if empty and split == "train":  # every training image of a class skipped: it could not be learnt
        raise DatasetError(f"no images left in class folder {root / split / empty[0]}: all were "
                           f"unreadable and skipped ({len(empty)} of {len(classes)} classes); "
                           "every class needs training images: fix or remove the files, or remove "
                           "the class from train/ and val/")
    if empty:  # val classes with no folder, or whose every image was skipped
        print(f"note: {len(empty)} of {len(classes)} classes {'has' if len(empty) == 1 else 'have'} no "
              f"images in {root / split}, so {'its' if len(empty) == 1 else 'their'} {split} accuracy is "
              f"not measured: {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}", file=sys.stderr)
    return Dataset(images=images, labels=labels, class_names=[printable(c) for c in classes],
                   name="image-folder", split=split, skipped=skipped, decoded_now=built)


def printable(name: str) -> str:
    """A file name as text that prints and draws: bytes that are not UTF-8 (a name from a zip made
    on Windows, say, which Python keeps as surrogates) shown as \\xe9."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def note_left_out(split_dir: Path, others: list[str]) -> str:
    """The note on the files of split_dir's class folders that are not read, by suffix."""
    suffixes = Counter(os.path.splitext(name)[1].lower() or "(no suffix)" for name in others)
    counted = ", ".join(f"{n} {suffix}" for suffix, n in suffixes.most_common(5))
    return (f"note: {len(others)} file{'s' if len(others) > 1 else ''} in the class folders of {split_dir} "
            f"{'are' if len(others) > 1 else 'is'} not read ({counted}{', ...' if len(suffixes) > 5 else ''}): "
            f"images are *{', *'.join(IMAGE_SUFFIXES)}")
