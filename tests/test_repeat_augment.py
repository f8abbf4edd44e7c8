"""Repeated augmentation (train.repeat_augment, DeiT's 3) in a run: the training steps get each
image repeat_augment times in a row, and the run still covers an epoch's worth of rows. The
order itself: test_data_loader.py; exact resume with it on: test_train.py's RANDOM runs; a
change on --resume refused: test_train_faults.py."""

import numpy as np

import train
from vit import parallel
from step_spy import after_each_step

QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1", "--set", "model.d_model=16",
         "--set", "model.mlp_dim=32", "--batch-size", "120", "--epochs", "1"]


def rows_trained_on(monkeypatch, tmp_path, *flags):
    """Every (image, label) row the run's training steps were given, in order."""
    images, labels = [], []

    def record(params, opt_state, x, y, key):
        images.append(np.asarray(x))
        labels.append(np.asarray(y))
    after_each_step(monkeypatch, parallel, "make_parallel_train_step", record)
    assert train.main([*QUICK, "--out", str(tmp_path / "run"), *flags]) == 0
    return np.concatenate(images), np.concatenate(labels)


def test_a_run_trains_on_each_image_repeat_augment_times_in_a_row(monkeypatch, tmp_path):
    once, once_labels = rows_trained_on(monkeypatch, tmp_path / "once")
    images, labels = rows_trained_on(monkeypatch, tmp_path / "three", "--set", "train.repeat_augment=3")
    assert images.shape == once.shape == (1437 // 120 * 120, 8, 8, 1)  # as many rows per epoch
    runs = images.reshape(-1, 3, 8 * 8)  # 1320 rows: 440 runs of 3
    assert (runs == runs[:, :1]).all()  # each run of 3 is one image ...
    assert (labels.reshape(-1, 3) == labels.reshape(-1, 3)[:, :1]).all()
    firsts = runs[:, 0]
    assert len(np.unique(firsts, axis=0)) >= 0.95 * len(firsts)  # ... of 440 (nearly all distinct)
    # without it, neighbours are other images (digits has a few duplicates: not all distinct)
    pairs = once.reshape(-1, 2, 8 * 8)
    assert (pairs[:, 0] != pairs[:, 1]).any(axis=1).mean() > 0.95
    # the repeated run visits the images of the same seeded order's beginning
    np.testing.assert_array_equal(firsts, once.reshape(-1, 8 * 8)[: len(firsts)])
