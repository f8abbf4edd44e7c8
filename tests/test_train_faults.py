"""What train.py and evaluate.py do with bad input and faults: each is a message naming the file or
flag at fault and saying what is wrong (no traceback), found before any work, and leaving nothing
half-made behind.

Covers: damaged / junk / foreign checkpoints (with the other checkpoint offered), an unwritable run
directory or --out, a failed start, a corrupt image's hint, config errors blamed on the flag or file
they came from, --help, and the exit code of --stop-after-epoch."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
import resume
import train
from vit import runconfig
from vit.data.fake import fake_wnid, write_fake_image_folder, write_fake_tiny_imagenet
from watch import run_watched

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
         "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128"]


def run_train(*args):
    return train.main([str(a) for a in args])


def exits_with_message(capsys, fn, *args) -> str:
    """fn(*args) must end by a usage error (exit code 2, as argparse does): its stderr."""
    with pytest.raises(SystemExit) as e:
        fn([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch digits run: config.json, metrics.jsonl, best.npz and last.npz."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(*QUICK, "--epochs", 2, "--out", run) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------
# damaged checkpoints


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def junk(path: Path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def foreign(path: Path):
    np.savez(path.with_suffix(""), weights=np.zeros(3))  # np.savez adds the .npz


DAMAGE = {"truncated": (truncate, "damaged"), "junk": (junk, "not an .npz"),
          "not-a-checkpoint": (foreign, "not a checkpoint")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_a_damaged_last_npz_names_it_and_offers_best(run_copy, capsys, damage):
    spoil, what = DAMAGE[damage]
    spoil(run_copy / "last.npz")
    err = exits_with_message(capsys, train.main, "--resume", run_copy, "--no-progress")
    assert str(run_copy / "last.npz") in err and what in err, err
    assert str(run_copy / "best.npz") in err and "--resume" in err, err  # the way out offered


@pytest.mark.parametrize("damage", DAMAGE)
def test_evaluate_a_damaged_best_npz_names_it_and_offers_last(run_copy, capsys, damage):
    spoil, what = DAMAGE[damage]
    spoil(run_copy / "best.npz")
    err = exits_with_message(capsys, evaluate.main, run_copy, "--no-progress")
    assert str(run_copy / "best.npz") in err and what in err, err
    assert "--checkpoint last" in err, err
    assert "pickled" not in err and "'__meta__'" not in err.replace(str(run_copy), "")


def test_evaluate_names_a_missing_run_a_checkpoint_given_for_its_run_and_a_missing_image(
        finished_run, tmp_path, capsys):
    err = exits_with_message(capsys, evaluate.main, tmp_path / "nosuch", "--no-progress")
    assert f"{tmp_path / 'nosuch'} does not exist" in err, err
    err = exits_with_message(capsys, evaluate.main, finished_run / "best.npz", "--no-progress")
    assert f"{finished_run / 'best.npz'} is a checkpoint file; give the run directory that holds " \
           f"it: python evaluate.py {finished_run} --checkpoint best" in err, err
    err = exits_with_message(capsys, evaluate.main, finished_run, "--predict", tmp_path / "no.png",
                             "--per-class")
    assert f"{tmp_path / 'no.png'}: no such image file" in err and "cannot decode" not in err, err
    assert "note: with --predict nothing else is evaluated: --per-class ignored" in err, err
    err = exits_with_message(capsys, evaluate.main, finished_run, "--predict", tmp_path / "no.png",
                             "--saliency", 3, "--attention", 2)
    assert "note: with --predict nothing else is evaluated: --saliency and --attention ignored" in err


def test_evaluate_a_damaged_last_npz_offers_best(run_copy, capsys):
    truncate(run_copy / "last.npz")
    err = exits_with_message(capsys, evaluate.main, run_copy, "--checkpoint", "last", "--no-progress")
    assert str(run_copy / "last.npz") in err and "--checkpoint best" in err, err


def test_predict_with_a_checkpoint_of_something_else_names_the_file(tmp_path, capsys):
    """An .npz in the run's place without the run's config: a message naming the file and what
    it lacks, not the bare KeyError 'config'."""
    from PIL import Image  # noqa: PLC0415

    from vit import checkpoint  # noqa: PLC0415

    checkpoint.save(tmp_path / "best.npz", {"params": {"w": np.zeros(2)}}, {"epoch": 1})
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path), "--predict", str(image)])
    err = capsys.readouterr().err
    assert str(tmp_path / "best.npz") in err and "config" in err and "Traceback" not in err, err


@pytest.mark.parametrize("flag", ["--batch-size", "--saliency"])
def test_evaluate_counts_must_be_positive(tmp_path, capsys, flag):
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(tmp_path), flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be a positive integer" in err, err


def test_both_checkpoints_damaged_offers_nothing_false(run_copy, capsys):
    truncate(run_copy / "last.npz")
    junk(run_copy / "best.npz")
    err = exits_with_message(capsys, train.main, "--resume", run_copy, "--no-progress")
    assert str(run_copy / "last.npz") in err and "damaged" in err
    assert "cp " not in err  # best.npz is no way out here
    assert str(run_copy / "best.npz") in err and "not an .npz" in err  # ... and says why


# ----------------------------------------------------------------------------------------------
# unwritable run directory / --out: found before any work


# Run as root, a process writes into a directory without write permission all the same
# (CAP_DAC_OVERRIDE). This wrapper drops that capability from the bounding set, then execs the
# command, so permissions bind it as they bind any other user. Exit 77: it could not.
DROP_DAC_OVERRIDE = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        print("prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE):", os.strerror(ctypes.get_errno()))
        sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


def train_unprivileged(tmp_path, *args):
    """python train.py in a subprocess that file permissions bind, even when the tests run as root."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = run_watched([sys.executable, "-c", DROP_DAC_OVERRIDE, sys.executable, ROOT / "train.py",
                        *args], log=tmp_path / "train.log", env=env, cwd=ROOT)
    if proc.returncode == 77:
        pytest.skip(f"cannot make a subprocess that file permissions bind: {proc.text()}")
    return proc


@pytest.fixture
def read_only(tmp_path):
    made = []

    def make(path: Path) -> Path:
        path.chmod(0o555)
        made.append(path)
        return path
    yield make
    for path in made:
        path.chmod(0o755)


def test_unwritable_run_directory_is_found_before_any_work(run_copy, read_only, tmp_path):
    metrics = (run_copy / "metrics.jsonl").read_text()
    read_only(run_copy)
    proc = train_unprivileged(tmp_path, "--resume", run_copy, "--epochs", 3, "--no-progress")
    out = proc.text()
    assert proc.returncode == 2, out
    assert f"{run_copy} is not writable" in out and "Traceback" not in out, out
    assert f"resuming {run_copy}" not in out and "epoch 3:" not in out  # nothing was trained
    assert (run_copy / "metrics.jsonl").read_text() == metrics


def test_unwritable_out_parent_is_found_before_any_work(read_only, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    read_only(parent)
    proc = train_unprivileged(tmp_path, *QUICK, "--epochs", 1, "--out", parent / "run")
    out = proc.text()
    assert proc.returncode == 2, out
    assert "--out" in out and str(parent) in out and "not writable" in out, out
    assert "Traceback" not in out and "run directory:" not in out, out
    assert not (parent / "run").exists()


def test_out_inside_a_file_is_a_message(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    err = exits_with_message(capsys, train.main, *QUICK, "--out", tmp_path / "afile" / "run")
    assert f"--out {tmp_path / 'afile' / 'run'}" in err and "not a directory" in err, err


# ----------------------------------------------------------------------------------------------
# a failed start leaves nothing behind


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    err = exits_with_message(capsys, train.main, *QUICK, "--batch-size", 5000, "--out", out)
    assert "train.batch_size 5000 is larger than the training set (1437 images); give a smaller --batch-size" in err
    assert not out.exists(), list(out.iterdir())


def test_corrupt_image_hint_is_the_train_flag_and_nothing_is_left(tmp_path, capsys):
    root = write_fake_tiny_imagenet(tmp_path, num_classes=2, train_per_class=4, val_images=2)
    bad = root / "train" / fake_wnid(1) / "images" / f"{fake_wnid(1)}_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated mid-scan
    out = tmp_path / "run"
    tiny = ["--dataset", "tiny-imagenet", "--data-dir", root, "--no-progress", "--epochs", 1,
            "--batch-size", 4, "--set", "model.layers=1", "--set", "model.d_model=16",
            "--set", "model.heads=2", "--set", "model.mlp_dim=16", "--set", "data.workers=1",
            "--out", out]
    err = exits_with_message(capsys, train.main, *tiny)
    assert str(bad) in err and "--set data.skip_bad_images=true" in err, err
    assert not (root / "vitfuse-cache").exists()
    assert not out.exists()
    # ... and the flag it names works
    assert run_train(*tiny, "--set", "data.skip_bad_images=true") == 0
    assert (out / "last.npz").exists()


# ----------------------------------------------------------------------------------------------
# config errors name their source


@pytest.mark.parametrize("flags, blamed", [
    (["--set", "train.bogus=1"], "--set train.bogus=1"),
    (["--epochs", "-3"], "--epochs -3"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--set", "model.heads=3"], "--set model.heads=3"),        # d_model 32 is not divisible by 3
    (["--set", "train.epochs=many"], "--set train.epochs=many"),
    (["--set", "nosuch.key=1"], "--set nosuch.key=1"),
    (["--stop-after-epoch", "0"], "--stop-after-epoch: must be a positive integer"),
])
def test_config_error_names_the_flag(capsys, flags, blamed):
    err = exits_with_message(capsys, train.main, *QUICK, *flags)
    assert blamed in err and "digits.toml" not in err, err


def test_crop_padding_the_images_cannot_take_is_a_message(tmp_path, capsys):
    """Reflect padding needs images larger than the pad; known once the data is loaded (digits:
    8x8), before any step (it used to be a traceback from inside the first jitted step)."""
    err = exits_with_message(capsys, train.main, *QUICK, "--set", "train.crop_pad=8",
                             "--out", tmp_path / "run")
    assert "train.crop_pad 8" in err and "8x8" in err, err
    assert not (tmp_path / "run").exists()


def test_image_size_that_the_patch_does_not_divide_suggests_one_before_decoding(tmp_path, capsys):
    root = write_fake_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=1)
    err = exits_with_message(capsys, train.main, "--data-dir", root, "--out", tmp_path / "r",
                             "--set", "data.image_size=50", "--no-progress")
    assert "image_size=50 is not divisible by patch_size=8" in err, err
    assert "50x50 (data.image_size)" in err and "--set model.patch_size=5" in err, err
    assert not (root / "vitfuse-cache").exists()  # found before any image was decoded


def test_a_model_for_other_images_gets_a_patch_size_for_the_datasets(tmp_path, capsys):
    root = write_fake_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=1)  # 64x64x3
    err = exits_with_message(capsys, train.main, "--data-dir", root, "--no-progress", "--set",
                             "model.image_size=9", "--set", "model.patch_size=3", "--out", tmp_path / "r")
    assert "--set model.patch_size=3: ViTConfig.image_size=64 is not divisible by patch_size=3 (the " \
           "dataset's images are 64x64" in err and "divides 64, e.g. --set model.patch_size=8)" in err, err
    assert not (tmp_path / "r").exists()


def test_config_error_in_the_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "mine.toml"
    config.write_text("[train]\nepochs = -1\n[data]\ndataset = 'digits'\n")
    err = exits_with_message(capsys, train.main, "--config", config, "--no-progress")
    assert f"--config {config}" in err and "train.epochs" in err, err
    # a flag that fixes the file's value is not blamed, and then the run is fine to start
    err = exits_with_message(capsys, train.main, "--config", config, "--epochs", 2,
                             "--batch-size", 5000, "--no-progress")
    assert "train.epochs" not in err and "larger than the training set" in err


@pytest.mark.parametrize("flags, fixed", [
    (["--batch-size", 64], "train.batch_size"),       # the checkpoint's data position
    (["--seed", 7], "train.seed"), (["--set", "train.repeat_augment=3"], "train.repeat_augment"),  # order
    (["--set", "model.layers=2"], "model.layers"),     # the params' shapes
    (["--dataset", "tiny-imagenet"], "data.dataset"),  # the images (data.layout: test_run_dir.py)
])
def test_resume_refuses_changing_what_the_checkpoint_depends_on(finished_run, capsys, flags,
                                                                fixed):
    before = (finished_run / "config.json").read_text()
    err = exits_with_message(capsys, train.main, "--resume", finished_run, *flags, "--epochs", 3)
    assert f"{flags[0]} {flags[1]}" in err, err  # the flag at fault
    assert fixed in err and "new run" in err, err
    assert (finished_run / "config.json").read_text() == before


def test_resume_takes_other_changes_with_a_note(run_copy, capsys):
    """--lr, --accum-steps and (under digits.toml's cosine schedule, which it stretches) --epochs
    on --resume: taken, each named in a note."""
    assert train.main(["--resume", str(run_copy), "--no-progress", "--epochs", "3", "--lr",
                       "5e-4", "--accum-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: --lr 0.0005: resuming with train.lr = 0.0005" in err, err
    assert "note: --accum-steps 2: resuming with train.accum_steps = 2 (the run had 1)" in err
    assert "epoch 3/3" not in err, err  # --no-progress: no progress bar (its "epoch 3/3: 100%|")
    assert ("note: --epochs 3: resuming with train.epochs = 3 (the run had 2); the cosine "
            "learning-rate schedule now ends at epoch 3") in err, err
    saved = json.loads((run_copy / "config.json").read_text())["train"]
    assert (saved["lr"], saved["accum_steps"], saved["epochs"]) == (5e-4, 2, 3)


def test_more_epochs_under_a_constant_schedule_is_the_same_run_going_on(capsys):
    saved = runconfig.from_dict({"train": {"schedule": "constant", "epochs": 2}})
    longer = runconfig.from_dict({"train": {"schedule": "constant", "epochs": 5}})
    assert resume.check_changes(saved, longer, {"train.epochs": "--epochs 5"}, Path("run")) == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name, before, after", [
    ("data.data_dir", "/old/data", "/new/data"), ("data.workers", 2, 8),
    ("data.device_budget_mb", 2048, 0), ("train.checkpoint_minutes", 30.0, 5.0)])
def test_what_leaves_the_run_as_it_was_gets_no_note_under_either_schedule(capsys, name, before,
                                                                           after):
    section, key = name.split(".")
    for schedule in ("constant", "cosine"):
        saved, changed = (runconfig.from_dict({"train": {"schedule": schedule}, section: {key: v}})
                          for v in (before, after))
        assert not resume.check_changes(saved, changed, {name: f"--set {name}={after}"}, "r")
    assert capsys.readouterr().err == ""


def test_resume_with_fewer_epochs_than_the_run_has_done_is_refused(finished_run, capsys):
    """A (cosine) run at the end of epoch 2 resumed with --epochs 1 would end at once, exit code 0;
    it is a message naming what to give (3; it said 2: 'all done'), nothing else is touched."""
    before = {f.name: f.read_bytes() for f in finished_run.iterdir()}
    err = exits_with_message(capsys, train.main, "--resume", finished_run, "--epochs", 1,
                             "--no-progress")
    assert f"--resume {finished_run}: its last.npz is at the end of epoch 2, past train.epochs = 1; " \
           "give --epochs 3 or more to continue it" in err and "note:" not in err, err
    assert {f.name: f.read_bytes() for f in finished_run.iterdir()} == before
    resume.check_position({"epoch": 3, "step_in_epoch": 0}, 3, None, finished_run)  # finished
    with pytest.raises(resume.ResumeError, match="epoch 4, step 1, past train.epochs = 3; give --epochs 4"):
        resume.check_position({"epoch": 3, "step_in_epoch": 1}, 3, None, finished_run)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(run_copy, capsys):
    assert run_train("--resume", run_copy, "--no-progress") == 0
    out = capsys.readouterr().out  # and its data is not loaded
    assert f"resuming {run_copy}: all 2 epochs are done already, nothing to train" in out and "data:" not in out, out


def test_config_error_on_resume_names_the_flag(finished_run, capsys):
    err = exits_with_message(capsys, train.main, "--resume", finished_run, "--epochs", "-3")
    assert "--epochs -3" in err and "config.json" not in err, err


def test_a_run_directory_that_cannot_be_one_is_refused_before_any_work(finished_run, tmp_path, capsys):
    """--out a finished run (its checkpoints would be overwritten), --out a file, --resume a folder
    without config.json: each a usage error naming the flag and the path, and nothing written."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = sorted(p.name for p in finished_run.iterdir())
    cases = [(["--out", finished_run], f"--out {finished_run} already holds a run (last.npz); "
                                       f"continue it with --resume {finished_run}"),
             (["--out", a_file], f"--out {a_file} is a file, not a directory"),
             (["--out", a_file / "run"], f"--out {a_file / 'run'}: {a_file} is a file, not a directory"),
             (["--resume", empty], f"--resume {empty}: no config.json and no last.npz"),
             (["--resume", tmp_path / "nosuch"], f"--resume {tmp_path / 'nosuch'}: no such directory"),
             (["--resume", a_file], f"--resume {a_file}: a file, not a run directory")]
    for flags, message in cases:
        err = exits_with_message(capsys, train.main, *QUICK, *flags)
        assert message in err, (flags, err)
    assert sorted(p.name for p in finished_run.iterdir()) == before
    assert a_file.read_text() == "not a run" and not any(empty.iterdir())


# ----------------------------------------------------------------------------------------------
# --help and exit codes


@pytest.mark.parametrize("parser", [train.build_parser, evaluate.build_parser])
def test_help_states_each_default_once(parser):
    text = parser().format_help()
    entries = [e for e in text.split("\n  -") if e.strip()]
    for entry in entries:
        assert entry.count("default") <= 1, entry
    assert "(default: None)" not in text and "(default: False)" not in text


def test_stop_after_epoch_exits_like_an_interrupt(tmp_path, capsys):
    """--stop-after-epoch stops early with a checkpoint, as Ctrl-C does: the same exit code."""
    run = tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 2, "--stop-after-epoch", 1, "--out", run) \
        == train.EXIT_INTERRUPTED == 130
    assert "--resume" in capsys.readouterr().out
    assert run_train("--resume", run, "--no-progress") == 0  # done: 0
    for doc in (train.__doc__, (ROOT / "README.md").read_text()):
        assert "130" in doc and "--stop-after-epoch" in doc


def test_stop_after_the_last_epoch_is_done(tmp_path, capsys):
    """--stop-after-epoch K with K the last epoch stops nothing early: every epoch is done, exit 0
    (130 would tell a script to resume a finished run)."""
    run = tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 1, "--stop-after-epoch", 1, "--out", run) == 0
    out = capsys.readouterr().out
    assert "done: best val top-1" in out and "stopping after epoch" not in out


def test_a_dataset_of_non_square_images_is_a_run_error():
    """The model takes square images: a dataset of 8x10 ones (from a loader of one's own) is
    refused naming both sides, not fitted to a model that cannot read them."""
    from types import SimpleNamespace

    from vit import runconfig, training

    cfg = runconfig.from_dict({"model": {"image_size": 8, "patch_size": 2}})
    data = SimpleNamespace(images=np.zeros((2, 8, 10, 3), np.uint8), num_classes=4)
    with pytest.raises(training.RunError, match="images must be square, the dataset has 8x10"):
        training.fit_model_to_data(cfg, data)
