"""Tiny ImageNet (200 classes, 64x64 RGB) read from its original layout, decoded once into a .npy cache.

Layout, as unzipped from tiny-imagenet-200.zip:
    tiny-imagenet-200/wnids.txt                        one wnid per line; label = line index (0-based)
    tiny-imagenet-200/words.txt                        wnid <TAB> names  (class names for reports)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG       500 per class
    tiny-imagenet-200/train/<wnid>/<wnid>_boxes.txt    bounding boxes (not used: we classify)
    tiny-imagenet-200/val/images/*.JPEG                10,000 images
    tiny-imagenet-200/val/val_annotations.txt          filename <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1
    tiny-imagenet-200/test/images/*.JPEG               no labels: never loaded

Cache, in <root>/vitfuse-cache/ (next to the data):
    <split>_images.npy    uint8 (N, 64, 64, 3), opened with np.load(mmap_mode="r")
    <split>_labels.npy    int32 (N,)
    <split>_manifest.json fingerprint of the sources + counts; written last, so it marks a complete cache

The fingerprint hashes the sorted relative paths, sizes and mtimes of every image of the split and of the
files its labels come from (wnids.txt, and val_annotations.txt for val); any change rebuilds the cache.
A rebuild first deletes the manifest, writes every array under a temporary name and os.replace()s it into
place, then writes the manifest: a run killed half-way leaves no manifest, so its files never count.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vit.data.common import DOWNLOAD_HINT, Dataset, DatasetError

DATASET_DIRNAME = "tiny-imagenet-200"
CACHE_DIRNAME = "vitfuse-cache"
# how to leave unreadable images out, with each command's own flag for it
SKIP_HINT = (
    "leave unreadable images out: python train.py ... --set data.skip_bad_images=true, "
    "python -m vit.data prepare ... --skip-bad-images, load_dataset(..., skip_bad_images=True)"
)
CACHE_FORMAT = 1  # bump when the cache files change meaning
IMAGE_SHAPE = (64, 64, 3)
IMAGE_SUFFIXES = (".jpeg", ".jpg")
SPLITS = ("train", "val")


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
            raise DatasetError(f"missing folder {images_dir} for class {wnid} (line {label + 1} of wnids.txt)")
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


def fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of (relative path, size, mtime) of each file: changes when one is added, removed or rewritten."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    for path in sorted(files):
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Decoding.


class BadImage(Exception):
    """An image file that cannot be decoded into a 64x64 RGB array; the message names the file."""


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


def _decode_chunk(paths: list[str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a list of files: (uint8 (n, 64, 64, 3), [(index in chunk, error message)]); bad rows stay zero.

    Errors are returned, not raised, so that the caller decides between failing and skipping.
    """
    images = np.zeros((len(paths), *IMAGE_SHAPE), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            images[i] = decode_image(path)
        except BadImage as e:
            errors.append((i, str(e)))
    return images, errors


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _decode_all(paths: list[Path], workers: int, on_chunk, *, desc: str, progress: bool) -> None:
    """Decode every path in order, calling on_chunk(start_index, images, errors) per chunk.

    workers=1 decodes in this process. More workers use a process pool started with "spawn": forking a
    process that has already started jax's threads can deadlock. Chunks amortize pickling the results.
    """
    n = len(paths)
    chunk_size = max(1, min(512, math.ceil(n / (4 * workers))))
    chunks = [[str(p) for p in paths[i : i + chunk_size]] for i in range(0, n, chunk_size)]
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            results = map(_decode_chunk, chunks)
            for k, (images, errors) in enumerate(results):
                on_chunk(k * chunk_size, images, errors)
                bar.update(len(images))
            return
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for k, (images, errors) in enumerate(pool.map(_decode_chunk, chunks)):
                on_chunk(k * chunk_size, images, errors)
                bar.update(len(images))
        finally:
            # On an error (bad image, Ctrl-C) drop the chunks not started yet instead of decoding them all.
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# Cache.


def _cache_paths(cache_dir: Path, split: str) -> dict[str, Path]:
    return {
        "images": cache_dir / f"{split}_images.npy",
        "labels": cache_dir / f"{split}_labels.npy",
        "manifest": cache_dir / f"{split}_manifest.json",
    }


def _open_cache(cache_dir: Path, split: str, source_fingerprint: str):
    """(manifest, images memmap, labels) if a complete cache for these sources exists, else None."""
    paths = _cache_paths(cache_dir, split)
    try:
        manifest = json.loads(paths["manifest"].read_text())
        if manifest.get("format") != CACHE_FORMAT or manifest.get("fingerprint") != source_fingerprint:
            return None
        images = np.load(paths["images"], mmap_mode="r")
        labels = np.load(paths["labels"])
    except (OSError, ValueError):  # missing, unreadable or truncated files: rebuild
        return None
    count = manifest.get("count")
    if images.shape != (count, *IMAGE_SHAPE) or images.dtype != np.uint8:
        return None
    if labels.shape != (count,) or labels.dtype != np.int32:
        return None
    return manifest, images, labels


def _write_atomic(path: Path, write) -> None:
    """write(file) into a temporary name beside path, fsync, then rename over path."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_cache(
    cache_dir: Path,
    split: str,
    paths: list[Path],
    labels: np.ndarray,
    source_fingerprint: str,
    *,
    workers: int,
    skip_bad_images: bool,
    progress: bool,
) -> None:
    files = _cache_paths(cache_dir, split)
    made = [d for d in (cache_dir, *cache_dir.parents) if not d.exists()]  # removed again on failure
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The manifest marks a complete cache: remove it first, so that until the new one is written
        # nothing here counts, whatever state the arrays are in.
        files["manifest"].unlink(missing_ok=True)
        for leftover in cache_dir.glob(f"{split}_*.tmp-*"):  # from a run that was killed
            leftover.unlink(missing_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot write the decoded cache in {cache_dir}: {e}") from e

    n = len(paths)
    tmp_images = files["images"].with_name(f"{files['images'].name}.tmp-{os.getpid()}")
    compacted = tmp_images.with_name(tmp_images.name + "-compact")
    bad: list[tuple[int, str]] = []
    try:
        # Decode straight into a file-backed array: the 100k train images (1.2 GB) never sit in RAM at once.
        out = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, *IMAGE_SHAPE))

        def on_chunk(start, images, errors):
            if errors and not skip_bad_images:
                raise DatasetError(f"{errors[0][1]}. Fix or remove the file, or {SKIP_HINT}")
            out[start : start + len(images)] = images
            bad.extend((start + i, message) for i, message in errors)

        _decode_all(
            paths, workers, on_chunk, desc=f"decoding tiny-imagenet {split} (once)", progress=progress
        )
        out.flush()
        if bad:
            # Rare path: copy the good rows into an array of the right length.
            keep = np.ones(n, dtype=bool)
            keep[[i for i, _ in bad]] = False
            labels = labels[keep]
            good = np.flatnonzero(keep)
            dense = np.lib.format.open_memmap(compacted, mode="w+", dtype=np.uint8, shape=(len(good), *IMAGE_SHAPE))
            for s in range(0, len(good), 4096):
                dense[s : s + 4096] = out[good[s : s + 4096]]
            dense.flush()
            del dense
            os.replace(compacted, tmp_images)
            print(f"tiny-imagenet {split}: skipped {len(bad)} unreadable images, e.g. {bad[0][1]}", file=sys.stderr)
        del out
        with open(tmp_images, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_images, files["images"])
        _write_atomic(files["labels"], lambda f: np.save(f, labels))
        manifest = {
            "format": CACHE_FORMAT,
            "split": split,
            "fingerprint": source_fingerprint,
            "count": int(len(labels)),
            "image_shape": list(IMAGE_SHAPE),
            "skipped": [message for _, message in bad],
        }
        _write_atomic(files["manifest"], lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    except OSError as e:
        raise DatasetError(f"cannot write the decoded cache in {cache_dir}: {e}") from e
    finally:
        tmp_images.unlink(missing_ok=True)
        compacted.unlink(missing_ok=True)
        for folder in made:  # a failed build leaves no empty cache folder behind
            try:
                folder.rmdir()  # only if empty: a folder with a finished cache stays
            except OSError:
                break


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

    cached = _open_cache(cache_dir, split, source_fingerprint)
    if cached is None:
        _build_cache(
            cache_dir,
            split,
            paths,
            labels,
            source_fingerprint,
            workers=workers or default_workers(),
            skip_bad_images=skip_bad_images,
            progress=progress,
        )
        cached = _open_cache(cache_dir, split, source_fingerprint)
        if cached is None:
            raise DatasetError(f"the cache just written in {cache_dir} does not read back; is the disk full?")
    manifest, images, labels = cached
    skipped = list(manifest.get("skipped", []))
    if skipped and not skip_bad_images:
        # The cache was built with skip_bad_images=True; without the flag a bad image is still an error.
        raise DatasetError(
            f"{skipped[0]} ({len(skipped)} unreadable images in {split}). Fix or remove the files, or {SKIP_HINT}"
        )
    return Dataset(
        images=images, labels=labels, class_names=class_names, name="tiny-imagenet", split=split, skipped=skipped
    )
