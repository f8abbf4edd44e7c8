"""Tiny ImageNet (200 classes, 64x64 RGB) read from its original layout, decoded once into a .npy cache.

Layout, as unzipped from tiny-imagenet-200.zip:
    tiny-imagenet-200/wnids.txt                        one wnid per line; label = line index (0-based)
    tiny-imagenet-200/words.txt                        wnid <TAB> names  (class names for reports)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG       500 per class
    tiny-imagenet-200/train/<wnid>/<wnid>_boxes.txt    bounding boxes (not used: we classify)
    tiny-imagenet-200/val/images/*.JPEG                10,000 images
    tiny-imagenet-200/val/val_annotations.txt          filename <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    tiny-imagenet-200/test/images/*.JPEG               no labels: never loaded

Cache, in <root>/vitfuse-cache/ (next to the data), written and checked by vit.data.cache:
    <split>_images.npy    uint8 (N, 64, 64, 3), opened with np.load(mmap_mode="r")
    <split>_labels.npy    int32 (N,)
    <split>_manifest.json fingerprint of the sources + counts; written last, so it marks a complete cache

The fingerprint covers every image of the split and the files its labels come from (wnids.txt, and
val_annotations.txt for val); any change rebuilds the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from vit.data.cache import CACHE_DIRNAME, SPLITS, BadImage, fingerprint, load_cached
from vit.data.common import DOWNLOAD_HINT, Dataset, DatasetError

DATASET_DIRNAME = "tiny-imagenet-200"
IMAGE_SHAPE = (64, 64, 3)
IMAGE_SUFFIXES = (".jpeg", ".jpg")


# ---------------------------------------------------------------------------------------------------------------
# Layout: where the files are and what their labels are.


def find_root(data_dir: str | os.PathLike) -> Path:
    """The folder holding wnids.txt: data_dir itself, or data_dir/tiny-imagenet-200."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise DatasetError(f"data directory {data_dir} does not exist; {DOWNLOAD_HINT}")
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a directory; {DOWNLOAD_HINT}")
    for candidate in (data_dir, data_dir / DATASET_DIRNAME):
        if (candidate / "wnids.txt").is_file():
            return candidate
    # Name the missing file in the folder the user most likely meant.
    root = data_dir / DATASET_DIRNAME if (data_dir / DATASET_DIRNAME).is_dir() else data_dir
    raise DatasetError(
        f"missing {root / 'wnids.txt'}: {data_dir} does not look like Tiny ImageNet (expected wnids.txt, words.txt, "
        f"train/ and val/ in it or in {data_dir / DATASET_DIRNAME}); {DOWNLOAD_HINT}"
    )


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DatasetError(f"missing {path} ({what}); is the dataset folder complete? {DOWNLOAD_HINT}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} ({what}): {e}") from e


def read_wnids(root: Path) -> list[str]:
    """Class ids in label order: label i is line i (non-empty lines) of wnids.txt."""
    path = root / "wnids.txt"
    wnids: list[str] = []
    for lineno, line in enumerate(_read_text(path, "the list of classes").splitlines(), 1):
        wnid = line.strip()
        if not wnid:
            continue
        if wnid in wnids:
            raise DatasetError(f"{path}:{lineno}: wnid {wnid!r} is listed twice: {line!r}")
        wnids.append(wnid)
    if not wnids:
        raise DatasetError(f"{path} lists no classes")
    return wnids


def read_class_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable names from words.txt ("n01443537<TAB>goldfish, Carassius auratus"); the wnid if not listed."""
    path = root / "words.txt"
    names: dict[str, str] = {}
    for line in _read_text(path, "class names").splitlines():
        wnid, sep, words = line.partition("\t")
        if sep:
            names[wnid.strip()] = words.strip()
    return [names.get(wnid) or wnid for wnid in wnids]


def _line_of(path: Path, wnid: str) -> int:
    """The line of wnids.txt (counted from 1, blank lines too, as an editor counts) listing wnid."""
    lines = _read_text(path, "the list of classes").splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip() == wnid)


def _image_files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def list_train(root: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """Paths of train/<wnid>/images/*.JPEG in wnids.txt order, and their labels (index of the wnid)."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"missing folder {train_dir}; is the dataset folder complete? {DOWNLOAD_HINT}")
    known = set(wnids)
    strays = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and e.name not in known)
    if strays:
        raise DatasetError(
            f"{train_dir / strays[0]} is a class folder whose wnid is not in {root / 'wnids.txt'} "
            f"({len(strays)} such folders); wnids.txt and train/ must list the same classes"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        images_dir = train_dir / wnid / "images"
        if not images_dir.is_dir():
            raise DatasetError(f"missing folder {images_dir} for class {wnid} "
                               f"({root / 'wnids.txt'}:{_line_of(root / 'wnids.txt', wnid)})")
        names = _image_files(images_dir)
        if not names:
            raise DatasetError(f"no .JPEG images in {images_dir} (class {wnid})")
        paths += [images_dir / name for name in names]
        labels += [label] * len(names)
    return paths, np.asarray(labels, dtype=np.int32)


def list_val(root: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    """Paths of val/images/*.JPEG sorted by name, labels from val_annotations.txt (the only source of them)."""
    annotations = root / "val" / "val_annotations.txt"
    images_dir = root / "val" / "images"
    text = _read_text(annotations, "the val labels: filename, wnid, x0, y0, x1, y1, tab separated")
    if not images_dir.is_dir():
        raise DatasetError(f"missing folder {images_dir}; is the dataset folder complete? {DOWNLOAD_HINT}")
    label_of_wnid = {wnid: i for i, wnid in enumerate(wnids)}
    label_of_file: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{annotations}:{lineno}"
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{where}: expected 'filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line!r}")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of_wnid:
            raise DatasetError(f"{where}: unknown wnid {wnid!r} (not in {root / 'wnids.txt'}): {line!r}")
        if not filename or Path(filename).name != filename or filename in (".", ".."):
            raise DatasetError(f"{where}: {filename!r} is not a file name in {images_dir}: {line!r}")
        if filename in label_of_file:
            raise DatasetError(f"{where}: {filename} is annotated twice: {line!r}")
        label_of_file[filename] = label_of_wnid[wnid]

    on_disk = _image_files(images_dir)
    missing = sorted(set(label_of_file) - {e.name for e in os.scandir(images_dir) if e.is_file()})
    if missing:
        raise DatasetError(
            f"{annotations} names {len(missing)} images that are not in {images_dir}, e.g. {missing[0]}"
        )
    unlabeled = [name for name in on_disk if name not in label_of_file]
    if unlabeled:
        raise DatasetError(
            f"{len(unlabeled)} images in {images_dir} have no line in {annotations}, e.g. {unlabeled[0]}"
        )
    names = sorted(label_of_file)
    return [images_dir / name for name in names], np.asarray([label_of_file[n] for n in names], dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Decoding (the cache itself is vit.data.cache, shared with the image-folder layout).


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 (64, 64, 3) RGB. Grayscale, CMYK, palette... are converted to RGB; any other size is an error."""
    try:
        with Image.open(path) as img:
            img.load()  # Image.open only reads the header: decode now, so a truncated file fails here
            if img.size != IMAGE_SHAPE[1::-1]:
                raise BadImage(f"{path}: image is {img.size[0]}x{img.size[1]} pixels, expected 64x64")
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def load_tiny_imagenet(
    data_dir: str | os.PathLike,
    split: str,
    *,
    workers: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """One split of Tiny ImageNet as uint8 (N, 64, 64, 3) memmap + int32 labels, decoding on first use.

    data_dir: the folder with wnids.txt, or its parent holding tiny-imagenet-200/.
    workers: decoding processes (default: up to 8); only used when the cache is (re)built.
    skip_bad_images: leave out unreadable images instead of failing; Dataset.skipped lists them.
    cache_dir: where the decoded arrays go (default <root>/vitfuse-cache).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for tiny-imagenet; expected one of {SPLITS} (test has no labels)")
    root = find_root(data_dir)
    wnids = read_wnids(root)
    class_names = read_class_names(root, wnids)
    if split == "train":
        paths, labels = list_train(root, wnids)
        label_sources = [root / "wnids.txt"]
    else:
        paths, labels = list_val(root, wnids)
        label_sources = [root / "wnids.txt", root / "val" / "val_annotations.txt"]
    source_fingerprint = fingerprint(root, paths + label_sources)
    cache_dir = Path(cache_dir) if cache_dir is not None else root / CACHE_DIRNAME
    images, labels, skipped, built = load_cached(
        cache_dir, split, paths, labels, source_fingerprint, decode_image, IMAGE_SHAPE, workers=workers,
        skip_bad_images=skip_bad_images, progress=progress, what=f"tiny-imagenet {split}")
    return Dataset(
        images=images, labels=labels, class_names=class_names, name="tiny-imagenet", split=split, skipped=skipped,
        decoded_now=built,
    )
