"""The decoded-image cache shared by every folder dataset: decode once, memory-map ever after.

A cache is three files in one folder, named by a prefix (e.g. "train", or "train_96px"):
    <prefix>_images.npy    uint8 (N, H, W, C), opened with np.load(mmap_mode="r")
    <prefix>_labels.npy    int32 (N,)
    <prefix>_manifest.json fingerprint of the sources + counts; written last, so it marks a complete cache

The fingerprint hashes the sorted relative paths, sizes and mtimes of every source file (the images and
whatever the labels come from) and a string naming how they were decoded; any change rebuilds the cache.
A rebuild first deletes the manifest, writes every array under a temporary name and os.replace()s it into
place, then writes the manifest: a run killed half-way leaves no manifest, so its files never count, and
the next build in the folder, of any prefix, deletes its temporary files (remove_stopped_builds).
One process builds a given cache at a time (build_lock: an exclusive flock on <prefix>.lock in the folder,
which the system releases if its holder dies); another that needs it meanwhile waits, then reads it.

Images are decoded by `decode(path) -> uint8 (H, W, C)` (raising BadImage with a message naming the file) in
worker processes started with "spawn", so `decode` must be picklable: a module-level function or a
functools.partial of one. They go straight into a file-backed array, never all in memory at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from vit.data.common import DatasetError
from vit.progress import progress_bar
from vit.runlock import still_at

CACHE_FORMAT = 1  # bump when the cache files change meaning
CACHE_DIRNAME = "vitfuse-cache"  # the cache's folder inside a dataset's folder
SPLITS = ("train", "val")  # the splits a folder dataset has, each cached on its own
# how to leave unreadable images out, with each command's own flag for it
SKIP_HINT = (
    "leave unreadable images out: python train.py ... --set data.skip_bad_images=true (evaluate.py "
    "follows the run's setting), "
    "python -m vit.data prepare ... --skip-bad-images, load_dataset(..., skip_bad_images=True)"
)

# where else the cache can go, with each command's own flag for it
CACHE_DIR_HINT = ("put it in a folder you can write to: python train.py ... --set data.cache_dir=DIR, "
                  "python -m vit.data prepare ... --cache-dir DIR")

Decode = Callable[[str], np.ndarray]


def unwritable(cache_dir: Path, err: OSError) -> DatasetError:
    """The error for a cache that cannot be written, saying where else it can go."""
    return DatasetError(f"cannot write the decoded cache in {cache_dir}: {err}; {CACHE_DIR_HINT}")


def unreadable(n: int) -> str:
    """'1 unreadable image', '3 unreadable images': how the messages count the files left out."""
    return f"{n} unreadable image{'' if n == 1 else 's'}"


class BadImage(Exception):
    """An image file that cannot be decoded into the cached shape; the message names the file."""


def dataset_cache_dir(cache_root: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """The folder in data.cache_dir for one dataset's caches: <name>-<hash of its absolute path>,
    so that one cache_dir serves many datasets without their caches replacing each other."""
    folder = Path(data_dir).expanduser().resolve()
    digest = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:10]
    return Path(cache_root).expanduser() / f"{folder.name}-{digest}"


def fingerprint(root: Path, files: list[Path], method: str = "") -> str:
    """Hash of (relative path, size, mtime) of each file and of `method` (how the files are decoded):
    changes when a file is added, removed or rewritten, or the decoding changes."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    if method:
        digest.update(f"method {method}\n".encode(errors="surrogateescape"))
    for path in sorted(files):
        try:
            st = path.stat()
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError as e:  # a broken link, say: the decoder reports it (or skips it) by name
            stamp = f"unreadable {e.errno}"
        digest.update(f"{path.relative_to(root).as_posix()}\t{stamp}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Decoding.


def _decode_chunk(decode: Decode, shape: tuple, paths: list[str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a list of files: (uint8 (n, *shape), [(index in chunk, error message)]); bad rows stay zero.

    Errors are returned, not raised, so that the caller decides between failing and skipping.
    """
    images = np.zeros((len(paths), *shape), dtype=np.uint8)
    errors: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            images[i] = decode(path)
        except BadImage as e:
            errors.append((i, str(e)))
    return images, errors


def listed(skipped: list[str], manifest: Path, shown: int = 3) -> str:
    """The first `shown` messages of the images skipped, and where the manifest lists them all."""
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{'; '.join(skipped[:shown])}{more} (all listed in {manifest}, under \"skipped\")"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_all(paths: list[Path], decode: Decode, shape: tuple, workers: int, on_chunk, *, desc: str,
               progress: bool) -> None:
    """Decode every path in order, calling on_chunk(start_index, images, errors) per chunk.

    workers=1 decodes in this process. More workers use a process pool started with "spawn": forking a
    process that has already started jax's threads can deadlock. Chunks amortize pickling the results.
    """
    n = len(paths)
    chunk_size = max(1, min(512, math.ceil(n / (4 * workers))))
    chunks = [[str(p) for p in paths[i : i + chunk_size]] for i in range(0, n, chunk_size)]
    work = partial(_decode_chunk, decode, tuple(shape))
    with progress_bar(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        if workers <= 1:
            for k, (images, errors) in enumerate(map(work, chunks)):
                on_chunk(k * chunk_size, images, errors)
                bar.update(len(images))
            return
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            with _sigint_blocked():  # map starts the workers: they inherit the blocked SIGINT
                decoded = pool.map(work, chunks)
            for k, (images, errors) in enumerate(decoded):
                on_chunk(k * chunk_size, images, errors)
                bar.update(len(images))
        finally:
            # On an error (bad image, Ctrl-C) drop the chunks not started yet instead of decoding them all.
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _sigint_blocked():
    """SIGINT held back from this (main) thread while it starts the decoding processes, which keep
    the blocked mask: a terminal's Ctrl-C goes to the whole process group, and it raised
    KeyboardInterrupt in every worker, mid-way through importing jax, each with a traceback. This
    process gets it as the block ends (held, not lost) and stops the workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


# ---------------------------------------------------------------------------------------------------------------
# The cache files.


def cache_paths(cache_dir: Path, prefix: str) -> dict[str, Path]:
    return {
        "images": cache_dir / f"{prefix}_images.npy",
        "labels": cache_dir / f"{prefix}_labels.npy",
        "manifest": cache_dir / f"{prefix}_manifest.json",
    }


def open_cache(cache_dir: Path, prefix: str, source_fingerprint: str, shape: tuple):
    """(manifest, images memmap, labels) if a complete cache for these sources exists, else None."""
    paths = cache_paths(cache_dir, prefix)
    try:
        manifest = json.loads(paths["manifest"].read_text())
        if manifest.get("format") != CACHE_FORMAT or manifest.get("fingerprint") != source_fingerprint:
            return None
        images = np.load(paths["images"], mmap_mode="r")
        labels = np.load(paths["labels"])
    except (OSError, ValueError):  # missing, unreadable or truncated files: rebuild
        return None
    count = manifest.get("count")
    if images.shape != (count, *shape) or images.dtype != np.uint8:
        return None
    if labels.shape != (count,) or labels.dtype != np.int32:
        return None
    return manifest, images, labels


def write_atomic(path: Path, write) -> None:
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


def write_text_atomic(path: Path, text: str) -> None:
    """write_atomic of a text file (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def build_cache(
    cache_dir: Path,
    prefix: str,
    paths: list[Path],
    labels: np.ndarray,
    source_fingerprint: str,
    decode: Decode,
    shape: tuple,
    *,
    workers: int,
    skip_bad_images: bool,
    progress: bool,
    what: str,
) -> None:
    """Decode `paths` into the cache `prefix` in cache_dir (which exists: load_cached makes it,
    holding build_lock). what: the split's name in messages."""
    files = cache_paths(cache_dir, prefix)
    try:
        # The manifest marks a complete cache: remove it first, so that until the new one is written
        # nothing here counts, whatever state the arrays are in.
        files["manifest"].unlink(missing_ok=True)
        for path in files.values():  # leftovers from a run that was killed
            for leftover in cache_dir.glob(f"{path.name}.tmp-*"):
                leftover.unlink(missing_ok=True)
    except OSError as e:
        raise unwritable(cache_dir, e) from e
    remove_stopped_builds(cache_dir, what)

    n = len(paths)
    tmp_images = files["images"].with_name(f"{files['images'].name}.tmp-{os.getpid()}")
    compacted = tmp_images.with_name(tmp_images.name + "-compact")
    bad: list[tuple[int, str]] = []
    try:
        # Decode straight into a file-backed array: the images never sit in RAM all at once.
        out = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, *shape))

        def on_chunk(start, images, errors):
            if errors and not skip_bad_images:
                raise DatasetError(
                    f"{errors[0][1]}. Fix or remove the file, or {SKIP_HINT}"
                )
            out[start : start + len(images)] = images
            bad.extend((start + i, message) for i, message in errors)

        decode_all(paths, decode, shape, workers, on_chunk, desc=f"decoding {what} (once)", progress=progress)
        out.flush()
        if bad:
            # Rare path: copy the good rows into an array of the right length.
            keep = np.ones(n, dtype=bool)
            keep[[i for i, _ in bad]] = False
            labels = labels[keep]
            good = np.flatnonzero(keep)
            dense = np.lib.format.open_memmap(compacted, mode="w+", dtype=np.uint8, shape=(len(good), *shape))
            for s in range(0, len(good), 4096):
                dense[s : s + 4096] = out[good[s : s + 4096]]
            dense.flush()
            del dense
            os.replace(compacted, tmp_images)
            print(f"{what}: skipped {unreadable(len(bad))}: {listed([m for _, m in bad], files['manifest'])}",
                  file=sys.stderr)
        del out
        with open(tmp_images, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_images, files["images"])
        write_atomic(files["labels"], lambda f: np.save(f, labels))
        manifest = {
            "format": CACHE_FORMAT,
            "prefix": prefix,
            "fingerprint": source_fingerprint,
            "count": int(len(labels)),
            "image_shape": list(shape),
            "skipped": [message for _, message in bad],
        }
        write_atomic(files["manifest"], lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    except OSError as e:
        raise unwritable(cache_dir, e) from e
    finally:
        tmp_images.unlink(missing_ok=True)
        compacted.unlink(missing_ok=True)


def remove_stopped_builds(cache_dir: Path, what: str) -> None:
    """Delete the half-written files of other caches in cache_dir whose build was stopped (a
    SIGKILL, say, at another image size): up to the size of a whole cache each, which nothing
    else would remove until that cache was built again. Each prefix's under its build_lock, so
    files of a build under way stay."""
    leftovers: dict[str, list[Path]] = {}
    for path in cache_dir.glob("*.tmp-*"):
        for suffix in ("_images.npy.tmp-", "_labels.npy.tmp-", "_manifest.json.tmp-"):
            if suffix in path.name:
                leftovers.setdefault(path.name.split(suffix)[0], []).append(path)
    for prefix, paths in sorted(leftovers.items()):
        try:
            with build_lock(cache_dir, prefix, what, wait=False):
                size = sum(p.stat().st_size for p in paths if p.exists())
                for path in paths:
                    path.unlink(missing_ok=True)
        except (OSError, DatasetError):  # being built now (BlockingIOError), or not ours to remove
            continue
        files = f"{len(paths)} half-written file{'s' if len(paths) > 1 else ''}"
        print(f"{what}: removed {files} of the cache {cache_dir / prefix}_* "
              f"({size:,} bytes), left by a build that was stopped", file=sys.stderr)


@contextlib.contextmanager
def build_lock(cache_dir: Path, prefix: str, what: str, wait: bool = True):
    """Hold the right to build the cache `prefix` in cache_dir (made if missing). Other processes
    wait here (threads too: flock is per open file), so two starts on the same data decode it
    once, and neither deletes the other's half-written files as leftovers. With wait=False a
    build under way (or a file system without flock) raises BlockingIOError instead.

    The lock file, <prefix>.lock, lives only while a build runs: its holder deletes it before it
    lets go, and a waiter that then gets the lock on the deleted file sees that and takes the new
    one. A build that fails leaves no folder behind that it made."""
    lock_path = cache_dir / f"{prefix}.lock"
    told = False
    while True:
        made = [d for d in (cache_dir, *cache_dir.parents) if not d.exists()]
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path, "a")  # noqa: SIM115 (closed below)
        except FileNotFoundError:  # its folder was removed between the two: a failed build's
            continue
        except OSError as e:
            raise unwritable(cache_dir, e) from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                lock.close()
                raise
            if not told:
                print(f"{what}: another process is building the cache {cache_dir / prefix}_*; waiting for it",
                      file=sys.stderr)
                told = True
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (Lustre mounted without -o flock)
            if not wait:
                lock.close()
                raise BlockingIOError(f"cannot lock {lock_path}: {e}") from e
            print(f"{what}: cannot lock {lock_path} ({e}); building the cache without it: start one "
                  "process at a time on new data, or run python -m vit.data prepare first", file=sys.stderr)
            break
        if still_at(lock_path, lock):
            break
        lock.close()  # locked a file its holder had deleted: take the one at the path now
    done = False
    try:
        yield
        done = True
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: see above
        lock.close()  # releases the flock
        if not done:  # a failed build leaves no cache folder behind that it made
            for folder in made:
                try:
                    folder.rmdir()  # only if empty: a folder with a finished cache stays
                except OSError:
                    break


def load_cached(
    cache_dir: Path,
    prefix: str,
    paths: list[Path],
    labels: np.ndarray,
    source_fingerprint: str,
    decode: Decode,
    shape: tuple,
    *,
    workers: int | None,
    skip_bad_images: bool,
    progress: bool,
    what: str,
) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """(images memmap, labels, skipped messages, whether this call built it) from the cache, building it first
    if it is missing or stale.

    A cache built with skip_bad_images=True does not hide its bad files from a load without the flag.
    """
    cached, built = open_cache(cache_dir, prefix, source_fingerprint, shape), False
    if cached is None:
        with build_lock(cache_dir, prefix, what):
            cached = open_cache(cache_dir, prefix, source_fingerprint, shape)  # built while we waited?
            if cached is None:
                build_cache(cache_dir, prefix, paths, labels, source_fingerprint, decode, shape,
                            workers=workers or default_workers(), skip_bad_images=skip_bad_images,
                            progress=progress, what=what)
                cached, built = open_cache(cache_dir, prefix, source_fingerprint, shape), True
                if cached is None:
                    raise DatasetError(f"the cache just written in {cache_dir} does not read back; "
                                       "is the disk full?")
    manifest, images, labels = cached
    skipped = list(manifest.get("skipped", []))
    if skipped and not skip_bad_images:
        raise DatasetError(
            f"{skipped[0]} ({unreadable(len(skipped))} in {what}). Fix or remove the files, or "
            f"{SKIP_HINT}"
        )
    if skipped and not built:  # the build said so; a run that reuses the cache says it again
        print(f"{what}: the cache leaves out {unreadable(len(skipped))} (skip_bad_images): "
              f"{listed(skipped, cache_paths(cache_dir, prefix)['manifest'])}", file=sys.stderr)
    return images, labels, skipped, built
