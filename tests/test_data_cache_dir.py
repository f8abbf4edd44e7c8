"""data.cache_dir: the decoded cache of a folder dataset in another folder, for a data folder that
cannot be written to (read-only, shared). Each dataset gets a sub-folder of it, so one cache_dir
serves several; a cache that cannot be written says where else to put it; train.py, evaluate.py
and `python -m vit.data prepare` take it, --resume takes a new one silently, digits refuse it."""

from pathlib import Path

import pytest

import resume
import train
from vit import runconfig
from vit.data import DatasetError, load_dataset
from vit.data import __main__ as cli
from vit.data.fake import write_fake_image_folder


@pytest.fixture
def folders(tmp_path):
    return [write_fake_image_folder(tmp_path / name, train_per_class=2, val_per_class=1)
            for name in ("pets", "cars")]


def load(root, split="train", **kw):
    return load_dataset("image-folder", root, split, progress=False, workers=1, image_size=8, **kw)


def cache_of(data) -> Path:
    return Path(data.images.filename).parent


def test_a_cache_dir_holds_a_folder_per_dataset_and_none_in_the_data(folders, tmp_path):
    caches = tmp_path / "caches"
    pets, cars = (load(root, cache_dir=caches) for root in folders)
    assert pets.decoded_now and cars.decoded_now
    assert cache_of(pets).parent == cache_of(cars).parent == caches
    assert cache_of(pets) != cache_of(cars) and cache_of(pets).name.startswith("pets-")
    assert not any((root / "vitfuse-cache").exists() for root in folders)
    again = load(folders[0], cache_dir=caches)  # the other dataset did not replace it
    assert not again.decoded_now and (again.images == pets.images).all()


def test_an_unwritable_cache_says_where_else_to_put_it(folders, tmp_path):
    (folders[0] / "vitfuse-cache").write_text("a file where the cache's folder would be")
    with pytest.raises(DatasetError, match="cannot write the decoded cache in .*--set "
                                           "data.cache_dir=DIR, python -m vit.data prepare ... --cache-dir DIR"):
        load(folders[0])
    assert len(load(folders[0], cache_dir=tmp_path / "c").labels) == 2 * 3


def test_train_evaluate_and_prepare_take_it_and_resume_takes_a_new_one(folders, tmp_path, capsys):
    import evaluate

    caches, run = tmp_path / "caches", tmp_path / "run"
    assert cli.main(["prepare", "--data-dir", str(folders[0]), "--image-size", "8", "--cache-dir",
                     str(caches), "--quiet"]) == 0
    assert "cache decoded now into " + str(caches) in capsys.readouterr().out
    built = {p: p.stat().st_mtime_ns for p in caches.rglob("*.npy")}
    assert train.main(["--data-dir", str(folders[0]), "--set", "data.image_size=8", "--set",
                       "model.patch_size=4", "--set", "model.layers=1", "--set",
                       f"data.cache_dir={caches}", "--epochs", "1", "--batch-size", "3",
                       "--no-progress", "--out", str(run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in caches.rglob("*.npy")} == built  # prepare's, used
    assert not (folders[0] / "vitfuse-cache").exists()
    assert evaluate.main([str(run), "--no-progress"]) == 0 and not (folders[0] / "vitfuse-cache").exists()
    saved = runconfig.from_dict({"data": {"data_dir": "d", "cache_dir": "a"}})
    moved = runconfig.from_dict({"data": {"data_dir": "d", "cache_dir": "b"}})
    assert resume.check_changes(saved, moved, {}, run) == []
    with pytest.raises(runconfig.ConfigError, match="data.cache_dir='c'"):
        runconfig.from_dict({"data": {"dataset": "digits", "cache_dir": "c"}})


def test_the_run_keeps_its_folders_as_absolute_paths(folders, tmp_path, monkeypatch):
    """--data-dir and data.cache_dir given relative (by a flag or a config file) are stored absolute,
    so evaluate.py and --resume from another directory find them (config.json held them as typed)."""
    pets = folders[0]
    monkeypatch.chdir(pets.parent)
    args = train.parse_args(["--data-dir", pets.name, "--set", "data.cache_dir=caches"])
    cfg = train.resolve_config(args)
    assert (cfg.data.data_dir, cfg.data.cache_dir) == (str(pets), str(pets.parent / "caches"))
    home = train.resolve_config(train.parse_args(["--data-dir", "~/x", "--dataset", "image-folder"]))
    assert home.data.data_dir == str(Path.home() / "x")
    config = pets.parent / "pets.toml"  # a config file's folders too (train.resolve_data)
    config.write_text(f'[data]\ndata_dir = "{pets.name}"\ncache_dir = "caches"\n')
    cfg = train.resolve_config(train.parse_args(["--config", str(config)]))
    assert (cfg.data.data_dir, cfg.data.cache_dir) == (str(pets), str(pets.parent / "caches"))


def test_ctrl_c_while_preparing_says_what_is_kept(folders, monkeypatch, capsys):
    """It said 'run the same command again to resume', but a cache half-built is not kept."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "load_dataset", interrupted)
    assert cli.main(["prepare", "--data-dir", str(folders[0]), "--quiet"]) == 130
    assert "python -m vit.data prepare: interrupted; a cache half-built is not kept (one complete " \
           "is): the same command builds what is missing" in capsys.readouterr().err


def test_a_data_folder_whose_name_is_not_utf8_gets_a_cache_dir(tmp_path):
    """A folder unpacked from a zip made on Windows (Latin-1 bytes, kept by Python as surrogates):
    its cache sub-folder is named from its bytes, not a UnicodeEncodeError."""
    import hashlib
    import os

    from vit.data.cache import dataset_cache_dir

    data = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    os.mkdir(data)
    folder = dataset_cache_dir(tmp_path / "cache", data)
    digest = hashlib.sha256(os.fsencode(str(Path(data).resolve()))).hexdigest()[:10]
    assert folder == tmp_path / "cache" / f"{Path(data).name}-{digest}"
