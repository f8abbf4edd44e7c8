"""Own images that went wrong quietly: a colour channel that is the same in every training image
(green-only microscopy: std 0, so every input was nan at step 1 and the message blamed the
learning rate), float TIFFs (read as black), 32-bit integers (clipped), images over Pillow's
decompression-bomb limit (refused as an attack), one class folder (100% accuracy from step 1),
names that are not UTF-8 (a traceback), a training set that changed under a --resume (a traceback
when it shrank, other batches without a word when it grew), and the download hint given to a
folder that is not Tiny ImageNet."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

import train
from vit import checkpoint
from vit.curves import plot_curves
from vit.data import DatasetError, load_dataset
from vit.data.cache import BadImage
from vit.data.image_folder import load_image, load_image_folder
from vit.data.loader import FLAT_STD, usable_std

SMALL = ["--set", "data.image_size=8", "--set", "model.patch_size=4", "--set", "model.d_model=16",
         "--set", "model.heads=2", "--set", "model.layers=1", "--set", "model.mlp_dim=32",
         "--batch-size", "4", "--no-progress", "--set", "data.workers=1"]


def green_only_folder(root, train_per_class=4):
    """Two classes of 12x12 images with only their green channel used (red and blue 0)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", 2)):
        for c, (name, offset) in enumerate((("dim", 0), ("bright", 120))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.zeros((12, 12, 3), np.uint8)
                pixels[..., 1] = offset + rng.integers(0, 100, (12, 12))
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_flat_channel_is_normalised_with_std_1_and_named(capsys):
    std = usable_std(np.array([0.0, 0.2, FLAT_STD / 2], np.float32))
    np.testing.assert_array_equal(std, np.array([1.0, 0.2, 1.0], np.float32))
    assert "note: channel 0 (red), 2 (blue) are the same in every training image, or nearly (std 0, " \
           "0.002, under one grey level): normalised with std 1 instead" in capsys.readouterr().err
    np.testing.assert_array_equal(usable_std(np.array([0.3, FLAT_STD])), np.array([0.3, FLAT_STD], np.float32))
    assert capsys.readouterr().err == ""


def test_green_only_images_train_and_a_changed_training_set_is_refused_on_resume(tmp_path, capsys,
                                                                                  monkeypatch):
    from matplotlib.figure import Figure

    data, run, figures, save = green_only_folder(tmp_path / "gfp"), tmp_path / "run", [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    assert train.main([*SMALL, "--data-dir", str(data), "--epochs", "2", "--stop-after-epoch", "1",
                       "--out", str(run)]) == 130
    out, err = capsys.readouterr()
    assert "note: channel 0 (red), 2 (blue) are the same in every training image" in err, err
    assert "% top-2 100.00% |" in out, out  # of 2 classes: "top-5" said more than it measured
    (accuracy, *_), = [fig.axes for fig in figures]  # curves.png's legend says the same
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["train", "val top-1", "val top-2"]
    meta = checkpoint.read_meta(run / "last.npz")
    assert np.isfinite(meta["history"][0]["train_loss"]) and meta["std"][0] == 1.0, meta["history"]
    assert meta["train_images"] == 8
    for n in (5, 7):  # more images (other batches, silently, before); fewer: the test below
        green_only_folder(data, train_per_class=n)
        with pytest.raises(SystemExit) as e:
            train.main(["--resume", str(run), "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert f"{data} (data.data_dir) holds {2 * n} training images, and the run in {run} was trained " \
               "on 8: its position (the end of epoch 1) would mean other batches" in err, err


def tif(path, values):
    Image.fromarray(values).save(path)
    return path


def test_float_images_are_read_in_0_to_1_or_0_to_255(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    unit = load_image(tif(tmp_path / "unit.tif", ramp), 8)
    np.testing.assert_array_equal(unit[..., 0], np.rint(ramp * 255).astype(np.uint8))  # was all 0
    byte = load_image(tif(tmp_path / "byte.tif", ramp * 200), 8)
    np.testing.assert_array_equal(byte[..., 0], np.rint(ramp * 200).astype(np.uint8))
    with pytest.raises(BadImage, match=r"odd.tif: .*float pixels from -1 to 2; float images are read in 0..1 or 0..255"):
        load_image(tif(tmp_path / "odd.tif", ramp * 3 - 1), 8)


def test_integers_past_16_bits_are_refused_not_clipped(tmp_path):
    wide = (np.arange(64, dtype=np.int32) * 1000).reshape(8, 8)
    with pytest.raises(BadImage, match=r"wide.tif: .*integer pixels from 0 to 126000; images deeper than 8 bits are read in 0..65535"):
        load_image(tif(tmp_path / "wide.tif", wide * 2), 8)
    np.testing.assert_array_equal(load_image(tif(tmp_path / "ok.tif", wide), 8)[..., 0], (wide >> 8).astype(np.uint8))


def test_large_images_are_not_refused_as_decompression_bombs():
    assert Image.MAX_IMAGE_PIXELS is None  # Pillow's default refuses 179 M pixels, warns over 89 M


def test_one_class_folder_is_an_error(tmp_path):
    root = green_only_folder(tmp_path / "one")
    for split in ("train", "val"):
        os.rename(root / split / "dim", tmp_path / f"gone-{split}")
    with pytest.raises(DatasetError, match=r"train holds one class folder \('bright'\), and a classifier needs "
                                           "two or more"):
        load_image_folder(root, "train", image_size=8, workers=1, progress=False)


def test_names_that_are_not_utf8_are_read_and_printable(tmp_path):
    """A zip made on Windows, unpacked here: Latin-1 bytes in a class and a file name."""
    root = green_only_folder(tmp_path / "latin")
    for split in ("train", "val"):
        folder = os.path.join(os.fsencode(root / split), b"chat_\xe9")
        os.rename(os.fsencode(root / split / "dim"), folder)
        os.rename(os.path.join(folder, b"0.png"), os.path.join(folder, b"caf\xe9.png"))
    data = load_image_folder(root, "train", image_size=8, workers=1, progress=False)
    assert data.class_names == ["bright", "chat_\\xe9"] and len(data.labels) == 8
    "".join(data.class_names).encode("utf-8")  # strict: they print and draw


@pytest.mark.parametrize("image_size", [None, 16])
def test_a_missing_folder_gets_the_download_hint_only_without_an_image_size(tmp_path, image_size):
    with pytest.raises(DatasetError) as e:
        load_dataset("tiny-imagenet", tmp_path / "nowhere", "train", image_size=image_size)
    assert ("python -m vit.data download" in str(e.value)) == (image_size is None), e.value


def test_curves_of_zero_gradients_draw_without_a_warning(tmp_path):
    """One class (or a dead model) gives gradient norms of 0: no log scale, no UserWarning."""
    record = {"epoch": 1, "train_loss": 0.0, "train_accuracy": 1.0, "val_loss": 0.0, "val_top1": 1.0,
              "val_top5": 1.0, "grad_norm": 0.0, "grad_norm_max": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves([record, {**record, "epoch": 2}], tmp_path / "curves.png", 0.0)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_images_skipped_are_named_with_where_the_list_of_all_is(tmp_path, capsys):
    """Only the first was named ("e.g."); the others sat in the manifest, which nothing named."""
    root = green_only_folder(tmp_path / "bad")
    broken = [root / "train" / "dim" / f"broken{i}.png" for i in range(4)]
    for path in broken:
        path.write_bytes(b"\x89PNG nope")
    load_image_folder(root, "train", image_size=8, workers=1, progress=False, skip_bad_images=True)
    err = capsys.readouterr().err
    manifest = root / "vitfuse-cache" / "train_8px_manifest.json"
    assert f"skipped 4 unreadable images: {broken[0]}: cannot decode" in err, err
    assert f"; {broken[2]}: cannot decode" in err and str(broken[3]) not in err, err
    assert f"; and 1 more (all listed in {manifest}, under \"skipped\")" in err, err


def test_a_val_class_spelled_in_another_unicode_form_is_the_same_class(tmp_path):
    """train/ copied from macOS spells café as cafe + a combining accent (NFD), val/ as é (NFC):
    it was "val/café is a class that is not in train", though train/ showed café."""
    import unicodedata

    root = green_only_folder(tmp_path / "nfd")
    for split, form in (("train", "NFD"), ("val", "NFC")):
        os.rename(root / split / "dim", root / split / unicodedata.normalize(form, "café"))
    val = load_image_folder(root, "val", image_size=8, workers=1, progress=False)
    assert val.class_names == ["bright", unicodedata.normalize("NFD", "café")]
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1]


def test_a_training_set_with_fewer_images_is_refused_on_resume(tmp_path, capsys):
    """The other direction from more images: 6 found for a run trained on 8 (the old resume
    ended in a traceback). green_only_folder only adds files, so this one removes them."""
    data, run = green_only_folder(tmp_path / "gfp"), tmp_path / "run"
    assert train.main([*SMALL, "--data-dir", str(data), "--epochs", "2", "--stop-after-epoch", "1",
                       "--out", str(run)]) == 130
    capsys.readouterr()
    for name in ("dim", "bright"):
        (data / "train" / name / "3.png").unlink()
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert f"{data} (data.data_dir) holds 6 training images, and the run in {run} was trained " \
           "on 8: its position (the end of epoch 1) would mean other batches" in err, err


def test_a_float_image_with_nan_is_refused_not_read_as_black(tmp_path):
    """nan pixels compare false with both bounds: without the isfinite check they became 0."""
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    ramp[0, 0] = np.nan
    with pytest.raises(BadImage, match=r"nan.tif: .*1 float pixel is NaN or infinite; float images are "
                                       r"read in 0..1 or 0..255"):
        load_image(tif(tmp_path / "nan.tif", ramp), 8)
    ramp[0, 0], ramp[0, 1], ramp[0, 2] = 0.5, np.inf, -np.inf  # named as such, not "from -inf to inf"
    with pytest.raises(BadImage, match=r"inf.tif: .*2 float pixels are NaN or infinite; float images "):
        load_image(tif(tmp_path / "inf.tif", ramp), 8)


def test_a_big_endian_16_bit_tiff_keeps_its_top_8_bits(tmp_path):
    """Pillow opens a big-endian 16-bit TIFF as mode "I;16B" (not "I;16"): the same top 8 bits."""
    wide = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    path = tif(tmp_path / "big.tif", wide.astype(">u2"))
    assert Image.open(path).mode == "I;16B"
    np.testing.assert_array_equal(load_image(path, 8)[..., 0], (wide >> 8).astype(np.uint8))


def test_a_checkpoint_saved_before_train_images_was_kept_resumes_unchecked(tmp_path):
    """A last.npz from before the count was saved has no train_images: its run resumes (as the
    docstring promises), where a run that saved the count is held to it."""
    from types import SimpleNamespace

    from vit import training

    found = SimpleNamespace(class_names=["a", "b"], labels=np.zeros(6, np.int32))
    old = {"epoch": 1, "step_in_epoch": 0, "class_names": ["a", "b"]}
    training.check_same_data(old, found, "data", tmp_path)
    with pytest.raises(training.RunError, match="data holds 6 training images, and the run in .* was "
                                                "trained on 8"):
        training.check_same_data({**old, "train_images": 8}, found, "data", tmp_path)
