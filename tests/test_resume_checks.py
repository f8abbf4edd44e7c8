"""resume.py, what train.py checks before it continues a run: a run whose config.json is gone
continues with the config its last.npz holds; --stop-after-epoch K at or before the run's
position, or past train.epochs, is refused (it trained one epoch more, or was ignored);
--accum-steps on --resume is told which steps divide the run's fixed batch size."""

import json
import os
import shutil
from pathlib import Path

import pytest

import resume
import train
from vit import checkpoint

QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
         "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128"]


def run_train(*args):
    return train.main([str(a) for a in args])


def usage_error(capsys, *args) -> str:
    """train.py with these flags ends in a usage error (exit code 2): its stderr."""
    with pytest.raises(SystemExit) as e:
        run_train(*args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A digits run stopped after epoch 1 of 2 (last.npz at the end of epoch 1)."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert run_train(*QUICK, "--epochs", 2, "--stop-after-epoch", 1, "--out", run) == 130
    return run


@pytest.fixture
def run_copy(one_epoch, tmp_path):
    return Path(shutil.copytree(one_epoch, tmp_path / "run"))


def files(run: Path) -> dict:
    return {f.name: f.read_bytes() for f in run.iterdir()}


def test_a_run_without_config_json_continues_with_its_checkpoints_config(run_copy, capsys):
    config = (run_copy / "config.json").read_text()
    (run_copy / "config.json").unlink()
    assert run_train("--resume", run_copy, "--no-progress") == 0
    captured = capsys.readouterr()
    assert f"--resume {run_copy}: no config.json there; continuing with the config " \
           f"{run_copy / 'last.npz'} was saved with" in captured.err, captured.err
    assert checkpoint.read_meta(run_copy / "last.npz")["epoch"] == 2
    assert (run_copy / "config.json").read_text() == config  # written again, as it was


def test_without_config_json_a_damaged_last_npz_is_named(run_copy, capsys):
    (run_copy / "config.json").unlink()
    (run_copy / "last.npz").write_bytes(b"PK\x03\x04 not really")
    err = usage_error(capsys, "--resume", run_copy)
    assert f"--resume {run_copy}: no config.json there, and {run_copy / 'last.npz'} is damaged" \
        in err, err


def test_a_folder_with_neither_is_no_run_directory(tmp_path, capsys):
    err = usage_error(capsys, "--resume", tmp_path)
    assert f"--resume {tmp_path}: no config.json and no last.npz there; is it a run directory?" \
        in err, err


def test_an_unreadable_config_json_says_it_may_be_removed(run_copy, capsys):
    (run_copy / "config.json").write_text("{ not json")
    err = usage_error(capsys, "--resume", run_copy)
    assert "cannot be read as JSON" in err and "or remove it to continue with the config" in err


def test_stop_after_an_epoch_already_done_is_refused_and_touches_nothing(run_copy, capsys):
    """It trained epoch 2 and then stopped (1 <= 2), although epoch 1 was asked for."""
    before = files(run_copy)
    err = usage_error(capsys, "--resume", run_copy, "--stop-after-epoch", 1)
    assert f"--stop-after-epoch 1: --resume {run_copy} is past it already (its last.npz is at " \
           "the end of epoch 1); give epoch 2, or leave the flag out" in err, err
    assert files(run_copy) == before


def test_stop_after_an_epoch_past_the_last_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    err = usage_error(capsys, *QUICK, "--epochs", 2, "--stop-after-epoch", 3, "--out", run)
    assert "--stop-after-epoch 3 is past train.epochs = 2, where the run ends anyway; give an " \
           "epoch up to 2, or --epochs 3 to train that long" in err, err
    assert not run.exists()


@pytest.mark.parametrize("meta, epochs, k, ok", [
    (None, 5, 1, True), (None, 5, 5, True), (None, 5, 6, False),
    ({"epoch": 2, "step_in_epoch": 0}, 5, 2, False), ({"epoch": 2, "step_in_epoch": 0}, 5, 3, True),
    ({"epoch": 2, "step_in_epoch": 7}, 5, 2, False), ({"epoch": 2, "step_in_epoch": 7}, 5, 3, True),
    ({"epoch": 5, "step_in_epoch": 0}, 5, 5, True)])  # finished: nothing to stop, nothing trains
def test_stop_after_epoch_k_must_lie_ahead_of_the_run(meta, epochs, k, ok):
    if ok:
        resume.check_position(meta, epochs, k, Path("run"))
    else:
        with pytest.raises(resume.ResumeError, match="--stop-after-epoch"):
            resume.check_position(meta, epochs, k, Path("run"))


def test_mid_epoch_position_is_said_in_the_refusal():
    with pytest.raises(resume.ResumeError, match=r"at the end of epoch 2, and 7 steps into "
                                                 r"epoch 3\); give an epoch from 3 to 5"):
        resume.check_position({"epoch": 2, "step_in_epoch": 7}, 5, 2, Path("run"))


def test_accum_steps_on_resume_offers_steps_that_divide_the_fixed_batch(run_copy, capsys):
    err = usage_error(capsys, "--resume", run_copy, "--accum-steps", 3)
    assert f"--accum-steps 3: --resume {run_copy} keeps its batch size of 128, which does not " \
           "split into 3 micro-batches of equal size; give accumulation steps that divide 128 " \
           "(2, 4, 8, 16, 32, 64, ...)" in err, err
    assert "pick a batch size" not in err
    err = usage_error(capsys, "--resume", run_copy, "--set", "train.accum_steps=5")
    assert f"--set train.accum_steps=5: --resume {run_copy} keeps its batch size of 128" in err, err
    assert json.loads((run_copy / "config.json").read_text())["train"]["accum_steps"] == 1


def test_a_last_npz_without_a_config_cannot_stand_in_for_config_json(tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint.save(run / "last.npz", {}, {"epoch": 1, "step_in_epoch": 0})
    err = usage_error(capsys, "--resume", run)
    assert f"no config.json there, and {run / 'last.npz'} holds no config to take its place" in err


def test_what_a_checkpoint_depends_on_is_fixed_on_resume():
    assert set(resume.RESUME_FIXED) == {"train.batch_size", "train.seed", "train.repeat_augment",
                                        "train.init_from",
                                        "model", "data.dataset", "data.layout", "data.image_size"}
    assert not set(resume.RESUME_FIXED) & set(resume.RESUME_SAME_RUN)


def test_a_run_one_step_past_its_epochs_is_refused():
    resume.check_position({"epoch": 3, "step_in_epoch": 0}, 3, None, Path("run"))  # finished
    with pytest.raises(resume.ResumeError, match="epoch 4, step 1, past train.epochs = 3"):
        resume.check_position({"epoch": 3, "step_in_epoch": 1}, 3, None, Path("run"))


def test_config_json_values_the_checkpoint_was_not_saved_with_are_named(run_copy, capsys):
    """config.json edited by hand (or left by a resume that stopped before its first checkpoint)
    on a key the checkpoint does not fix: the run took config.json's value, a deleted key its
    default, without a word. A flag still wins, with its own note and none for config.json."""
    from vit import runconfig

    path, last = run_copy / "config.json", run_copy / "last.npz"
    config = json.loads(path.read_text())
    was, decay = config["train"].pop("lr"), config["train"]["weight_decay"]
    config["train"]["weight_decay"] = decay + 0.125
    path.write_text(json.dumps(config))
    default = runconfig.from_dict({}).to_dict()["train"]["lr"]
    assert default != was  # the digits run's lr is its config's, not the default
    assert run_train("--resume", run_copy, "--no-progress", "--set", "train.weight_decay=0.5") == 0
    err = capsys.readouterr().err
    assert f"note: {path} has no train.lr (the default is {default!r}), but {last} was saved " \
           f"with {was!r}: resuming with {default!r}" in err, err
    assert "has train.weight_decay" not in err, err
    assert f"train.weight_decay = 0.5 (the run had {decay + 0.125!r})" in err, err


def test_a_config_json_value_kept_by_hand_is_named_and_a_same_run_key_is_not(run_copy, capsys):
    """config.json edited by hand on a key it still has (no flag sets it): the note gives
    config.json's value, the one the run resumes with. A key of RESUME_SAME_RUN (data.workers:
    how the cache is decoded, not what it holds) is taken without a note."""
    path, last = run_copy / "config.json", run_copy / "last.npz"
    config = json.loads(path.read_text())
    decay = config["train"]["weight_decay"]
    config["train"]["weight_decay"] = decay + 0.125
    config["data"]["workers"] = (config["data"].get("workers") or 1) + 3
    path.write_text(json.dumps(config))
    assert run_train("--resume", run_copy, "--no-progress") == 0
    err = capsys.readouterr().err
    assert f"note: {path} has train.weight_decay = {decay + 0.125!r}, but {last} was saved with " \
           f"{decay!r}: resuming with {decay + 0.125!r} (--set train.weight_decay=... chooses)" in err, err
    assert "data.workers" not in err, err


def test_a_run_being_trained_is_not_trained_by_a_second_train_py(run_copy, tmp_path, capsys):
    """--resume RUN (or --out RUN) while another train.py trains RUN: both trained to the end,
    writing last.npz, best.npz and metrics.jsonl over each other. The other here holds the run's
    lock as a trainer does (a flock of its own on RUN/.train.lock, as another process's would be)."""
    import fcntl

    from vit import runlock

    before = files(run_copy)
    with open(run_copy / runlock.LOCK_NAME, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("4242\n")
        other.flush()
        for args in (["--resume", run_copy], [*QUICK, "--out", run_copy]):
            err = usage_error(capsys, *args, "--no-progress")
            assert f"{run_copy}: another train.py (pid 4242) is training this run now; wait for " \
                   "it to end, or stop it (Ctrl-C saves last.npz) and --resume it then" in err, err
        assert {k: v for k, v in files(run_copy).items() if k != runlock.LOCK_NAME} == \
               {k: v for k, v in before.items() if k != runlock.LOCK_NAME}
    # the other one has ended (its lock file left, as by a killed run): this one trains, and
    # removes the lock file as it ends
    assert run_train("--resume", run_copy, "--no-progress") == 0
    assert not (run_copy / runlock.LOCK_NAME).exists()
    # held, the file names this process alone, not the one before it too ("4242\n<pid>")
    (run_copy / runlock.LOCK_NAME).write_text("4242\n")
    runlock.hold(run_copy)
    try:
        assert (run_copy / runlock.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert not flock_free(run_copy)
    finally:
        runlock.release(run_copy)
    assert not (run_copy / runlock.LOCK_NAME).exists()


def flock_free(run: Path) -> bool:
    """Whether RUN/.train.lock can be flocked now (from a file of its own, as another process)."""
    import fcntl

    from vit import runlock

    with open(run / runlock.LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_train_main_lets_go_of_the_run_when_it_returns(tmp_path, monkeypatch, capsys):
    """train.main called from Python (a notebook): once it returns, another train.py may take
    the run; a lock kept until the interpreter exits refused every --resume of it. While it
    trains, the run is locked; a new folder from the moment it is made (another run may pick
    it while the data loads). A refused start leaves no lock file in a folder it was given."""
    from vit import runlock, training

    seen = []
    train_ = training.train

    def train_and_look(run, *args):
        seen.append(not flock_free(run.run_dir))
        return train_(run, *args)
    monkeypatch.setattr(training, "train", train_and_look)
    fresh = tmp_path / "fresh"
    assert run_train(*QUICK, "--epochs", 1, "--out", fresh) == 0
    assert seen == [True] and not (fresh / runlock.LOCK_NAME).exists() and runlock._held == {}
    given = tmp_path / "given"
    given.mkdir()
    (given / "best.npz").write_bytes(b"an earlier run's")
    assert "holds best.npz of an earlier run" in usage_error(capsys, *QUICK, "--out", given)
    assert sorted(f.name for f in given.iterdir()) == ["best.npz"]


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder_lock_file_included(
        tmp_path, monkeypatch):
    from vit import training

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped before the first checkpoint")
    monkeypatch.setattr(training, "train", stopped)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped before the first checkpoint"):
        run_train(*QUICK, "--epochs", 1, "--out", out)
    assert not out.exists(), list(out.iterdir())


def test_a_new_folder_taken_by_another_run_while_the_data_loads_is_a_message(tmp_path, monkeypatch,
                                                                             capsys):
    """--out NEW: train.py locks the folder as it makes it, after the data loaded; another run
    may have made and locked it meanwhile: a usage error naming it, not a Busy traceback."""
    import fcntl

    from vit import runlock, training

    out, others = tmp_path / "run", []
    load_data = training.load_data

    def another_run_starts(*args, **kwargs):
        out.mkdir()
        other = open(out / runlock.LOCK_NAME, "a+")  # noqa: SIM115
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("4343\n")
        other.flush()
        others.append(other)
        return load_data(*args, **kwargs)
    monkeypatch.setattr(training, "load_data", another_run_starts)
    try:
        err = usage_error(capsys, *QUICK, "--epochs", 1, "--out", out)
    finally:
        for other in others:
            other.close()
    assert f"{out}: another train.py (pid 4343) is training this run now" in err, err
    assert sorted(f.name for f in out.iterdir()) == [runlock.LOCK_NAME]  # no config.json of ours


def test_without_flock_or_a_lock_file_the_run_goes_on_unlocked(tmp_path, monkeypatch):
    """A file system without flock (Lustre without -o flock), or a lock file that cannot be
    made: the run trains as before, without a lock, not a traceback."""
    import errno

    from vit import runlock

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / runlock.LOCK_NAME).mkdir()  # open() of it fails
    runlock.hold(tmp_path / "dir")
    assert runlock._held == {}

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "flock", no_flock)
    runlock.hold(tmp_path)
    assert runlock._held == {}


def test_a_changed_data_image_size_on_resume_is_refused_naming_its_flag(tmp_path):
    """--set data.image_size=N changes model.image_size too (the model follows the data); the
    refusal named 'model.image_size', which no flag had set, instead of the flag given."""
    from vit import runconfig

    saved = runconfig.from_dict({"model": {"image_size": 64}, "data": {"dataset": "image-folder"}})
    flag = {"data.image_size": "--set data.image_size=96"}
    cfg = runconfig.from_dict({"model": {"image_size": 64},
                               "data": {"dataset": "image-folder", "image_size": 96}}, "c", flag)
    with pytest.raises(resume.ResumeError) as err:
        resume.check_changes(saved, cfg, flag, tmp_path)
    assert str(err.value).startswith(f"--set data.image_size=96: --resume {tmp_path} continues "
                                     "that run, and data.image_size fixes"), err.value
    # the size it was trained at, given by a flag: the same images, no refusal (it was one)
    same = {"data.image_size": "--set data.image_size=64"}
    cfg = runconfig.from_dict({"model": {"image_size": 64},
                               "data": {"dataset": "image-folder", "image_size": 64}}, "c", same)
    assert resume.check_changes(saved, cfg, same, tmp_path) == []
