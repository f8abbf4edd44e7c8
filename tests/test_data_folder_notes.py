"""What an image folder holds besides the images it reads, said rather than passed over: files
with other suffixes are counted by suffix in a note (they were left out silently), the suffixes
read are torchvision's (.tif, .ppm and .pgm were left out, though --predict read them), and a
class with no validation images is named (its accuracy is never measured), and so are the
classes a folder lacks or adds against a run's."""

import numpy as np
from PIL import Image

from vit.data.image_folder import IMAGE_SUFFIXES, load_image_folder


def image(path, value, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 12), value if mode == "RGB" else value[0]).save(path)


def load(root, split, tmp_path):
    return load_image_folder(root, split, image_size=8, workers=1, progress=False,
                             cache_dir=tmp_path / "cache")


def test_files_left_out_are_counted_by_suffix_and_torchvisions_suffixes_are_read(tmp_path, capsys):
    root = tmp_path / "data"
    image(root / "train" / "cat" / "a.png", (200, 0, 0))
    image(root / "train" / "cat" / "b.tif", (210, 0, 0))
    image(root / "train" / "cat" / "c.PPM", (220, 0, 0))
    image(root / "train" / "cat" / "d.webp", (230, 0, 0))
    image(root / "train" / "cat" / "e.jpeg", (240, 0, 0))
    image(root / "train" / "dog" / "a.pgm", (30, 30, 30), mode="L")
    image(root / "train" / "dog" / "anim.gif", (0, 0, 200))
    (root / "train" / "dog" / "labels.txt").write_text("dog\n")
    (root / "train" / "dog" / "notes.txt").write_text("\n")
    (root / "train" / "dog" / "README").write_text("\n")
    (root / "train" / "dog" / ".DS_Store").write_text("")
    image(root / "val" / "cat" / "v.png", (200, 0, 0))
    image(root / "val" / "dog" / "v.png", (30, 30, 30))
    train = load(root, "train", tmp_path)
    assert np.bincount(train.labels).tolist() == [5, 1], train.labels  # gif, txt, README left out
    assert sorted(train.images[:, 0, 0, 0].tolist()) == [30, 200, 210, 220, 230, 240]
    err = capsys.readouterr().err
    assert f"note: 4 files in the class folders of {root / 'train'} are not read (2 .txt, 1 .gif, " \
           f"1 (no suffix)): images are *{', *'.join(IMAGE_SUFFIXES)}" in err, err
    assert ".DS_Store" not in err
    load(root, "val", tmp_path)
    assert "note:" not in capsys.readouterr().err  # val holds images only


def test_a_class_without_validation_images_is_named(tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("ant", "bee", "cow"):
        image(root / "train" / name / "t.png", (9, 9, 9))
    image(root / "val" / "bee" / "v.png", (9, 9, 9))
    val = load(root, "val", tmp_path)
    assert val.class_names == ["ant", "bee", "cow"] and val.labels.tolist() == [1]
    assert f"note: 2 of 3 classes have no images in {root / 'val'}, so their val accuracy is not " \
           "measured: ant, cow" in capsys.readouterr().err
    load(root, "train", tmp_path)
    assert "note:" not in capsys.readouterr().err


def test_the_note_counts_five_suffixes_and_marks_more():
    from pathlib import Path

    from vit.data.image_folder import note_left_out

    five = note_left_out(Path("d/train"), ["a.txt", "b.gif", "c.heic", "d.xml", "e.json"])
    assert "1 .txt, 1 .gif, 1 .heic, 1 .xml, 1 .json)" in five and ", ..." not in five, five
    six = note_left_out(Path("d/train"), ["a.txt", "b.gif", "c.heic", "d.xml", "e.json", "f.csv"])
    assert "6 files in the class folders of d/train are not read" in six and ", ...)" in six, six


def test_a_folder_of_other_classes_names_them():
    """It said '2 classes there, 3 in the run' and left the user to find which."""
    import pytest

    from vit.data import DatasetError
    from vit.data.common import check_same_classes

    with pytest.raises(DatasetError, match=r"\(2 classes there, 3 in the run; missing there: 'fish'\)"):
        check_same_classes(["cat", "dog", "fish"], ["cat", "dog"], "sub", "run")
    with pytest.raises(DatasetError, match=r"; missing there: 'b', 'c'; not in the run: 'x'\)"):
        check_same_classes(["a", "b", "c"], ["a", "x"], "sub", "run")
