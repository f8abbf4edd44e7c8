"""Tiny ImageNet loading from the real folder layout: labels, decoding, the .npy cache, and every input error.

Long because: one short test per input error and per reason the cache must be rebuilt, each on its own
copy of the one fake dataset; split up, the files would share that fixture and little else."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vit.data import DatasetError, load_dataset
from vit.data import __main__ as cli
from vit.data import tiny_imagenet
from vit.data.cache import write_atomic, write_text_atomic
from vit.data.fake import fake_wnid, write_fake_tiny_imagenet

NUM_CLASSES, PER_CLASS, VAL = 3, 4, 6


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return write_fake_tiny_imagenet(
        tmp_path_factory.mktemp("template"), num_classes=NUM_CLASSES, train_per_class=PER_CLASS, val_images=VAL
    )


@pytest.fixture
def root(template, tmp_path):
    """A fresh copy of the fake dataset for each test (tests modify it)."""
    return shutil.copytree(template, tmp_path / "tiny-imagenet-200")


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts calls of the image decoder (the loader runs it in-process with workers=1)."""
    calls = []
    original = tiny_imagenet.decode_image

    def counting(path):
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(tiny_imagenet, "decode_image", counting)
    return calls


def load(root, split, **kw):
    kw.setdefault("workers", 1)
    return load_dataset("tiny-imagenet", root, split, progress=False, **kw)


def reference_rgb(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# --- labels and pixels -----------------------------------------------------------------------------------------


def test_train_labels_are_the_wnid_line_in_wnids_txt(root):
    # Reverse wnids.txt so that its order differs from the sorted folder names: labels must follow the file.
    wnids = [fake_wnid(i) for i in range(NUM_CLASSES)][::-1]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    train = load(root, "train")
    assert train.images.shape == (NUM_CLASSES * PER_CLASS, 64, 64, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32
    assert train.labels.tolist() == [label for label in range(NUM_CLASSES) for _ in range(PER_CLASS)]
    # Row k of class c is the k-th sorted image of train/<wnids[c]>/images.
    for row, label in [(0, 0), (PER_CLASS + 1, 1), (len(train) - 1, NUM_CLASSES - 1)]:
        name = f"{wnids[label]}_{row % PER_CLASS}.JPEG"
        np.testing.assert_array_equal(train.images[row], reference_rgb(root / "train" / wnids[label] / "images" / name))
    assert train.class_names == [f"class {int(w[1:]) - 9000000}, fake thing {int(w[1:]) - 9000000}" for w in wnids]
    assert train.name == "tiny-imagenet" and train.num_classes == NUM_CLASSES


def test_val_labels_come_from_val_annotations(root):
    # The annotations listed backwards: the val rows follow the file names, not the file's order.
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text("\n".join(annotations.read_text().splitlines()[::-1]) + "\n")
    val = load(root, "val")
    wnids = (root / "wnids.txt").read_text().split()
    expected = {}
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        filename, wnid, *_ = line.split("\t")
        expected[filename] = wnids.index(wnid)
    names = sorted(expected)  # val rows are in file-name order
    assert val.labels.tolist() == [expected[n] for n in names]
    assert val.labels.tolist() != sorted(val.labels.tolist())  # the fixture's labels are not in file order
    for row, name in enumerate(names):
        np.testing.assert_array_equal(val.images[row], reference_rgb(root / "val" / "images" / name))


def test_grayscale_and_cmyk_images_become_rgb(root):
    train = load(root, "train")
    val = load(root, "val")
    gray_path = root / "train" / fake_wnid(0) / "images" / f"{fake_wnid(0)}_2.JPEG"  # every 3rd image is "L"
    with Image.open(gray_path) as img:
        assert img.mode == "L"
    gray = train.images[2]
    assert gray.shape == (64, 64, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert gray.std() > 5  # a real image, not a blank
    with Image.open(root / "val" / "images" / "val_0.JPEG") as img:
        assert img.mode == "CMYK"
    np.testing.assert_array_equal(val.images[0], reference_rgb(root / "val" / "images" / "val_0.JPEG"))


def test_accepts_the_dataset_folder_or_its_parent(root):
    a = load(root, "train")
    b = load(root.parent, "train")
    np.testing.assert_array_equal(a.images, b.images)


def test_two_decoding_processes_give_the_same_arrays(root, tmp_path):
    one = load(root, "train", workers=1)
    two = load_dataset("tiny-imagenet", root, "train", workers=2, progress=False)  # cached: same result
    np.testing.assert_array_equal(one.images, two.images)
    shutil.rmtree(root / tiny_imagenet.CACHE_DIRNAME)
    rebuilt = tiny_imagenet.load_tiny_imagenet(root, "train", workers=2, progress=False, cache_dir=tmp_path / "c2")
    np.testing.assert_array_equal(one.images, rebuilt.images)
    np.testing.assert_array_equal(one.labels, rebuilt.labels)


# --- cache -------------------------------------------------------------------------------------------------------


def test_second_load_reads_the_memmapped_cache_without_decoding(root, decode_calls):
    first = load(root, "train")
    assert len(decode_calls) == NUM_CLASSES * PER_CLASS
    second = load(root, "train")
    assert len(decode_calls) == NUM_CLASSES * PER_CLASS  # nothing decoded again
    assert isinstance(second.images, np.memmap) and second.images.mode == "r"
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    cache = root / tiny_imagenet.CACHE_DIRNAME
    assert sorted(p.name for p in cache.iterdir()) == ["train_images.npy", "train_labels.npy", "train_manifest.json"]


def _add_image(root):
    wnid = fake_wnid(1)
    src = root / "train" / wnid / "images" / f"{wnid}_0.JPEG"
    shutil.copy(src, src.with_name(f"{wnid}_9.JPEG"))
    return NUM_CLASSES * PER_CLASS + 1


def _remove_image(root):
    (root / "train" / fake_wnid(2) / "images" / f"{fake_wnid(2)}_1.JPEG").unlink()
    return NUM_CLASSES * PER_CLASS - 1


def first_train_image(root):
    return root / "train" / fake_wnid(0) / "images" / f"{fake_wnid(0)}_0.JPEG"


def _change_image(root):
    path = first_train_image(root)
    Image.new("RGB", (64, 64), (200, 10, 30)).save(path, format="JPEG")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-grained file system
    return NUM_CLASSES * PER_CLASS


@pytest.mark.parametrize("change", [_add_image, _remove_image, _change_image])
def test_cache_is_rebuilt_when_an_image_changes(root, decode_calls, change):
    before = load(root, "train")
    before_images = np.array(before.images)
    expected_count = change(root)
    decode_calls.clear()
    after = load(root, "train")
    assert len(decode_calls) == expected_count  # decoded again, all of it
    assert len(after) == expected_count
    if change is _change_image:
        np.testing.assert_array_equal(after.images[0], reference_rgb(first_train_image(root)))
        assert not np.array_equal(after.images[0], before_images[0])
        np.testing.assert_array_equal(after.images[1:], before_images[1:])


def test_cache_is_rebuilt_when_val_annotations_change(root):
    before = load(root, "val")
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    name, wnid, *box = lines[0].split("\t")
    new_label = (int(before.labels[0]) + 1) % NUM_CLASSES
    lines[0] = "\t".join([name, fake_wnid(new_label), *box])
    path.write_text("\n".join(lines) + "\n")
    after = load(root, "val")
    assert after.labels[0] == new_label
    np.testing.assert_array_equal(after.labels[1:], before.labels[1:])


def test_reordering_wnids_txt_relabels_both_cached_splits(root):
    """Label i is line i of wnids.txt: reversing it (same size, same images) reverses every label
    of train and val, through their caches."""
    def label_of_each_image(split):
        data = load(root, split)
        pairs = {image.tobytes(): int(label) for image, label in zip(data.images, data.labels)}
        assert len(pairs) == len(data)  # every image distinct, so it can be told by its pixels
        return pairs

    before = {split: label_of_each_image(split) for split in ("train", "val")}
    path = root / "wnids.txt"
    path.write_text("\n".join(reversed(path.read_text().split())) + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse-grained file system
    for split, labels in before.items():
        assert label_of_each_image(split) == {k: NUM_CLASSES - 1 - v for k, v in labels.items()}, split


def test_cache_without_manifest_or_with_leftover_temp_files_is_rebuilt(root, decode_calls):
    good = np.array(load(root, "train").images)
    cache = root / tiny_imagenet.CACHE_DIRNAME
    # What a run killed half-way through a rebuild leaves: no manifest, a partial temp file, a truncated array.
    (cache / "train_manifest.json").unlink()
    (cache / "train_images.npy.tmp-12345").write_bytes(b"\x93NUMPY partial")
    with open(cache / "train_images.npy", "r+b") as f:
        f.truncate(1000)
    decode_calls.clear()
    again = load(root, "train")
    assert len(decode_calls) == NUM_CLASSES * PER_CLASS
    np.testing.assert_array_equal(again.images, good)
    assert not list(cache.glob("*.tmp-*"))


def test_a_rebuild_removes_what_stopped_builds_of_other_caches_left_but_not_a_build_under_way(root, capsys):
    """A build SIGKILLed at another image size left its half-written arrays (up to a whole cache's
    size), which stayed until that size was built again. A build under way (its lock held) keeps
    its files."""
    from vit.data.cache import build_lock

    load(root, "train")
    cache = root / tiny_imagenet.CACHE_DIRNAME
    stopped = [cache / name for name in ("train_96px_images.npy.tmp-4242", "train_96px_labels.npy.tmp-4242",
                                         "train_96px_images.npy.tmp-4242-compact")]
    running = [cache / "val_48px_images.npy.tmp-777"]
    for path in stopped + running:
        path.write_bytes(b"\x93NUMPY partial" * 1000)
    (cache / "train_manifest.json").unlink()  # so the next load rebuilds train
    capsys.readouterr()
    with build_lock(cache, "val_48px", "another process"):
        load(root, "train")
        assert [p.exists() for p in stopped + running] == [False, False, False, True]
    err = capsys.readouterr().err
    assert f"removed 3 half-written files of the cache {cache / 'train_96px'}_* (42,000 bytes), left by a build " \
           "that was stopped" in err, err
    assert "val_48px" not in err and not list(cache.glob("*.lock")), err


def _old_format(cache):
    manifest = cache / "train_manifest.json"
    meta = json.loads(manifest.read_text())
    meta["format"] = meta["format"] - 1
    manifest.write_text(json.dumps(meta))


def _int64_labels(cache):
    labels = cache / "train_labels.npy"
    np.save(labels, np.load(labels).astype(np.int64))


def _int16_images(cache):
    images = cache / "train_images.npy"
    np.save(images, np.load(images).astype(np.int16))


@pytest.mark.parametrize("spoil", [_old_format, _int64_labels, _int16_images])
def test_cache_of_another_format_or_label_dtype_is_rebuilt(root, decode_calls, spoil):
    good = load(root, "train")
    good_images, good_labels = np.array(good.images), np.array(good.labels)
    spoil(root / tiny_imagenet.CACHE_DIRNAME)
    decode_calls.clear()
    again = load(root, "train")
    assert len(decode_calls) == NUM_CLASSES * PER_CLASS
    np.testing.assert_array_equal(again.images, good_images)
    assert again.images.dtype == np.uint8 and again.labels.dtype == np.int32
    np.testing.assert_array_equal(again.labels, good_labels)


def test_truncated_cache_array_is_rebuilt_even_with_a_manifest(root, decode_calls):
    good = np.array(load(root, "train").images)
    with open(root / tiny_imagenet.CACHE_DIRNAME / "train_images.npy", "r+b") as f:
        f.truncate(5000)
    decode_calls.clear()
    np.testing.assert_array_equal(load(root, "train").images, good)
    assert len(decode_calls) == NUM_CLASSES * PER_CLASS


def test_interrupted_rebuild_leaves_no_cache_that_counts(root, monkeypatch):
    load(root, "train")
    _change_image(root)
    original = tiny_imagenet.decode_image
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(path)

    monkeypatch.setattr(tiny_imagenet, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root, "train")
    cache = root / tiny_imagenet.CACHE_DIRNAME
    assert not (cache / "train_manifest.json").exists()  # the old manifest is gone: the old arrays no longer count
    assert not list(cache.glob("*.tmp-*"))
    monkeypatch.setattr(tiny_imagenet, "decode_image", original)
    after = load(root, "train")
    np.testing.assert_array_equal(after.images[0], reference_rgb(first_train_image(root)))


def test_write_atomic_replaces_a_file_whole_or_not_at_all(tmp_path):
    """write_atomic (the cache's labels and manifest; the bench's results files, rewritten while
    a run goes on): a reader that opened the old file reads all of it, a new reader the new one;
    a write that fails half-way leaves the old file and no temporary file."""
    path = tmp_path / "results.json"
    path.write_text("old version\n")
    with open(path) as reader:
        write_text_atomic(path, "new version\n")
        assert reader.read() == "old version\n"
    assert path.read_text() == "new version\n"

    def failing(f):
        f.write(b"half of a new ver")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, failing)
    assert path.read_text() == "new version\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- errors ------------------------------------------------------------------------------------------------------


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        load(missing, "train")
    message = str(e.value)
    assert str(missing) in message
    assert "python -m vit.data download --dest" in message and "--dataset digits" in message


def test_folder_without_wnids_names_the_file(root):
    (root / "wnids.txt").unlink()
    # the folder itself too: its val/val_annotations.txt still marks it as Tiny ImageNet, not an
    # image folder whose classes would be the train/<wnid>/ folders in sorted order
    for data_dir in (root.parent, root):
        with pytest.raises(DatasetError, match="wnids.txt") as e:
            load(data_dir, "train")
        assert str(root / "wnids.txt") in str(e.value)


def test_missing_val_annotations_names_the_file(root):
    path = root / "val" / "val_annotations.txt"
    path.unlink()
    with pytest.raises(DatasetError) as e:
        load(root, "val")
    assert str(path) in str(e.value)
    assert len(load(root, "train")) == NUM_CLASSES * PER_CLASS  # train does not need it


def test_missing_words_txt_names_the_file(root):
    (root / "words.txt").unlink()
    with pytest.raises(DatasetError, match="words.txt"):
        load(root, "train")


def test_missing_train_class_folder_is_named(root):
    shutil.rmtree(root / "train" / fake_wnid(1))
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(root / "train" / fake_wnid(1) / "images") in str(e.value)
    assert f"{root / 'wnids.txt'}:2)" in str(e.value)  # the class's line: labels count from 0, lines from 1
    # blank lines list no class (label 1 is still the second wnid) but count as lines of the file
    (root / "wnids.txt").write_text("\n" + (root / "wnids.txt").read_text().replace("\n", "\n\n", 1))
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert f"{root / 'wnids.txt'}:4)" in str(e.value)


def _spoil(root, how):
    """One way a Tiny ImageNet folder can be broken; -> (split that reads it, the path the error names)."""
    if how == "wnids.txt empty":
        (root / "wnids.txt").write_text("\n")
        return "train", root / "wnids.txt"
    if how == "wnids.txt not UTF-8":
        (root / "wnids.txt").write_bytes(b"n0\xff\n")
        return "train", root / "wnids.txt"
    if how == "no train folder":
        shutil.rmtree(root / "train")
        return "train", root / "train"
    if how == "a class without images":
        images = root / "train" / fake_wnid(2) / "images"
        for f in images.iterdir():
            f.unlink()
        return "train", images
    if how == "no val images folder":
        shutil.rmtree(root / "val" / "images")
        return "val", root / "val" / "images"
    with open(root / "val" / "val_annotations.txt", "a") as f:  # a line without tabs
        f.write("val_0.JPEG n01\n")
    return "val", root / "val" / "val_annotations.txt"


@pytest.mark.parametrize("how", ["wnids.txt empty", "wnids.txt not UTF-8", "no train folder",
                                 "a class without images", "no val images folder", "an annotation without tabs"])
def test_each_broken_part_of_the_folder_is_named(root, how):
    split, named = _spoil(root, how)
    with pytest.raises(DatasetError, match="lists no classes|cannot read|missing folder|no .JPEG images|"
                                           "expected 'filename<TAB>wnid") as e:
        load(root, split)
    assert str(named) in str(e.value), (how, str(e.value))


def test_unknown_wnid_in_annotations_gives_file_line_and_text(root):
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    lines[3] = "val_3.JPEG\tn99999999\t0\t0\t10\t10"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        load(root, "val")
    message = str(e.value)
    assert f"{path}:4" in message and "n99999999" in message and "val_3.JPEG\\tn99999999" in message


def test_a_wnid_listed_twice_is_an_error(root):
    # a second line for a class would shift every later label by one
    path = root / "wnids.txt"
    path.write_text(path.read_text() + fake_wnid(1) + "\n")
    with pytest.raises(DatasetError, match="listed twice") as e:
        load(root, "train")
    assert f"{path}:{NUM_CLASSES + 1}" in str(e.value)


def test_class_without_a_name_in_words_txt_is_called_by_its_wnid(root):
    words = root / "words.txt"
    lines = words.read_text().splitlines()
    lines = [line for line in lines if not line.startswith(fake_wnid(0))]  # not listed at all
    lines = [f"{fake_wnid(1)}\t  " if line.startswith(fake_wnid(1)) else line for line in lines]  # empty name
    words.write_text("\n".join(lines) + "\n")
    names = load(root, "train").class_names
    assert names[:2] == [fake_wnid(0), fake_wnid(1)]
    assert names[2] == "class 2, fake thing 2"


def test_val_image_annotated_twice_is_an_error(root):
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    first, wnid, *box = lines[0].split("\t")
    other = next(fake_wnid(i) for i in range(NUM_CLASSES) if fake_wnid(i) != wnid)
    path.write_text("\n".join(lines + ["\t".join([first, other, *box])]) + "\n")
    with pytest.raises(DatasetError, match="annotated twice") as e:
        load(root, "val")
    assert f"{path}:{len(lines) + 1}" in str(e.value) and first in str(e.value)


@pytest.mark.parametrize("name", ["..", ".", "sub/val_0.JPEG"])
def test_val_annotation_naming_no_file_in_the_images_folder_is_an_error(root, name):
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    lines[2] = "\t".join([name, *lines[2].split("\t")[1:]])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="is not a file name") as e:
        load(root, "val")
    assert f"{path}:3" in str(e.value)


def test_val_image_without_annotation_is_an_error(root):
    shutil.copy(root / "val" / "images" / "val_1.JPEG", root / "val" / "images" / "val_99.JPEG")
    with pytest.raises(DatasetError, match="val_99.JPEG"):
        load(root, "val")


def test_train_folder_not_in_wnids_is_an_error(root):
    shutil.copytree(root / "train" / fake_wnid(0), root / "train" / "n11111111")
    with pytest.raises(DatasetError, match="n11111111"):
        load(root, "train")


def test_corrupt_jpeg_error_names_its_path_and_skip_flag_counts_it(root):
    bad = root / "train" / fake_wnid(1) / "images" / f"{fake_wnid(1)}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-scan
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(bad) in str(e.value) and "skip_bad_images" in str(e.value)
    assert not (root / tiny_imagenet.CACHE_DIRNAME / "train_manifest.json").exists()

    train = load(root, "train", skip_bad_images=True)
    assert len(train) == NUM_CLASSES * PER_CLASS - 1
    assert len(train.skipped) == 1 and str(bad) in train.skipped[0]
    # The skipped row is gone and the labels stay aligned with their images.
    assert train.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 4
    np.testing.assert_array_equal(train.images[PER_CLASS + 2], reference_rgb(bad.with_name(f"{fake_wnid(1)}_3.JPEG")))
    # A cache built with skipping does not hide the bad file from a later load that does not skip.
    with pytest.raises(DatasetError, match=str(bad)):
        load(root, "train")


def test_not_an_image_error_names_its_path(root):
    bad = root / "val" / "images" / "val_2.JPEG"
    bad.write_text("this is not a JPEG")
    with pytest.raises(DatasetError, match=str(bad)):
        load(root, "val")


def test_wrong_image_size_names_the_file_and_its_size(root):
    odd = root / "train" / fake_wnid(0) / "images" / f"{fake_wnid(0)}_1.JPEG"
    Image.new("RGB", (80, 60)).save(odd, format="JPEG")
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(odd) in str(e.value) and "80x60" in str(e.value)
    Image.new("RGB", (64, 48)).save(odd, format="JPEG")  # the right width, the wrong height
    with pytest.raises(DatasetError) as e:
        load(root, "train")
    assert str(odd) in str(e.value) and "64x48" in str(e.value)


def test_unknown_split_and_dataset(root):
    with pytest.raises(DatasetError, match="split"):
        load(root, "test")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet-1k", root, "train")


# --- command line ------------------------------------------------------------------------------------------------


def test_prepare_command_builds_the_cache_and_says_when_it_was_up_to_date(root, capsys):
    argv = ["prepare", "--data-dir", str(root.parent), "--workers", "1", "--quiet"]
    assert cli.main(argv) == 0
    out, cache = capsys.readouterr().out, root / tiny_imagenet.CACHE_DIRNAME
    for split, n in (("train", NUM_CLASSES * PER_CLASS), ("val", VAL)):
        said = f"tiny-imagenet {split}: {n} images (64, 64, 3), {NUM_CLASSES} classes; cache decoded now into {cache}"
        assert f"{said}\n" in out, out
    assert (cache / "val_manifest.json").is_file()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count(f"; cache up to date in {cache}\n") == 2


def test_prepare_command_decodes_with_the_workers_asked_for(root, monkeypatch):
    """--workers N reaches the cache build (recorded here; the build itself runs in-process)."""
    from vit.data import cache

    asked, build = [], cache.build_cache

    def recording(*args, workers, **kwargs):
        asked.append(workers)
        return build(*args, workers=1, **kwargs)

    monkeypatch.setattr(cache, "build_cache", recording)
    assert cli.main(["prepare", "--data-dir", str(root.parent), "--workers", "3", "--quiet"]) == 0
    assert asked == [3, 3]  # train, then val


def test_download_command_passes_its_flags_on(tmp_path, monkeypatch):
    """--retries 0 (fail at the first dropped connection) and a fraction of a second of --timeout
    are values, not errors, and reach the download."""
    got = {}
    monkeypatch.setattr(cli, "download", lambda dest, url, md5, **kw: got.update(dest=dest, url=url, md5=md5, **kw))
    argv = ["download", "--dest", str(tmp_path), "--url", "http://127.0.0.1:9/x.zip", "--md5", "0" * 32,
            "--retries", "0", "--timeout", "0.5", "--keep-zip", "--quiet"]
    assert cli.main(argv) == 0
    assert got == {"dest": str(tmp_path), "url": "http://127.0.0.1:9/x.zip", "md5": "0" * 32, "retries": 0,
                   "timeout": 0.5, "keep_zip": True, "progress": False}


def test_command_line_errors_exit_2_with_the_message(tmp_path, capsys, monkeypatch):
    """Data that cannot be used is exit code 2, as in train.py, and so are bad flags (argparse's
    own message naming the flag, no traceback; a flag let through would reach the default data
    directory or the real server, so here it fails instead)."""
    assert cli.main(["prepare", "--data-dir", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "python -m vit.data prepare: error: data directory" in capsys.readouterr().err

    def reached(*args, **kwargs):
        raise AssertionError(f"a bad flag was let through: {kwargs}")
    monkeypatch.setattr(cli, "download", reached)
    monkeypatch.setattr(cli, "load_dataset", reached)
    for argv in (["prepare", "--workers", "0"], ["prepare", "--image-size", "-4"], ["prepare", "--image-size", "0"],
                 ["download", "--retries", "-1"], ["download", "--timeout", "0"], ["download", "--timeout", "nan"],
                 ["download", "--timeout", "inf"], ["download", "--timeout", "1e300"]):  # (the socket overflowed)
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {argv[1]}: must be" in err, err


def test_an_image_size_tiny_imagenet_cannot_take_names_the_flag_that_asked(template, tmp_path, capsys):
    """The folder's layout is found (data.layout "auto") only once the folder is read, so a size
    the found Tiny ImageNet cannot take used to be named by its key, data.image_size, whatever set
    it. train.py and prepare name their flag, or the config file, before any image is decoded."""
    import train

    def refused(*flags):
        with pytest.raises(SystemExit):
            train.resolve_config(train.parse_args([str(f) for f in flags]))
        return capsys.readouterr().err

    why = f"{template} holds tiny-imagenet, which comes at its own 64x64 only"
    err = refused("--data-dir", template, "--set", "data.image_size=224")
    assert f"--set data.image_size=224: {why}" in err, err
    config = tmp_path / "sized.toml"
    config.write_text("[data]\nimage_size = 96\n")
    assert f"--config {config}: data.image_size=96: {why}" in refused("--config", config, "--data-dir", template)
    assert train.resolve_config(train.parse_args(["--data-dir", str(template), "--set",
                                                  "data.image_size=64"])).data.image_size == 64
    assert cli.main(["prepare", "--data-dir", str(template), "--image-size", "224", "--quiet"]) == 2
    assert (f"prepare: error: --image-size 224: {why}; resizing is for image-folder datasets (leave "
            "--image-size unset)") in capsys.readouterr().err


def test_the_refusal_names_the_default_folder_and_leaves_a_missing_one_to_loading(template, tmp_path,
                                                                                  monkeypatch, capsys):
    """Without --data-dir the refusal names the default folder (data/), not None, and says what to
    do; a folder that is not there is left to loading, whose error train.py prints, exit 2 (a
    DatasetError out of the refusal would be a traceback)."""
    import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny-imagenet-200").symlink_to(template)
    with pytest.raises(SystemExit):
        train.resolve_config(train.parse_args(["--set", "data.image_size=96"]))
    assert ("--set data.image_size=96: data holds tiny-imagenet, which comes at its own 64x64 only; "
            "resizing is for image-folder datasets (leave data.image_size unset)") in capsys.readouterr().err
    missing = tmp_path / "missing"
    flags = ["--data-dir", str(missing), "--set", "data.image_size=96"]
    assert train.resolve_config(train.parse_args(flags)).data.image_size == 96
    with pytest.raises(SystemExit) as leave:
        train.main([*flags, "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert leave.value.code == 2
    assert f"train.py: error: data directory {missing} does not exist" in capsys.readouterr().err


def test_the_size_is_checked_against_the_layout_given(tmp_path, capsys):
    """data.layout image-folder (prepare's --layout) reads a folder as an image folder where "auto"
    finds Tiny ImageNet (a wnids.txt beside DIR/train/<class>/, as Tiny ImageNet converted to class
    folders keeps it): its size is taken there, not refused as Tiny ImageNet's."""
    import train
    from vit.data.fake import write_fake_image_folder

    folder = write_fake_image_folder(tmp_path / "converted", train_per_class=2, val_per_class=1)
    (folder / "wnids.txt").write_text("n01443537\n")
    flags = ["--data-dir", str(folder), "--set", "data.image_size=8"]
    with pytest.raises(SystemExit):
        train.resolve_config(train.parse_args(flags))
    assert f"{folder} holds tiny-imagenet, which comes at its own 64x64" in capsys.readouterr().err
    cfg = train.resolve_config(train.parse_args([*flags, "--set", "data.layout=image-folder"]))
    assert (cfg.data.dataset, cfg.data.layout, cfg.data.image_size) == ("image-folder", "image-folder", 8)
    assert cli.main(["prepare", "--data-dir", str(folder), "--layout", "image-folder", "--image-size", "8",
                     "--quiet"]) == 0, capsys.readouterr().err
