"""Image folders with links and with classes that skipping empties: a broken link is a bad image
(named, or skipped with data.skip_bad_images), a link to '.' is read once and a link to a folder
holding the class folder not at all (they used to end in a traceback, or count a class's images
forty times over), and a class whose every
training image is skipped is an error, not a class the model never sees."""

import os
import re

import pytest

from vit.data import DatasetError, load_dataset
from vit.data.fake import FAKE_FOLDER_CLASSES, write_fake_image_folder

SIZE = 8


@pytest.fixture
def root(tmp_path):
    return write_fake_image_folder(tmp_path / "folder", train_per_class=4, val_per_class=2)


def load(root, split, **kw):
    return load_dataset("image-folder", root, split, progress=False, workers=1, image_size=SIZE, **kw)


def test_a_broken_link_is_a_bad_image_named_or_skipped(root):
    cls = sorted(FAKE_FOLDER_CLASSES)[0]
    link = root / "train" / cls / "gone.png"
    os.symlink(root / "nowhere" / "x.png", link)
    with pytest.raises(DatasetError, match=re.escape(f"{link}: a broken link (to {root}/nowhere/x.png), "
                                                     "not an image")):
        load(root, "train")
    kept = load(root, "train", skip_bad_images=True)
    assert len(kept.labels) == 4 * len(FAKE_FOLDER_CLASSES)
    assert len(kept.skipped) == 1 and str(link) in kept.skipped[0]


def test_link_loops_and_links_to_the_class_folder_are_read_once(root):
    plain = {split: len(load(root, split).labels) for split in ("train", "val")}
    cls = sorted(FAKE_FOLDER_CLASSES)[1]
    os.symlink("../../train", root / "train" / cls / "loop")  # a loop through the split folder
    os.symlink(".", root / "train" / cls / "again")            # the class folder itself
    os.symlink("..", root / "train" / cls / "more" / "up")      # a sub-folder's parent
    linked = {split: load(root, split) for split in ("train", "val")}
    assert {split: len(d.labels) for split, d in linked.items()} == plain
    assert list(linked["train"].class_names) == sorted(FAKE_FOLDER_CLASSES)


def test_a_class_whose_training_images_are_all_skipped_is_an_error(root):
    cls = sorted(FAKE_FOLDER_CLASSES)[2]
    folder = root / "train" / cls
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith(".txt") and ".hidden" not in path.parts:
            path.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=re.escape(f"no images left in class folder {folder}: all "
                                                     "were unreadable and skipped (1 of 3 classes)")):
        load(root, "train", skip_bad_images=True)
    assert len(load(root, "val", skip_bad_images=True).labels) == 2 * len(FAKE_FOLDER_CLASSES)
