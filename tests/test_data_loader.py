"""Digits dataset, channel statistics, normalization and the device Batcher (order, resume, coverage, streaming)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from vit.data import load_dataset
from vit.data import loader
from vit.data.loader import Batcher, channel_stats, eval_batches, normalize

# --- digits ------------------------------------------------------------------------------------------------------


def test_digits_splits_shapes_and_values():
    train = load_dataset("digits", None, "train")
    val = load_dataset("digits", None, "val")
    assert train.images.shape == (1437, 8, 8, 1) and val.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
    assert train.images.max() == 255 and train.images.min() == 0
    assert train.class_names == [str(d) for d in range(10)] and train.name == "digits"
    # Stratified: every class in both splits, in about the same proportion.
    assert set(np.unique(val.labels)) == set(range(10))
    assert np.abs(np.bincount(val.labels) / len(val) - np.bincount(train.labels) / len(train)).max() < 0.01


def test_digits_split_is_fixed_disjoint_and_complete():
    reference = load_digits()
    expected = np.rint(reference.images * 255 / 16).astype(np.uint8)
    train, val = load_dataset("digits", None, "train"), load_dataset("digits", None, "val")
    again = load_dataset("digits", "ignored", "train")
    np.testing.assert_array_equal(train.images, again.images)
    # Each image of the two splits is one of sklearn's, with its label; together they are all of them.
    flat = {img.tobytes(): label for img, label in zip(expected, reference.target)}
    seen = [img.tobytes() for img in np.concatenate([train.images, val.images])[..., 0]]
    assert len(seen) == len(expected)
    labels = np.concatenate([train.labels, val.labels])
    assert all(flat[key] == label for key, label in zip(seen, labels))
    assert sorted(seen) == sorted(img.tobytes() for img in expected)


# --- statistics and normalization --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 5, 7, 3), (10, 8, 8, 1)], ids=["rgb-odd-sizes", "gray"])
def test_channel_stats_match_numpy(shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    images[..., 0] //= 3  # channels with different statistics
    mean, std = channel_stats(images, chunk_size=4)  # chunks do not divide N: the remainder is counted
    x = images.astype(np.float64) / 255
    assert mean.dtype == np.float32 and mean.shape == (shape[-1],)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-6)


def test_channel_stats_reads_a_memmap(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    for a, b in zip(channel_stats(mapped, chunk_size=7), channel_stats(images)):
        np.testing.assert_array_equal(a, b)


def test_channel_stats_refuses_what_it_cannot_count():
    """An empty set has no mean (not NaN statistics); images must be uint8 (N, H, W, C)."""
    with pytest.raises(ValueError, match="empty image set"):
        channel_stats(np.zeros((0, 4, 4, 3), np.uint8))
    images = np.random.default_rng(3).integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    for bad in (images.astype(np.uint16), images.astype(np.float32) / 255, images[0]):
        with pytest.raises(TypeError, match="uint8 \\(N, H, W, C\\)"):
            channel_stats(bad)


def test_normalize_is_per_channel_and_jits():
    images = np.random.default_rng(2).integers(0, 256, size=(4, 3, 3, 3), dtype=np.uint8)
    mean = np.array([0.4, 0.5, 0.6], np.float32)
    std = np.array([0.2, 0.25, 0.3], np.float32)
    out = jax.jit(normalize)(jnp.asarray(images), mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(np.asarray(out), (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


# --- Batcher -----------------------------------------------------------------------------------------------------

N, B = 103, 16  # N prime: the last batch is partial


def numbered_images(n):
    """Image i carries its own index: channel 0 = i % 256, channel 1 = i // 256."""
    images = np.zeros((n, 4, 4, 2), np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    return images


def ids_of(images):
    images = np.asarray(images)
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def collect(batches):
    return [(ids_of(x), np.asarray(y)) for x, y in batches]


@pytest.fixture
def streamed(monkeypatch):
    """Batcher options that force streaming from the host, three batches per transfer (so several chunks)."""
    monkeypatch.setattr(loader, "STREAM_CHUNK_BYTES", 3 * B * 4 * 4 * 2)
    return {"device_budget_bytes": 0}


def test_permutation_depends_only_on_seed_and_epoch():
    a = Batcher(numbered_images(N), np.arange(N), B, seed=7)
    b = Batcher(np.zeros((N, 2, 2, 1), np.uint8), np.zeros(N), 8, seed=7)  # other data, same seed and n
    np.testing.assert_array_equal(a.permutation(3), b.permutation(3))
    np.testing.assert_array_equal(a.permutation(3), np.random.default_rng([7, 3]).permutation(N))
    assert not np.array_equal(a.permutation(3), a.permutation(4))
    assert not np.array_equal(a.permutation(3), Batcher(numbered_images(N), np.arange(N), B, seed=8).permutation(3))
    assert sorted(a.permutation(0)) == list(range(N))


@pytest.mark.parametrize("mode", ["on-device", "streamed"])
def test_epoch_yields_each_image_once_with_its_label(mode, request):
    options = request.getfixturevalue("streamed") if mode == "streamed" else {}
    labels = (np.arange(N) * 7 % 10).astype(np.int32)
    batcher = Batcher(numbered_images(N), labels, B, seed=0, **options)
    assert batcher.on_device == (mode == "on-device")
    assert batcher.steps_per_epoch() == N // B
    batches = list(batcher.epoch(2))
    assert len(batches) == N // B
    for x, y in batches:
        assert x.shape == (B, 4, 4, 2) and x.dtype == jnp.uint8 and y.dtype == jnp.int32
        assert isinstance(x, jax.Array)
    ids = np.concatenate([ids_of(x) for x, _ in batches])
    np.testing.assert_array_equal(ids, batcher.permutation(2)[: (N // B) * B])  # batch s = rows s*B.. of the order
    assert len(set(ids.tolist())) == len(ids)  # no image twice
    np.testing.assert_array_equal(np.concatenate([np.asarray(y) for _, y in batches]), labels[ids])


def test_device_budget_counts_images_and_labels():
    images, labels = numbered_images(N), np.arange(N, dtype=np.int32)
    both = images.nbytes + labels.nbytes
    assert Batcher(images, labels, B, seed=0, device_budget_bytes=both).on_device
    # room for the images alone is not enough: the labels go to the device too
    assert not Batcher(images, labels, B, seed=0, device_budget_bytes=both - 1).on_device
    assert not Batcher(images, labels, B, seed=0, device_budget_bytes=images.nbytes).on_device


def test_streamed_batches_equal_on_device_batches(tmp_path, streamed):
    np.save(tmp_path / "images.npy", numbered_images(N))
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    on_device = Batcher(mapped, np.arange(N), B, seed=3)
    from_disk = Batcher(mapped, np.arange(N), B, seed=3, **streamed)
    assert on_device.on_device and not from_disk.on_device
    for (xa, ya), (xb, yb) in zip(collect(on_device.epoch(1)), collect(from_disk.epoch(1)), strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("mode", ["on-device", "streamed"])
@pytest.mark.parametrize("start_step", [0, 1, 4, 6])
def test_resume_at_a_step_yields_the_same_remaining_batches(mode, start_step, request):
    options = request.getfixturevalue("streamed") if mode == "streamed" else {}
    full = collect(Batcher(numbered_images(N), np.arange(N), B, seed=11, **options).epoch(5))
    # A new Batcher, as after a restart: nothing carried over but (seed, epoch, step).
    resumed = collect(Batcher(numbered_images(N), np.arange(N), B, seed=11, **options).epoch(5, start_step=start_step))
    assert len(resumed) == len(full) - start_step
    for (xa, ya), (xb, yb) in zip(full[start_step:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_keep_last_partial_batch_covers_every_image():
    batcher = Batcher(numbered_images(N), np.arange(N), B, seed=0, drop_last=False)
    batches = collect(batcher.epoch(0))
    assert batcher.steps_per_epoch() == len(batches) == 7
    assert [len(ids) for ids, _ in batches] == [B] * 6 + [N - 6 * B]
    assert sorted(np.concatenate([ids for ids, _ in batches]).tolist()) == list(range(N))
    exact = Batcher(numbered_images(2 * B), np.arange(2 * B), B, seed=0, drop_last=False)
    assert exact.steps_per_epoch() == len(list(exact.epoch(0))) == 2  # no empty third batch


def test_streaming_moves_at_most_stream_chunk_bytes_per_transfer(streamed, monkeypatch):
    # the streamed fixture allows three batches per transfer
    batcher = Batcher(numbered_images(N), np.arange(N), B, seed=0, **streamed)
    sizes = []
    gather = batcher._host_gather
    monkeypatch.setattr(batcher, "_host_gather", lambda indices: sizes.append(len(indices)) or gather(indices))
    assert len(list(batcher.epoch(0))) == N // B == 6
    assert sizes == [3 * B, 3 * B]


@pytest.mark.parametrize("mode", ["on-device", "streamed"])
@pytest.mark.parametrize("n", [N, 2 * B, 5], ids=["partial-last", "exact", "smaller-than-batch"])
def test_eval_batches_count_every_image_exactly_once(mode, n, request):
    options = request.getfixturevalue("streamed") if mode == "streamed" else {}
    labels = (np.arange(n) % 10).astype(np.int32)
    seen_ids, seen_labels = [], []
    batches = list(eval_batches(numbered_images(n), labels, B, **options))
    assert len(batches) == -(-n // B)
    for x, y, valid in batches:
        assert x.shape == (B, 4, 4, 2) and y.shape == (B,) and valid.shape == (B,)  # one shape: one compile
        valid = np.asarray(valid)
        seen_ids += ids_of(x)[valid].tolist()
        seen_labels += np.asarray(y)[valid].tolist()
    assert seen_ids == list(range(n))
    assert seen_labels == labels.tolist()
    assert sum(int(np.asarray(v).sum()) for _, _, v in batches) == n


def test_batcher_rejects_what_would_silently_train_on_nothing():
    with pytest.raises(ValueError, match="drop_last"):
        next(Batcher(numbered_images(5), np.arange(5), B, seed=0).epoch(0))
    with pytest.raises(ValueError, match="labels"):
        Batcher(numbered_images(5), np.arange(4), 2, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        next(Batcher(numbered_images(N), np.arange(N), B, seed=0).epoch(0, start_step=7))
    for shuffle in (True, False):  # a negative epoch is a caller's bug, not an order
        with pytest.raises(ValueError, match="epoch must be >= 0"):
            next(Batcher(numbered_images(N), np.arange(N), B, seed=0, shuffle=shuffle).epoch(-1))
    for bad in (-1, -7):  # refused up front, even by a Batcher that never shuffles
        with pytest.raises(ValueError, match="seed must be >= 0"):
            Batcher(numbered_images(N), np.arange(N), B, seed=bad, shuffle=False)
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(numbered_images(N), np.arange(N), 0, seed=0)


@pytest.mark.parametrize("mode", ["on-device", "streamed"])
@pytest.mark.parametrize("rows", [slice(0, 8), slice(8, 16), slice(3, 6)])
def test_rows_keep_one_process_share_of_every_global_batch(mode, rows, request):
    """A process of a multi-process run gathers only its rows of each global batch (the same
    global order, the same number of steps), for training and for padded evaluation."""
    options = request.getfixturevalue("streamed") if mode == "streamed" else {}
    whole = Batcher(numbered_images(N), np.arange(N), B, seed=5, **options)
    share = Batcher(numbered_images(N), np.arange(N), B, seed=5, rows=rows, **options)
    assert share.steps_per_epoch() == whole.steps_per_epoch()
    full, part = collect(whole.epoch(2, start_step=1)), collect(share.epoch(2, start_step=1))
    assert len(part) == len(full)
    for (xa, ya), (xb, yb) in zip(full, part, strict=True):
        np.testing.assert_array_equal(xa[rows], xb)
        np.testing.assert_array_equal(ya[rows], yb)
    evals = Batcher(numbered_images(N), np.arange(N), B, seed=0, shuffle=False, drop_last=False,
                    rows=rows, **options)
    whole_eval = Batcher(numbered_images(N), np.arange(N), B, seed=0, shuffle=False, drop_last=False,
                         **options)
    for (xa, ya, va), (xb, yb, vb) in zip(whole_eval.eval_batches(), evals.eval_batches(), strict=True):
        np.testing.assert_array_equal(ids_of(xa)[rows], ids_of(xb))
        np.testing.assert_array_equal(np.asarray(va)[rows], np.asarray(vb))


def test_rows_must_be_a_plain_slice_inside_the_batch():
    for rows in (slice(0, 17), slice(4, 4), slice(0, 8, 2), slice(None, 8)):
        with pytest.raises(ValueError, match="rows must be a slice"):
            Batcher(numbered_images(N), np.arange(N), B, seed=0, rows=rows)


@pytest.mark.parametrize("repeats", [2, 3, 5])
def test_repeated_augmentation_visits_each_image_repeats_times_in_a_row(repeats):
    """repeats=r: an epoch of N rows made of the seeded permutation's first ceil(N / r) images,
    each r times in a row (DeiT's RASampler on one replica), still a function of (seed, epoch)."""
    once = Batcher(numbered_images(N), np.arange(N), B, seed=4)
    batcher = Batcher(numbered_images(N), np.arange(N), B, seed=4, repeats=repeats)
    order, perm = batcher.permutation(6), once.permutation(6)
    assert len(order) == N and batcher.steps_per_epoch() == once.steps_per_epoch()
    unique = -(-N // repeats)
    np.testing.assert_array_equal(order[::repeats], perm[:unique])  # the first of each run ...
    for k in range(1, repeats):  # ... and its copies right behind it (the last run cut at N)
        np.testing.assert_array_equal(order[k::repeats], perm[: len(order[k::repeats])])
    assert len(set(order.tolist())) == unique
    ids = np.concatenate([ids_of(x) for x, _ in batcher.epoch(6)])
    np.testing.assert_array_equal(ids, order[: (N // B) * B])
    resumed = np.concatenate([ids_of(x) for x, _ in batcher.epoch(6, start_step=3)])
    np.testing.assert_array_equal(resumed, order[3 * B : (N // B) * B])
    assert not np.array_equal(order, batcher.permutation(7))


def test_repeats_must_be_a_positive_integer():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="repeats must be a positive integer"):
            Batcher(numbered_images(N), np.arange(N), B, seed=0, repeats=bad)
