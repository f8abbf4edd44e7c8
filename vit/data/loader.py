"""Batches on the device, with no per-image Python in the loop.

The uint8 images go to the device once (`jax.device_put`) when images + labels fit in
`device_budget_bytes`; each batch is then a jitted gather `images[indices]` on the device. A larger set
(a memmap bigger than the budget) is streamed: a background thread gathers the rows of the next few batches
from the memmap (sorted, for locality) and puts them on the device while the current ones are used.
Both paths yield the same batches.

Order: epoch e visits `np.random.default_rng([seed, e]).permutation(n)`, a pure function of (seed, epoch), and
batch s is rows s*B..(s+1)*B of it (with `repeats=r`, repeated augmentation: the permutation's first
ceil(n / r) images, each r times in a row, n rows in all); so `epoch(e, start_step=s)` after a restart yields exactly the batches that
an uninterrupted run would have yielded from step s on.

Normalization uses the training set's per-channel mean and std (`channel_stats`, one exact pass over the
uint8 values), applied on the device by `normalize`, inside the jitted train/eval step.

    mean, std = channel_stats(train.images)
    batches = Batcher(train.images, train.labels, 256, seed=0)
    for x_u8, y in batches.epoch(epoch, start_step):     # (B, H, W, C) uint8, (B,) int32, on the device
        x = normalize(x_u8, mean, std)                      # or vit.data.augment.train_augment(...)
    for x_u8, y, valid in Batcher(val.images, val.labels, 512, seed=0, shuffle=False).eval_batches():
        ...  # the last batch is padded; count only rows where valid is True
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DEVICE_BUDGET_BYTES = 2 << 30  # Tiny ImageNet train (1.2 GB) fits; a 80 GB GPU has room to spare
STREAM_CHUNK_BYTES = 64 << 20  # host->device transfer size when streaming from the memmap


def channel_stats(images: np.ndarray, chunk_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32 (C,), in 0..1 units) of uint8 images (N, H, W, C).

    One chunked pass (fine for a memmap): a histogram of the 256 values per channel gives the mean and the
    variance exactly, with no float accumulation error. Compute it once on the training set and keep it.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise TypeError(f"channel_stats expects uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    channels = images.shape[-1]
    histogram = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, images.shape[0], chunk_size):
        chunk = np.asarray(images[start : start + chunk_size])
        for c in range(channels):
            histogram[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    count = histogram.sum(axis=1)
    if not count.all():
        raise ValueError("channel_stats of an empty image set")
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = histogram @ values / count
    variance = np.maximum(histogram @ values**2 / count - mean**2, 0.0)
    return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


FLAT_STD = 1 / 255  # a channel's spread below one grey level: the same (or nearly) in every image


def usable_std(std: np.ndarray) -> np.ndarray:
    """std with a flat channel's (std < FLAT_STD: the same value, or nearly, in every training
    image, such as the empty red and blue of green-only microscopy) set to 1, with a note naming
    it: dividing by its ~0 std would make every input nan (0 / 0) or huge."""
    std = np.asarray(std, np.float32)
    flat = [c for c in range(std.shape[0]) if std[c] < FLAT_STD]
    if flat:
        colour = dict(enumerate(("red", "green", "blue"))) if std.shape[0] == 3 else {}
        named = ", ".join(f"{c} ({colour[c]})" if c in colour else str(c) for c in flat)
        print(f"note: channel {named} {'is' if len(flat) == 1 else 'are'} the same in every "
              f"training image, or nearly (std {', '.join(f'{std[c]:.2g}' for c in flat)}, under "
              "one grey level): normalised with std 1 instead", file=sys.stderr)
    return np.where(std < FLAT_STD, np.float32(1.0), std)


def normalize(images: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., C) -> (x / 255 - mean) / std per channel, in dtype (float32; the saliency
    check's float64); jit-able. The one normalisation of training, evaluation and pictures."""
    x = jnp.asarray(images).astype(dtype) * (1.0 / 255.0)
    return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def epoch_order(n: int, seed: int, epoch: int, *, shuffle: bool = True, repeats: int = 1) -> np.ndarray:
    """The rows epoch `epoch` visits, in order: a seeded permutation of 0..n-1 (0..n-1 itself
    without shuffle); with repeats r, its first ceil(n / r) entries each r times in a row, cut to
    n (repeats=1 draws the same order). Batch s is rows s*B..(s+1)*B of it."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    else:
        order = np.arange(n, dtype=np.int32)
    if repeats == 1:
        return order
    return np.repeat(order[: -(-n // repeats)], repeats)[:n]


@jax.jit
def _gather(images: jax.Array, labels: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.take(images, indices, axis=0), jnp.take(labels, indices, axis=0)


class Batcher:
    """Batches of (uint8 images, int32 labels) on the device, in a seeded order per epoch.

    images: (N, H, W, C) array or memmap; labels: (N,) ints.
    shuffle=False visits 0..N-1 in order. drop_last=False keeps a smaller last batch (one extra compile of
    whatever consumes it); eval_batches() instead pads it to the full size with a validity mask.
    device_budget_bytes: put everything on the device if images + labels fit, else stream from the host.
    rows: keep only these rows of every (global) batch, e.g. this process's share in a multi-process
    run (vit.parallel.process_batch_slice); the order, the batches and their count are the global
    ones, and only the kept rows are gathered.
    repeats: repeated augmentation (Hoffer et al. 2020; DeiT trains with 3): an epoch is as long as
    before, but visits ceil(N / repeats) images of its permutation, each `repeats` times in a row,
    so each copy is augmented apart (the step draws per image) and most share a batch. This is
    timm/DeiT's RASampler on one replica: it repeats the whole permutation and keeps the first N.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        device_budget_bytes: int = DEFAULT_DEVICE_BUDGET_BYTES,
        device: jax.Device | None = None,
        rows: slice | None = None,
        repeats: int = 1,
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's generator), got {seed}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        self.n = len(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.repeats = repeats
        self.drop_last = drop_last
        self.device = device
        if rows is not None and (rows.step not in (None, 1) or rows.start is None or rows.stop is None
                                 or not 0 <= rows.start < rows.stop <= batch_size):
            raise ValueError(f"rows must be a slice a:b with 0 <= a < b <= batch_size {batch_size}, got {rows}")
        self.rows = rows or slice(0, batch_size)
        labels = np.asarray(labels, dtype=np.int32)
        self.on_device = images.nbytes + labels.nbytes <= device_budget_bytes
        if self.on_device:
            self._images = jax.device_put(np.asarray(images), device)
            self._labels = jax.device_put(labels, device)
        else:
            self._images = images  # stays on the host (a memmap stays on disk)
            self._labels = labels
        row_bytes = max(1, images.nbytes // max(1, self.n))
        self._stream_rows = batch_size * max(1, STREAM_CHUNK_BYTES // (batch_size * row_bytes))

    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch` (epoch_order): a function of (seed, epoch) only."""
        return epoch_order(self.n, self.seed, epoch, shuffle=self.shuffle, repeats=self.repeats)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Yield (images uint8 (B, H, W, C), labels int32 (B,)) on the device for steps start_step.. of epoch."""
        steps = self.steps_per_epoch()
        if steps == 0 and self.n:
            raise ValueError(f"batch_size {self.batch_size} > {self.n} examples with drop_last=True: no batches")
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} outside 0..{steps}")
        order = self.permutation(epoch)[start_step * self.batch_size : steps * self.batch_size]
        yield from self._batches(order)

    def eval_batches(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """Every example once, in order, in full-size batches: (images, labels, valid bool (B,)).

        The last batch is padded with copies of example 0 marked valid=False, so a jitted eval step sees one
        shape; sum only the valid rows.
        """
        padded = math.ceil(self.n / self.batch_size) * self.batch_size
        order = np.zeros(padded, dtype=np.int32)
        order[: self.n] = np.arange(self.n, dtype=np.int32)
        valid = np.arange(padded) < self.n
        for k, (images, labels) in enumerate(self._batches(order)):
            batch_valid = valid[k * self.batch_size : (k + 1) * self.batch_size][self.rows]
            yield images, labels, jax.device_put(batch_valid, self.device)

    def _batches(self, order: np.ndarray) -> Iterator[tuple[jax.Array, jax.Array]]:
        """Device batches of consecutive batch_size slices of order (the last may be shorter),
        each cut to self.rows."""
        b = self.batch_size
        if self.rows != slice(0, b):
            order = np.concatenate([order[start : start + b][self.rows] for start in range(0, len(order), b)]
                                   or [order[:0]])
            b = self.rows.stop - self.rows.start
        if self.on_device:
            for start in range(0, len(order), b):
                indices = jax.device_put(order[start : start + b], self.device)
                yield _gather(self._images, self._labels, indices)
            return
        # Streaming: gather the next chunk of rows in a thread while the current one is consumed.
        chunk = b * (self._stream_rows // self.batch_size)  # whole (cut) batches per chunk
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = prefetch.submit(self._host_gather, order[:chunk]) if len(order) else None
            for chunk_start in range(0, len(order), chunk):
                images, labels = pending.result()
                following = order[chunk_start + chunk : chunk_start + 2 * chunk]
                pending = prefetch.submit(self._host_gather, following) if len(following) else None
                for start in range(0, len(labels), b):
                    yield images[start : start + b], labels[start : start + b]

    def _host_gather(self, indices: np.ndarray) -> tuple[jax.Array, jax.Array]:
        # Read the rows in file order (a sequential-ish sweep of the memmap), then put them back in batch order.
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices), *self._images.shape[1:]), dtype=self._images.dtype)
        rows[order] = self._images[indices[order]]
        return jax.device_put(rows, self.device), jax.device_put(self._labels[indices], self.device)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, **batcher_options):
    """Shortcut for Batcher(images, labels, batch_size, seed=0, shuffle=False, drop_last=False).eval_batches().

    Build the Batcher once and reuse it if you evaluate repeatedly: it puts the data on the device once.
    """
    batcher = Batcher(images, labels, batch_size, seed=0, shuffle=False, drop_last=False, **batcher_options)
    return batcher.eval_batches()
