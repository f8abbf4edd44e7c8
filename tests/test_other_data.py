"""A run pointed at another folder's data: `train.py --resume RUN --data-dir OTHER` and
`evaluate.py RUN --data-dir OTHER` take only a folder with the classes the run was trained on
(checked by name, in label order). Another class set was trained on or evaluated silently with
labels that meant other classes (a renamed class shifts every label after it), or, with another
class count, ended in a JAX shape error traceback."""

import contextlib
import io

import pytest

import evaluate
import train
from vit.data.fake import FAKE_FOLDER_CLASSES, write_fake_image_folder

SMALL = ["--set", "data.image_size=16", "--set", "model.patch_size=8", "--set", "model.d_model=32",
         "--set", "model.heads=2", "--set", "model.layers=1", "--set", "model.mlp_dim=64",
         "--set", "data.workers=1", "--batch-size", "6", "--no-progress"]


def quietly(main, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A one-epoch run on the fake colour folder, and three other folders: the same classes, one
    renamed (first in sorted order, so every label moves), and one class fewer."""
    base = tmp_path_factory.mktemp("other-data")
    same = write_fake_image_folder(base / "same", train_per_class=2, val_per_class=1)
    renamed = dict(FAKE_FOLDER_CLASSES)
    renamed["aardvark"] = renamed.pop("red fish (ñ)")
    fewer = dict(list(FAKE_FOLDER_CLASSES.items())[:2])
    run = base / "run"
    assert quietly(train.main, "--data-dir", same, "--out", run, "--epochs", 1, *SMALL) == 0
    return {"run": run, "same": same,
            "renamed": write_fake_image_folder(base / "renamed", classes=renamed, train_per_class=2,
                                               val_per_class=1),
            "fewer": write_fake_image_folder(base / "fewer", classes=fewer, train_per_class=2,
                                             val_per_class=1)}


@pytest.mark.parametrize("other, detail", [("renamed", "class 0 is 'aardvark' there and 'blue.v2' in the run"),
                                           ("fewer", "2 classes there, 3 in the run")])
def test_resume_and_evaluate_refuse_a_folder_of_other_classes(folders, other, detail, capsys, tmp_path):
    run = folders["run"]
    for main, args in ((train.main, ["--resume", run, "--data-dir", folders[other], "--epochs", 2, "--no-progress"]),
                       (evaluate.main, [run, "--data-dir", folders[other], "--no-progress"])):
        with pytest.raises(SystemExit) as exit_:
            quietly(main, *args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert f"{folders[other]}" in err and f"the classes the run in {run} was trained on" in err, err
        assert detail in err and "give the --data-dir it was trained on" in err, err
    assert quietly(evaluate.main, run, "--data-dir", folders["same"], "--no-progress") == 0


def test_a_run_whose_data_folder_moved_asks_for_data_dir(folders, tmp_path, capsys):
    """evaluate.py RUN and train.py --resume RUN read the run's own data.data_dir; once that folder
    has moved they say so and ask for --data-dir (they used to say 'data directory ... does not
    exist; get Tiny ImageNet with python -m vit.data download', the hint for a first run)."""
    import shutil

    data, moved, run = tmp_path / "data", tmp_path / "moved", tmp_path / "run"
    shutil.copytree(folders["same"], data)
    assert quietly(train.main, "--data-dir", data, "--out", run, "--epochs", 1, *SMALL) == 0
    data.rename(moved)
    for main, args, who in ((evaluate.main, [run, "--no-progress"], f"{run}"),
                            (train.main, ["--resume", run, "--epochs", 2, "--no-progress"], f"--resume {run}")):
        with pytest.raises(SystemExit) as exit_:
            quietly(main, *args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert f"{who}: the run's data directory {data} (its data.data_dir) does not exist here; give " \
               "the folder that holds its images now with --data-dir DIR" in err, err
        assert "download" not in err, err
    assert quietly(evaluate.main, run, "--data-dir", moved, "--no-progress") == 0
    assert quietly(train.main, "--resume", run, "--data-dir", moved, "--epochs", 2, "--no-progress") == 0


def test_evaluate_names_a_data_dir_that_is_not_there(tmp_path):
    """"data directory X does not exist" named no flag; it is evaluate.py's --data-dir."""
    import numpy as np

    from vit import explain, runconfig
    from vit.data import DatasetError

    cfg = runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": str(tmp_path)}})
    run = explain.Run(tmp_path / "best.npz", {}, np.zeros(3), np.ones(3), cfg, {})
    with pytest.raises(DatasetError, match=f"^--data-dir {tmp_path / 'nowhere'}: no such folder$"):
        explain.load_split(run, tmp_path / "nowhere")
