"""evaluate.py --augment N (vit/augment_figure.py): the picture of a run's first batch, stored and
as its first step trained on it, shows what the step really got (the batch, its key, its
augmentation), and the command writes it for a colour image folder and refuses another one."""

import jax
import numpy as np
import pytest

import evaluate
import train
from vit import augment_figure, explain, parallel
from vit import step as step_module
from vit.augment_figure import first_batch, first_step_inputs, shown_pixels, target_title
from vit.data import load_dataset
from vit.data.fake import write_fake_image_folder
from step_spy import after_each_step
from test_explain import run_quietly

# every augmentation on, and repeated augmentation's order (digits: 8x8 images)
DIGITS = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1", "--set", "model.d_model=16",
          "--set", "model.mlp_dim=32", "--batch-size", "96", "--epochs", "1", "--seed", "3",
          "--set", "train.crop_pad=1", "--set", "train.flip=true", "--set", "train.random_erase=0.5",
          "--set", "train.rand_augment_ops=2",
          "--set", "train.mixup_alpha=0.4", "--set", "train.cutmix_alpha=1.0",
          "--set", "train.label_smoothing=0.1", "--set", "train.repeat_augment=2"]


def test_the_figure_shows_what_the_first_step_trained_on(monkeypatch, tmp_path):
    inputs, steps = [], []  # what training_inputs gave each step; what each step was given
    training_inputs = step_module.training_inputs

    def recording(*args, **kwargs):
        x, targets = training_inputs(*args, **kwargs)
        jax.debug.callback(lambda x, t: inputs.append((np.asarray(x), np.asarray(t))), x, targets)
        return x, targets
    monkeypatch.setattr(step_module, "training_inputs", recording)
    after_each_step(monkeypatch, parallel, "make_parallel_train_step",
                    lambda params, opt, x, y, key: steps.append((np.asarray(x), np.asarray(y), key)))
    assert train.main([*DIGITS, "--out", str(tmp_path / "run")]) == 0
    monkeypatch.undo()
    assert len(inputs) == len(steps) == 1437 // 96

    run = explain.load_run(tmp_path / "run")
    rows, images, labels = first_batch(run, load_dataset("digits", None, "train"))
    np.testing.assert_array_equal(images, steps[0][0])  # the first batch, in its order
    np.testing.assert_array_equal(labels, steps[0][1])
    assert (images[0::2] == images[1::2]).all() and not (images[:-2:2] == images[2::2]).all()
    x, targets = first_step_inputs(run, images, labels)
    # the same draws (another key or order would differ by whole pixels and labels); under the
    # step's larger jit XLA may round the normalisation otherwise
    np.testing.assert_allclose(x, inputs[0][0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(targets, inputs[0][1], rtol=0, atol=1e-6)
    assert not np.allclose(x, inputs[1][0], atol=0.1)  # (the second step's differ)
    k_aug = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))[0]
    np.testing.assert_array_equal(jax.random.key_data(jax.random.split(steps[0][2])[0]),
                                  jax.random.key_data(k_aug))


def test_a_title_names_the_classes_a_target_mixes_not_the_smoothing():
    names = ["cat", "dog", "fish", "owl"]
    assert target_title(np.array([0.925, 0.025, 0.025, 0.025]), names) == "0.93 cat"
    assert target_title(np.array([0.025, 0.625, 0.025, 0.325]), names) == "0.62 dog\n0.33 owl"
    assert target_title(np.array([0.0, 0.0, 1.0, 0.0]), names) == "1.00 fish"
    assert target_title(np.array([0.25, 0.25, 0.25, 0.25]), names) == "0.25 cat"  # nothing stands out
    # a partner's weight under 1/K, and of 3 classes (smoothing 0.1) two mixed: the smoothed
    # floor is the smallest weight, not the mean or the median
    assert target_title(np.array([0.85, 0.15, 0.0, 0.0]), names) == "0.85 cat\n0.15 dog"
    assert target_title(np.array([0.7, 0.2667, 0.0333]), names[:3]) == "0.70 cat\n0.27 dog"


def test_the_trained_images_are_shown_in_the_stored_images_pixels():
    """shown_pixels undoes normalize (x·std + mean: the stored pixels / 255, per channel) and
    clips what erasing's noise put outside 0..1."""
    from vit.data.loader import normalize

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.35)
    stored = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    x = np.asarray(normalize(stored, mean, std))
    np.testing.assert_allclose(shown_pixels(x, mean, std), stored / 255.0, rtol=0, atol=1e-6)
    noise = np.concatenate([np.full((1, 4, 5, 3), -9.0), np.full((1, 4, 5, 3), 9.0)])
    np.testing.assert_array_equal(shown_pixels(noise, mean, std), [np.zeros((4, 5, 3)), np.ones((4, 5, 3))])


@pytest.mark.parametrize("channels", [1, 3])
def test_each_pair_shows_its_own_images_and_titles(monkeypatch, tmp_path, channels):
    """plot_augmented's pair i: stored image i titled with its label, beside trained image i
    titled with target i's classes (a grey image on 0..255 stored, 0..1 trained)."""
    figures = []
    monkeypatch.setattr(explain, "save_png", lambda fig, path, dpi: figures.append(fig))
    rng = np.random.default_rng(1)
    n, names = 6, ["cat", "dog", "fish", "owl"]
    stored = rng.integers(0, 256, (n, 4, 5, channels), dtype=np.uint8)
    trained = rng.random((n, 4, 5, channels))
    labels = np.array([0, 1, 2, 3, 0, 1])
    targets = np.eye(4)[[1, 2, 3, 0, 2, 0]] * 0.6 + np.eye(4)[labels] * 0.3 + 0.025
    augment_figure.plot_augmented(stored, trained, labels, targets, names, tmp_path / "a.png", "t")
    axes = figures[0].axes
    cols = 2 * explain.SALIENCY_PAIRS_PER_ROW
    for i in range(n):
        r, c = divmod(i, explain.SALIENCY_PAIRS_PER_ROW)
        ax_stored, ax_trained = axes[r * cols + 2 * c], axes[r * cols + 2 * c + 1]
        assert ax_stored.get_title() == f"stored\n{names[labels[i]]}"
        assert ax_trained.get_title() == target_title(targets[i], names)
        shown = [np.asarray(ax.images[0].get_array()) for ax in (ax_stored, ax_trained)]
        np.testing.assert_array_equal(shown[0], stored[i].squeeze(-1) if channels == 1 else stored[i])
        np.testing.assert_array_equal(shown[1], trained[i].squeeze(-1) if channels == 1 else trained[i])
        if channels == 1:
            assert ax_stored.images[0].get_clim() == (0, 255)
            assert ax_trained.images[0].get_clim() == (0, 1)
    explain.pyplot().close(figures[0])


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("augment")
    root = write_fake_image_folder(base / "folder")
    run = base / "run"
    code, out = run_quietly(train.main, [
        "--data-dir", root, "--out", run, "--set", "data.image_size=16", "--set", "data.workers=1",
        "--set", "model.patch_size=8", "--set", "model.d_model=16", "--set", "model.heads=2",
        "--set", "model.layers=1", "--set", "model.mlp_dim=32", "--batch-size", 8, "--epochs", 1,
        "--set", "train.mixup_alpha=0.8", "--set", "train.label_smoothing=0.1", "--no-progress"])
    assert code == 0, out
    return root, run


def test_evaluate_writes_the_figure_and_its_arrays(colour_run):
    root, run = colour_run
    code, out = run_quietly(evaluate.main, [run, "--augment", 50, "--no-progress"])
    assert code == 0, out
    assert f"augmentation: {run / 'augment.png'} (the first 8 images of the first batch)" in out, out
    assert (run / "augment.png").stat().st_size > 0
    with np.load(run / "augment.npz") as data:
        assert data["images"].shape == (8, 16, 16, 3) and data["images"].dtype == np.uint8
        assert data["x"].shape == (8, 16, 16, 3) and data["targets"].shape == (8, 3)
        np.testing.assert_allclose(data["targets"].sum(axis=1), 1.0, rtol=1e-6)
        assert (data["targets"] < 0.9).any()  # mixup: mixed targets
        # the stored images are the first batch's rows of the folder's training set
        train_set = load_dataset("image-folder", root, "train", image_size=16, workers=1)
        np.testing.assert_array_equal(data["images"], train_set.images[data["rows"]])


def test_fewer_images_than_the_batch_are_its_first_in_every_array(colour_run):
    _, run = colour_run
    code, out = run_quietly(evaluate.main, [run, "--augment", 3, "--no-progress"])
    assert code == 0 and "(the first 3 images of the first batch)" in out, out
    with np.load(run / "augment.npz") as data:
        assert {k: len(data[k]) for k in data.files} == dict.fromkeys(
            ["rows", "images", "labels", "x", "targets"], 3)


def test_a_data_dir_with_other_training_images_is_refused(colour_run, tmp_path, capsys):
    _, run = colour_run
    other = write_fake_image_folder(tmp_path / "other", train_per_class=8)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(run), "--augment", "4", "--data-dir", str(other), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--augment: {other} holds 24 training images, and the run in {run} was trained on 21" in err, err
