"""`python -m vit.data digits-folder DEST [--classes ...]`: scikit-learn's digits written as an image
folder, to try the image-folder path and fine-tuning with no download. Read back through the
image-folder loader, it is the digits dataset itself: the same split, images and labels (by name)."""

import numpy as np
import pytest

from vit.data import DatasetError, load_dataset
from vit.data.__main__ import main
from vit.data.digits import write_digits_folder


def test_the_folder_reads_back_as_the_digits_split(tmp_path, capsys):
    dest = tmp_path / "digits-579"
    assert main(["digits-folder", str(dest), "--classes", "5, 7,9"]) == 0
    train, val = (int(np.isin(load_dataset("digits", None, s).labels, [5, 7, 9]).sum())
                  for s in ("train", "val"))
    assert capsys.readouterr().out == f"{dest}: {train} train / {val} val images of 8x8 digits (5, 7,9)\n"
    for split in ("train", "val"):
        digits = load_dataset("digits", None, split)
        keep = np.isin(digits.labels, [5, 7, 9])
        folder = load_dataset("image-folder", dest, split, image_size=8, progress=False, workers=1)
        assert folder.class_names == ["5", "7", "9"]
        # the folder's order: by class, then by file name (the index in the split, as text)
        order = sorted(np.flatnonzero(keep), key=lambda i: (digits.labels[i], str(i)))
        np.testing.assert_array_equal(folder.images, np.repeat(digits.images[order], 3, axis=-1))
        names = [folder.class_names[y] for y in folder.labels]
        assert names == [digits.class_names[digits.labels[i]] for i in order]


def test_a_used_folder_and_unknown_digits_are_refused(tmp_path, capsys):
    (tmp_path / "all.part" / "train" / "3").mkdir(parents=True)  # left by an interrupted write
    (tmp_path / "all.part" / "train" / "3" / "x.png").write_bytes(b"half")
    assert main(["digits-folder", str(tmp_path / "all")]) == 0
    assert not (tmp_path / "all.part").exists()
    assert len(list((tmp_path / "all" / "train" / "3").iterdir())) == int(
        (load_dataset("digits", None, "train").labels == 3).sum())
    assert "1437 train / 360 val images of 8x8 digits (all ten)" in capsys.readouterr().out
    for argv, message in (([str(tmp_path / "all")], "is not empty: give a new folder"),
                          ([str(tmp_path / "x"), "--classes", "3,x"], "got ['x']")):
        assert main(["digits-folder", *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_empty_folder_is_taken_and_a_file_or_no_digits_refused(tmp_path, capsys):
    """DEST may exist if empty (mkdir first, say); a file there, or an empty list of digits, is a
    DatasetError (the command's exit 2), not a traceback or a folder with no images."""
    (tmp_path / "empty").mkdir()
    assert main(["digits-folder", str(tmp_path / "empty"), "--classes", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["train", "val"]
    (tmp_path / "file").write_text("x")
    assert main(["digits-folder", str(tmp_path / "file")]) == 2
    assert "file is a file: give a new folder" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="got none"):
        write_digits_folder(tmp_path / "none", [])
    assert not (tmp_path / "none").exists()
