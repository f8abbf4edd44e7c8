"""What train.py will not write over in an --out that exists: a run to continue (last.npz: use
--resume), or what an earlier run kept (best.npz, metrics.jsonl) once its last.npz is gone (a
new run used to overwrite them silently). A folder of other files, or what a run that never
saved left (config.json only), is written into. And what --resume takes as the run's config: a
config.json that is not JSON, or disagrees with last.npz on what it depends on, is refused;
so is evaluate.py's --data-dir for a digits run, which reads no folder, and a change of an
image-folder run's data.layout. A resumed run's notes on changed values come from process 0.
An --out that cannot be written to is named with the hint its error calls for."""

import errno
import json
import os

import pytest

import resume
import train

QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1", "--set", "model.d_model=32",
         "--set", "model.mlp_dim=64", "--batch-size", "128", "--epochs", "1"]


@pytest.mark.parametrize("kept", [["last.npz"], ["best.npz"], ["metrics.jsonl"], ["best.npz", "metrics.jsonl"]])
def test_out_holding_a_runs_files_is_refused_before_any_work(kept, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in kept:
        (out / name).write_bytes(b"an earlier run's")
    with pytest.raises(SystemExit) as exit_:
        train.main([*QUICK, "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out {out}" in err, err
    assert ("--resume" if kept == ["last.npz"] else "choose another --out") in err, err
    assert all((out / name).read_bytes() == b"an earlier run's" for name in kept)


def test_out_holding_other_files_or_a_start_that_never_saved_is_used(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")  # what a start killed before its first checkpoint leaves
    assert train.main([*QUICK, "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.npz").exists()


def test_resume_without_last_npz_starts_only_a_run_that_never_saved(tmp_path, capsys):
    """--resume of a run with no last.npz starts it from the beginning: right for a start killed
    before its first checkpoint (config.json only), said so; with best.npz kept it would overwrite
    it, so that is refused, saying how to continue from best.npz."""
    out = tmp_path / "run"
    assert train.main([*QUICK, "--out", str(out)]) == 0
    (out / "last.npz").unlink()
    best = (out / "best.npz").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--resume", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "no last.npz there to continue from" in err, err
    assert f"cp {out / 'best.npz'} {out / 'last.npz'}" in err and (out / "best.npz").read_bytes() == best
    for name in ("best.npz", "metrics.jsonl", "curves.png"):
        (out / name).unlink()
    assert train.main(["--resume", str(out), "--no-progress"]) == 0
    assert "it has no last.npz (it stopped before its first checkpoint)" in capsys.readouterr().out


def test_resume_refuses_a_config_json_that_is_not_the_checkpoints(tmp_path, capsys):
    """config.json edited by hand or copied from another run resumed the weights and data position
    of one run as another (layers=2 weights under a 4-layer config: it trained); junk in it was
    a JSONDecodeError traceback."""
    out = tmp_path / "run"
    assert train.main([*QUICK, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["model"]["layers"] = 4
    for text, message in ((json.dumps(config), f"{out / 'config.json'} has model.layers = 4, but "
                                               f"{out / 'last.npz'} was saved by a run with model.layers = 1"),
                          ("not json", f"{out / 'config.json'} cannot be read as JSON")):
        (out / "config.json").write_text(text)
        with pytest.raises(SystemExit) as exit_:
            train.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, err


def test_evaluate_refuses_a_data_dir_for_a_digits_run(tmp_path, capsys):
    """Digits come with scikit-learn: evaluate.py RUN --data-dir DIR of a digits run would have
    evaluated on digits all the same, DIR unread; it is refused, naming the flag."""
    import evaluate

    out = tmp_path / "run"
    assert train.main([*QUICK, "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([str(out), "--data-dir", "elsewhere", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--data-dir elsewhere: {out} was trained on digits" in err, err
    assert evaluate.main([str(out), "--no-progress"]) == 0


def test_resume_fixed_data(tmp_path, capsys):
    """An image-folder run's data.layout fixes the images it was trained on (digits refuse a
    named layout outright, so test_train_faults' digits runs cannot reach it): on --resume a
    change is refused, naming the flag; its data.data_dir is taken silently. (data.image_size
    also sets model.image_size, refused as the parameters' shapes.)"""
    from vit import runconfig

    key, value = "layout", "tiny-imagenet"
    saved = runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": "imgs"}})
    changed = runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": "imgs", key: value}})
    flag = f"--set data.{key}={value}"
    with pytest.raises(resume.ResumeError) as e:
        resume.check_changes(saved, changed, {f"data.{key}": flag}, tmp_path)
    assert str(e.value).startswith(f"{flag}: --resume {tmp_path} continues that run, and "
                                   f"data.{key} fixes the images it was trained on"), e.value
    moved = runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": "elsewhere"}})
    resume.check_changes(saved, moved, {}, tmp_path)
    assert capsys.readouterr().err == ""


def test_resume_notes_come_from_process_0_only(tmp_path, capsys, monkeypatch):
    """--resume with a changed --lr: the note on it is printed once per run, by process 0, as
    the run's other output (here a finished run: nothing to train, so no step runs, and none of
    its files is rewritten)."""
    from vit import parallel

    out = tmp_path / "run"
    assert train.main([*QUICK, "--out", str(out)]) == 0
    capsys.readouterr()
    files = {f.name: f.read_bytes() for f in out.iterdir()}
    for main_process in (False, True):
        monkeypatch.setattr(parallel, "is_main_process", lambda: main_process)
        assert train.main(["--resume", str(out), "--no-progress", "--lr", "5e-4"]) == 0
        err = capsys.readouterr().err
        assert ("note: --lr 0.0005: resuming with train.lr = 0.0005" in err) is main_process, err
    # nothing was trained, so nothing is rewritten: config.json does not take the new --lr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == files


@pytest.mark.parametrize("code, hint", [(errno.EACCES, "; fix its permissions or choose another --out"),
                                        (errno.EROFS, "; choose another --out"),
                                        (errno.ENOENT, "; choose another --out")])
def test_an_unwritable_out_gets_the_hint_its_error_calls_for(tmp_path, capsys, monkeypatch, code,
                                                             hint):
    """Permissions are named only when they are what failed (--out /proc/x gave ENOENT and
    "fix its permissions")."""
    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(train.tempfile, "TemporaryFile", refused)
    with pytest.raises(SystemExit):
        train.check_writable(tmp_path / "run", "--out")
    err = capsys.readouterr().err
    assert f"is not writable ({os.strerror(code)}){hint}" in err, err
    with pytest.raises(SystemExit):
        train.check_writable(tmp_path, "--resume")
    assert "copy the run somewhere writable and --resume it there" in capsys.readouterr().err


def test_commands_offered_for_a_run_folder_with_a_space_are_shell_quoted(tmp_path, capsys):
    """A run directory such as "my run": each command a message offers (continue with --resume,
    cp best.npz to last.npz, evaluate the other checkpoint) is pasted into a shell, so the paths
    in it are quoted (shlex.quote); unquoted, the shell splits them into two arguments."""
    import evaluate  # noqa: PLC0415
    from shlex import quote  # noqa: PLC0415

    out = tmp_path / "my run"
    best, last = out / "best.npz", out / "last.npz"
    assert train.main([*QUICK, "--epochs", "2", "--stop-after-epoch", "1", "--out", str(out)]) == 130
    assert f"continue with python train.py --resume {quote(str(out))}" in capsys.readouterr().out
    sound = last.read_bytes()
    last.write_bytes(sound[: len(sound) // 2])  # damaged: best.npz is the way out
    with pytest.raises(SystemExit) as exit_:
        train.main(["--resume", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert f"cp {quote(str(best))} {quote(str(last))} and run python train.py --resume {quote(str(out))} " \
           "again" in err, err
    last.write_bytes(sound)
    best_bytes = best.read_bytes()
    best.write_bytes(best_bytes[: len(best_bytes) // 2])  # damaged: last.npz is the way out
    with pytest.raises(SystemExit):
        evaluate.main([str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert f"evaluate it with python evaluate.py {quote(str(out))} --checkpoint last" in err, err
    best.write_bytes(best_bytes)
    last.unlink()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--resume", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"cp {quote(str(best))} {quote(str(last))} and run again" in err, err
