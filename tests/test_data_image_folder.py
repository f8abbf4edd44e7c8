"""Image-folder datasets (DIR/train/<class>/, DIR/val/<class>/): labels, the resize, the cache, layout
detection and every input error. The folders are written on the fly (vit.data.fake.write_fake_image_folder:
odd sizes, grayscale, palette, 16-bit, PNG with alpha, nested sub-folders, awkward class names)."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from vit.data import DatasetError, load_dataset, resolve_layout
from vit.data import __main__ as cli
from vit.data import image_folder
from vit.data.fake import FAKE_FOLDER_CLASSES, write_fake_image_folder, write_fake_tiny_imagenet
from vit.data.image_folder import load_image
from vit.data.loader import Batcher
from vit.runconfig import ConfigError, from_dict

CLASSES = sorted(FAKE_FOLDER_CLASSES)  # label order: sorted folder names
TRAIN, VAL, SIZE = 7, 3, 16


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return write_fake_image_folder(tmp_path_factory.mktemp("template") / "folder", train_per_class=TRAIN,
                                   val_per_class=VAL)


@pytest.fixture
def root(template, tmp_path):
    """A fresh copy for each test (tests modify it)."""
    return shutil.copytree(template, tmp_path / "folder")


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts decoded images (the loader decodes in-process with workers=1)."""
    calls = []
    original = image_folder.load_image

    def counting(path, size, channels=3):
        calls.append(str(path))
        return original(path, size, channels)

    monkeypatch.setattr(image_folder, "load_image", counting)
    return calls


def load(root, split, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("image_size", SIZE)
    return load_dataset("image-folder", root, split, progress=False, **kw)


def save(path, array, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path, **kw)


# --- labels and the class list ----------------------------------------------------------------------------------


def test_labels_are_the_sorted_class_folders_with_nested_images(root):
    train = load(root, "train")
    assert train.name == "image-folder" and train.class_names == CLASSES
    assert train.images.shape == (3 * TRAIN, SIZE, SIZE, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32
    assert train.labels.tolist() == [c for c in range(3) for _ in range(TRAIN)]
    # notes.txt and .hidden/ignored.png are not images of the class; "more/batch 1/" images are.
    nested = sorted((root / "train" / CLASSES[0]).rglob("more/batch 1/*"))
    assert len(nested) == 2
    val = load(root, "val")
    assert val.class_names == CLASSES and val.labels.tolist() == [c for c in range(3) for _ in range(VAL)]
    # Each image's colour is its class's (the grayscale ones aside): the labels go with the right pixels.
    colour = [i for i in range(len(train)) if np.ptp(train.images[i].mean(axis=(0, 1))) > 30]
    assert {int(train.labels[i]) for i in colour} == {0, 1, 2}
    for i in colour:
        dominant = np.argmax(FAKE_FOLDER_CLASSES[CLASSES[train.labels[i]]])
        assert np.argmax(train.images[i].mean(axis=(0, 1))) == dominant


def test_hidden_folders_beside_the_classes_are_not_classes(root):
    """.ipynb_checkpoints/ (or any name starting with ".") next to the class folders, even with
    images in it, is neither a class nor a source of images, in train/ and in val/."""
    for split in ("train", "val"):
        shutil.copytree(root / split / CLASSES[0], root / split / ".ipynb_checkpoints")
    train, val = load(root, "train"), load(root, "val")
    assert train.class_names == val.class_names == CLASSES
    assert (len(train), len(val)) == (3 * TRAIN, 3 * VAL)


def test_val_labels_index_the_train_classes(root):
    # A val set missing a class keeps the train indices (no relabelling by its own folder list).
    shutil.rmtree(root / "val" / CLASSES[0])
    val = load(root, "val")
    assert val.class_names == CLASSES
    assert val.labels.tolist() == [1] * VAL + [2] * VAL


# --- one image: mode, resize, crop ------------------------------------------------------------------------------


def test_wide_and_tall_images_keep_the_centre(tmp_path):
    # 40x20: red quarter | green half | red quarter. Shorter side 20 -> 8 gives 16x8; the centre 8x8 is
    # exactly the green half. The tall version is the same, transposed.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = wide[:, 30:] = (255, 0, 0)
    wide[:, 10:30] = (0, 255, 0)
    save(tmp_path / "wide.png", wide)
    save(tmp_path / "tall.png", wide.transpose(1, 0, 2))
    for name in ("wide.png", "tall.png"):
        out = load_image(tmp_path / name, 8)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
        inner = out[1:-1, 1:-1] if name == "tall.png" else out[:, 1:-1]
        assert inner[..., 1].min() > 200 and inner[..., 0].max() < 60, name  # green, no red
    # an image smaller than the size is enlarged the same way
    assert load_image(tmp_path / "wide.png", 32).shape == (32, 32, 3)


def test_modes_become_rgb_alpha_over_white(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    save(tmp_path / "gray.png", gray, "L")
    # a 16-bit grayscale PNG (not through save(), whose uint8 cast would make it 8-bit again)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as img16:
        assert img16.mode == "I;16"
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., :3] = (0, 0, 255)
    rgba[8:16, 8:16, 3] = 255  # opaque blue square, fully transparent (blue) elsewhere
    save(tmp_path / "alpha.png", rgba, "RGBA")
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "palette.png")

    g = load_image(tmp_path / "gray.png", 24)
    np.testing.assert_array_equal(g, np.repeat(gray[..., None], 3, axis=-1))  # 24 -> 24: no resampling
    np.testing.assert_array_equal(load_image(tmp_path / "gray16.png", 24), g)
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png", 24), g)
    a = load_image(tmp_path / "alpha.png", 24)
    assert a[0, 0].tolist() == [255, 255, 255]  # transparent: white, not the hidden blue
    assert a[12, 12].tolist() == [0, 0, 255]
    one = load_image(tmp_path / "alpha.png", 24, channels=1)
    assert one.shape == (24, 24, 1) and one[0, 0, 0] == 255


def test_palette_transparency_becomes_white(tmp_path):
    """A palette PNG (or GIF) marks its transparent colour in img.info["transparency"], not in an
    alpha mode: those pixels are composited over white too, not shown as the hidden colour."""
    index = np.zeros((24, 24), np.uint8)
    index[8:16, 8:16] = 1
    img = Image.fromarray(index, "P")
    img.putpalette([0, 0, 255, 255, 0, 0] + [0] * (3 * 254))  # 0: blue (transparent), 1: red
    img.save(tmp_path / "palette.png", transparency=0)
    out = load_image(tmp_path / "palette.png", 24)
    assert out[0, 0].tolist() == [255, 255, 255] and out[12, 12].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = (255, 0, 0)  # red left, blue right as stored
    pixels[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180" when shown
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    out = load_image(tmp_path / "rotated.jpg", 16)  # the centre 16x16: 8 columns of each colour
    assert out[8, 2, 2] > 200 and out[8, 2, 0] < 60  # shown upside down: blue on the left
    assert out[8, 13, 0] > 200 and out[8, 13, 2] < 60  # and red on the right


def test_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:600, 0:800]
    photo = np.stack([xx / 800 * 255, yy / 600 * 255, 128 + 60 * np.sin(xx / 40.0)], -1)
    photo = np.clip(photo + rng.normal(0, 8, photo.shape), 0, 255)
    save(tmp_path / "photo.jpg", photo, quality=92)
    reduced = load_image(tmp_path / "photo.jpg", 32).astype(int)
    with Image.open(tmp_path / "photo.jpg") as img:  # no draft: decode all 800x600 pixels
        full = image_folder.resize_center_crop(img.convert("RGB"), 32)
    assert np.abs(reduced - np.asarray(full, int)).mean() < 3


# --- cache -------------------------------------------------------------------------------------------------------


def test_second_load_reads_the_cache_and_sizes_live_side_by_side(root, decode_calls):
    first = load(root, "train")
    assert len(decode_calls) == 3 * TRAIN
    again = load(root, "train")
    assert len(decode_calls) == 3 * TRAIN  # nothing decoded again
    assert isinstance(again.images, np.memmap) and again.images.mode == "r"
    np.testing.assert_array_equal(first.images, again.images)
    bigger = load(root, "train", image_size=24)
    assert bigger.images.shape == (3 * TRAIN, 24, 24, 3) and len(decode_calls) == 6 * TRAIN
    load(root, "train")
    assert len(decode_calls) == 6 * TRAIN  # the 16px cache is still there
    names = sorted(p.name for p in (root / "vitfuse-cache").iterdir())
    assert names == [f"train_{s}px_{f}" for s in (16, 24) for f in ("images.npy", "labels.npy", "manifest.json")]


def test_loads_that_start_together_decode_once(root, decode_calls, capsys):
    """Two starts on new data at once (threads here; the lock is per open file, so the same holds
    between processes, e.g. the hosts of a multi-host run): while a third party holds the build
    lock both wait and say so; then one builds the cache and the other reads it. Every image is
    decoded once, both get the same arrays, and no lock file is left in the cache folder."""
    import threading
    import time

    from vit.data.cache import build_lock

    got = {}
    threads = [threading.Thread(target=lambda k=k: got.update({k: load(root, "train")})) for k in (0, 1)]
    with build_lock(root / "vitfuse-cache", f"train_{SIZE}px", "test"):  # another process, building
        for t in threads:
            t.start()
        err = ""
        while any(t.is_alive() for t in threads) and err.count("waiting for it") < 2:
            time.sleep(0.01)  # until both have blocked, or (no lock) finished without waiting
            err += capsys.readouterr().err
        assert err.count("another process is building the cache") == 2, err
    for t in threads:
        t.join()
    assert len(decode_calls) == 3 * TRAIN  # one build, the other read it
    assert sorted(got[k].decoded_now for k in got) == [False, True]  # and says so
    np.testing.assert_array_equal(got[0].images, got[1].images)
    assert not list((root / "vitfuse-cache").glob("*.lock"))


def test_a_file_system_without_flock_still_builds_with_a_note(root, decode_calls, capsys, monkeypatch):
    import errno

    from vit.data import cache

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(cache.fcntl, "flock", no_flock)
    assert len(load(root, "train")) == 3 * TRAIN and len(decode_calls) == 3 * TRAIN
    assert "cannot lock" in capsys.readouterr().err
    assert not list((root / "vitfuse-cache").glob("*.lock"))


def test_cache_is_rebuilt_when_an_image_changes(root, decode_calls):
    load(root, "train")
    target = root / "train" / CLASSES[2] / "img 0.png"
    save(target, np.full((30, 50, 3), (10, 200, 10)))
    decode_calls.clear()
    after = load(root, "train")
    assert len(decode_calls) == 3 * TRAIN
    assert after.images[2 * TRAIN].mean(axis=(0, 1)).round().tolist() == [10, 200, 10]


def test_a_new_train_class_rebuilds_val_with_new_labels(root):
    before = load(root, "val")
    assert before.labels[0] == 0
    save(root / "train" / "aardvark" / "a.png", np.zeros((9, 9, 3)))  # sorts first: every label moves up
    after = load(root, "val")
    assert after.class_names == ["aardvark", *CLASSES]
    assert after.labels.tolist() == (before.labels + 1).tolist()


def test_renaming_a_train_class_relabels_val(root):
    """val's labels index the train classes: renaming a train class that val lacks (the same
    number of classes, val's own files untouched) moves the other labels, and val's cache follows."""
    shutil.rmtree(root / "val" / CLASSES[0])
    before = load(root, "val")
    (root / "train" / CLASSES[0]).rename(root / "train" / "zebra")  # sorted first -> last
    after = load(root, "val")
    assert after.class_names == [*CLASSES[1:], "zebra"]
    assert after.labels.tolist() == (before.labels - 1).tolist()


def test_an_image_moved_to_another_class_is_relabelled(root):
    """Moved (renamed: same name, size and mtime) from the end of one class to the start of the
    next, an image keeps its place in the sorted file list; only its folder says its new class."""
    before = load(root, "train")
    first, second = root / "train" / CLASSES[0], root / "train" / CLASSES[1]
    last = sorted(p for p in first.rglob("img *") if ".hidden" not in p.parts)[-1]
    (second / "a").mkdir()
    last.rename(second / "a" / last.name)  # sorts before every other image of the second class
    after = load(root, "train")
    assert np.bincount(after.labels).tolist() == [TRAIN - 1, TRAIN + 1, TRAIN]
    np.testing.assert_array_equal(after.images, before.images)  # the same pixels, in the same order
    assert after.labels[TRAIN - 1] == 1 and before.labels[TRAIN - 1] == 0


def test_two_decoding_processes_give_the_same_arrays(root, tmp_path):
    one = load(root, "val")
    two = image_folder.load_image_folder(root, "val", image_size=SIZE, workers=2, progress=False,
                                         cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)


def test_streamed_batches_from_the_memmap_equal_on_device_batches(root):
    train = load(root, "train")
    on_device = Batcher(train.images, train.labels, 4, seed=3)
    streamed = Batcher(train.images, train.labels, 4, seed=3, device_budget_bytes=0)
    assert on_device.on_device and not streamed.on_device
    for (a, la), (b, lb) in zip(on_device.epoch(1), streamed.epoch(1), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


# --- errors ------------------------------------------------------------------------------------------------------


def test_neither_layout_says_what_was_expected_and_what_was_found(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as e:
        load(tmp_path, "train")
    message = str(e.value)
    assert "neither" in message and "wnids.txt" in message and "train/<class>/" in message
    assert "photos/, readme.txt" in message
    for i in range(7):  # 9 entries: the first 8 named, and the 9th counted
        (tmp_path / f"z{i}.txt").write_text("")
    with pytest.raises(DatasetError, match=r"photos/, readme.txt, z0.txt, .*, z5.txt and 1 more"):
        load(tmp_path, "train")
    assert "download" not in message  # the Tiny ImageNet hint only when Tiny ImageNet was asked for


def test_parent_of_an_image_folder_suggests_it_and_so_does_its_train_folder(root):
    for wrong in (root.parent, root / "train"):
        with pytest.raises(DatasetError, match=re.escape(f"did you mean --data-dir {root}?")):
            load(wrong, "train")


def test_empty_class_folder_is_named(root):
    (root / "train" / "empty one").mkdir()
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(root / "train" / "empty one") in str(e.value) and "empty" in str(e.value)
    (root / "train" / "empty one" / "list.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="1 file, none an image named .*names starting with '.' are left"):
        load(root, "train")


def test_class_in_val_not_in_train_is_an_error(root):
    shutil.copytree(root / "val" / CLASSES[1], root / "val" / "zebra")
    with pytest.raises(DatasetError) as e:
        load(root, "val")
    assert str(root / "val" / "zebra") in str(e.value) and str(root / "train") in str(e.value)


@pytest.mark.parametrize("how", ["no class folders", "no val folder", "image outside a class"])
def test_split_without_images_is_an_error(root, how):
    if how == "no val folder":
        shutil.rmtree(root / "val")
        expected = f"missing folder {root / 'val'}"
    elif how == "no class folders":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
        expected = f"no images in {root / 'val'}"
    else:
        shutil.copy(root / "train" / CLASSES[0] / "img 0.jpg", root / "train" / "loose.jpg")
        expected = f"{root / 'train' / 'loose.jpg'} is not in a class folder"
    with pytest.raises(DatasetError) as e:
        load(root, "val" if how != "image outside a class" else "train")
    assert expected in str(e.value)


def test_undecodable_file_is_named_and_skip_bad_images_counts_it(root, capsys):
    bad = root / "train" / CLASSES[1] / "img 4.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(bad) in str(e.value) and "skip_bad_images" in str(e.value)
    assert not list((root / "vitfuse-cache").glob("*manifest*"))
    train = load(root, "train", skip_bad_images=True)
    assert len(train) == 3 * TRAIN - 1 and len(train.skipped) == 1 and str(bad) in train.skipped[0]
    assert train.labels.tolist() == [0] * TRAIN + [1] * (TRAIN - 1) + [2] * TRAIN
    assert f"skipped 1 unreadable image: {bad}: cannot decode" in capsys.readouterr().err  # as it is built
    again = load(root, "train", skip_bad_images=True)  # ... and again by a load that reuses it
    assert len(again) == len(train) and f"out 1 unreadable image (skip_bad_images): {bad}" in capsys.readouterr().err
    with pytest.raises(DatasetError, match=str(bad)) as e:  # the skipping cache does not hide it later
        load(root, "train")
    assert "skip_bad_images" in str(e.value)  # ... and the way to leave it out is named again


def test_a_split_whose_every_image_is_unreadable_is_an_error_even_when_skipping(root):
    """skip_bad_images leaves nothing to train or validate on: an error saying so, not an empty set."""
    for path in (root / "val").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=rf"no images left in .*val: all {3 * VAL} were unreadable"):
        load(root, "val", skip_bad_images=True)


# --- layout and size choices -------------------------------------------------------------------------------------


def test_layout_is_detected_or_named(root, tmp_path, monkeypatch):
    tiny = write_fake_tiny_imagenet(tmp_path / "t")
    assert resolve_layout("tiny-imagenet", root) == "image-folder"
    assert resolve_layout("tiny-imagenet", tiny) == "tiny-imagenet"
    assert resolve_layout("tiny-imagenet", tiny.parent) == "tiny-imagenet"
    assert resolve_layout("image-folder", tiny, "image-folder") == "image-folder"
    assert resolve_layout("digits", None) == "digits"
    # The same command line works for both: --data-dir, with the dataset name left at its default.
    assert load_dataset("tiny-imagenet", root, "val", workers=1, progress=False).images.shape[1:] == (64, 64, 3)
    with pytest.raises(DatasetError, match="wnids.txt"):  # named, not detected
        load_dataset("tiny-imagenet", root, "val", layout="tiny-imagenet", progress=False)
    with pytest.raises(DatasetError, match="data.layout"):
        load(root, "val", layout="imagenet")
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("image-folder", None, "train")
    monkeypatch.chdir(tmp_path)  # no data/ here: `python train.py` with no flags says what to do
    with pytest.raises(DatasetError, match=r"^no --data-dir given, and the default data directory data/ does not"):
        resolve_layout("tiny-imagenet", None)


def test_image_size_is_for_image_folders(tmp_path):
    tiny = write_fake_tiny_imagenet(tmp_path / "t")
    for size in (32, 128):  # neither smaller nor larger than its own 64
        with pytest.raises(DatasetError, match=f"data.image_size={size}"):
            load_dataset("tiny-imagenet", tiny, "train", image_size=size, progress=False)
    with pytest.raises(DatasetError, match="data.image_size=16: digits comes at its own 8x8 only"):
        load_dataset("digits", None, "val", image_size=16)
    assert load_dataset("tiny-imagenet", tiny, "train", image_size=64, workers=1, progress=False).images.shape[1] == 64
    assert load_dataset("digits", None, "val", image_size=8).images.shape[1:] == (8, 8, 1)


def test_config_keys_are_checked():
    cfg = from_dict({"data": {"layout": "image-folder", "image_size": 96, "device_budget_mb": 0}})
    assert (cfg.data.layout, cfg.data.image_size, cfg.data.device_budget_mb) == ("image-folder", 96, 0)
    for bad in ({"layout": "flat"}, {"image_size": 0}, {"image_size": 1.5}, {"device_budget_mb": -1},
                {"dataset": "imagenet"}):
        with pytest.raises(ConfigError, match="data." + next(iter(bad))):
            from_dict({"data": bad})


def test_prepare_command_builds_the_cache_and_says_when_it_was_up_to_date(root, capsys):
    argv = ["prepare", "--data-dir", str(root), "--image-size", "12", "--workers", "1", "--quiet"]
    assert cli.main(argv) == 0
    out, cache = capsys.readouterr().out, root / "vitfuse-cache"
    assert f"image-folder train: {3 * TRAIN} images (12, 12, 3), 3 classes; cache decoded now into {cache}" in out
    assert f"image-folder val: {3 * VAL} images (12, 12, 3), 3 classes; cache decoded now into {cache}" in out
    assert (cache / "val_12px_manifest.json").is_file()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count(f"; cache up to date in {cache}\n") == 2


def test_prepare_command_builds_the_split_asked_for_and_can_skip_bad_images(root, capsys):
    (root / "val" / CLASSES[1] / "broken.png").write_bytes(b"\x89PNG nope")
    argv = ["prepare", "--data-dir", str(root), "--image-size", "12", "--workers", "1", "--quiet", "--split", "val"]
    assert cli.main(argv) == 2 and "broken.png" in capsys.readouterr().err
    assert cli.main([*argv, "--skip-bad-images"]) == 0
    assert capsys.readouterr().out == (f"image-folder val: {3 * VAL} images (12, 12, 3), 3 classes, 1 unreadable "
                                       f"image skipped; cache decoded now into {root / 'vitfuse-cache'}\n")
    assert sorted(p.name for p in (root / "vitfuse-cache").glob("*_manifest.json")) == ["val_12px_manifest.json"]
