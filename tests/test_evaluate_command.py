"""evaluate.py's command around the evaluation: Ctrl-C is a message and exit code 130 naming
what was written (no traceback), the output names every file written and the op set, op flags
that do not apply get a note, and a file given for the run directory is told what to give. The
evaluation itself is faked here (tests/test_explain.py evaluates real runs)."""

from types import SimpleNamespace

import numpy as np
import pytest

import evaluate
from sigint import ctrl_c_swallowed_by_a_gc_callback
from vit import ViTConfig, explain, predict


class Left(Exception):
    """os._exit, made to return to the test."""


def interrupted(*args):
    """A stand-in for a step of evaluate.py that a Ctrl-C stops."""
    raise KeyboardInterrupt


@pytest.fixture
def faked(monkeypatch, tmp_path):
    """evaluate.py on a faked run of 2 classes; -> (run directory, os._exit's codes)."""
    exits = []

    def leave(code):
        exits.append(code)
        raise Left
    monkeypatch.setattr(evaluate.os, "_exit", leave)
    monkeypatch.setattr(evaluate, "load_run", lambda *args: SimpleNamespace(model=ViTConfig()))
    monkeypatch.setattr(explain, "load_split", lambda *args, **kwargs: "val")
    result = {"checkpoint": str(tmp_path / "last.npz"), "epoch": 1, "step_in_epoch": 4,
              "top1": 0.5, "top5": 1.0, "loss": 0.7, "count": 4,
              "per_class": [("a", 1, 2), ("b", 1, 2)], "confusion": np.ones((2, 2), np.int64),
              "class_names": ["a", "b"]}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args: dict(result))

    def write_confusion(confusion, names, run_dir, checkpoint):
        png = tmp_path / f"confusion-{checkpoint}.png"
        png.write_bytes(b"png")
        return {"png": png, "shown": names}
    monkeypatch.setattr(explain, "write_confusion", write_confusion)
    return tmp_path, exits


def test_the_output_names_every_file_written(faked, capsys):
    run, _ = faked
    assert evaluate.main([str(run), "--checkpoint", "last", "--per-class"]) == 0
    out = capsys.readouterr().out
    # where last.npz was saved, as train.py says it ("saved ... at epoch 2, step 4")
    assert "last.npz (mid-epoch: epoch 2, step 4): top-1 50.00%" in out, out
    assert f"confusion matrix: {run / 'confusion-last.png'}" in out, out
    assert f"results: {run / 'eval-last.json'}" in out, out
    assert (run / "eval-last.json").exists()


def test_ctrl_c_names_what_was_written_and_exits_130(faked, monkeypatch, capsys):
    run, exits = faked
    monkeypatch.setattr(explain, "write_saliency", interrupted)
    with pytest.raises(Left):
        evaluate.main([str(run), "--per-class", "--saliency", "2"], standalone=True)
    assert exits == [evaluate.EXIT_INTERRUPTED]
    err = capsys.readouterr().err
    assert f"evaluate.py: interrupted (Ctrl-C): wrote only {run / 'confusion-best.png'}" in err, err
    assert "Traceback" not in err and not (run / "eval-best.json").exists()


def test_ctrl_c_names_every_figure_written_before_it(faked, monkeypatch, capsys):
    run, exits = faked

    def write_saliency(run_, val, n, run_dir, checkpoint):
        png = run / f"saliency-{checkpoint}.png"
        png.write_bytes(b"png")
        return {"png": png, "labels": [0] * n}

    monkeypatch.setattr(explain, "write_saliency", write_saliency)
    monkeypatch.setattr(explain, "write_attention", interrupted)
    with pytest.raises(Left):
        evaluate.main([str(run), "--per-class", "--saliency", "2", "--attention", "2"],
                      standalone=True)
    assert f"wrote only {run / 'confusion-best.png'}, {run / 'saliency-best.png'}" \
        in capsys.readouterr().err


def test_a_checkpoint_of_an_epochs_end_is_named_by_that_epoch(faked, monkeypatch, capsys):
    run, _ = faked
    result = evaluate.evaluate_run()
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args: {**result, "step_in_epoch": 0})
    assert evaluate.main([str(run), "--checkpoint", "last"]) == 0
    assert "last.npz (epoch 1): top-1" in capsys.readouterr().out


def test_ctrl_c_before_anything_is_written(faked, monkeypatch, capsys):
    run, exits = faked
    monkeypatch.setattr(evaluate, "load_run", interrupted)
    with pytest.raises(Left):
        evaluate.main([str(run)], standalone=True)
    assert exits == [evaluate.EXIT_INTERRUPTED]
    assert "evaluate.py: interrupted (Ctrl-C): wrote nothing" in capsys.readouterr().err


def test_ctrl_c_reaches_a_python_caller(faked, monkeypatch):
    run, exits = faked
    monkeypatch.setattr(evaluate, "load_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([str(run)])
    assert exits == []


def test_the_result_line_names_the_op_set(faked, capsys):
    run, _ = faked
    assert evaluate.main([str(run)]) == 0
    assert "on 4 validation images (reference jnp layers (vit/layers.py))" in capsys.readouterr().out


def test_op_flags_that_do_not_apply_get_a_note(faked, monkeypatch, capsys):
    run, _ = faked
    monkeypatch.setattr(evaluate, "predict", lambda args: 0)
    assert evaluate.main([str(run), "--predict", "a.png", "--fused", "--interpret"]) == 0
    assert "note: --fused --interpret ignored: --predict runs the float32 reference layers" \
        in capsys.readouterr().err
    monkeypatch.setattr(evaluate.cmdline, "build_ops", lambda args: evaluate_ops())
    monkeypatch.setattr(explain, "write_saliency", lambda run_, val, n, *rest: {
        "png": run / "saliency-best.png", "labels": [0] * 4})
    assert evaluate.main([str(run), "--fused", "--interpret", "--saliency", "9"]) == 0
    captured = capsys.readouterr()
    assert "note: --fused --interpret applies to the evaluation; --saliency and --attention run " \
           "the float32 reference layers" in captured.err, captured.err
    assert "(4 validation images: all there are (9 asked for))" in captured.out, captured.out


def evaluate_ops():
    from vit.ops import REFERENCE
    return REFERENCE


@pytest.mark.parametrize("name, says", [
    ("best.npz", "is a checkpoint file; give the run directory that holds it: python evaluate.py "
                 "{dir} --checkpoint best"),
    ("last.npz", "is a checkpoint file; give the run directory that holds it: python evaluate.py "
                 "{dir} --checkpoint last"),
    ("model.npz", "is a checkpoint file; give the run directory that holds it: python evaluate.py "
                  "{dir}\n"),
    ("nine.png", "is an image file, not a run directory; to classify it: python evaluate.py "
                 "RUN_DIR --predict {dir}/nine.png"),
    ("notes.txt", "is a file, not a run directory (one that train.py wrote)")])
def test_a_file_given_for_the_run_directory_is_told_what_to_give(tmp_path, capsys, name, says):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / name)])
    assert f"{tmp_path / name} " + says.format(dir=tmp_path) in capsys.readouterr().err


def test_a_ctrl_c_swallowed_by_a_garbage_collector_callback_still_stops_it(faked, monkeypatch,
                                                                           capsys):
    """Seen: a SIGINT early in evaluate.py landed in JAX's gc callback, which printed a traceback
    and went on; evaluate.py evaluated and exited 0."""
    import signal

    run, exits = faked

    def ctrl_c_in_a_gc_callback(*args):
        ctrl_c_swallowed_by_a_gc_callback()
        return SimpleNamespace(model=ViTConfig())
    monkeypatch.setattr(evaluate, "load_run", ctrl_c_in_a_gc_callback)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Left):
            evaluate.main([str(run)], standalone=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exits == [evaluate.EXIT_INTERRUPTED] and not (run / "eval-best.json").exists()
    assert "evaluate.py: interrupted (Ctrl-C)" in capsys.readouterr().err


def test_the_runs_data_folder_is_the_one_config_json_names(tmp_path):
    """Seen: data moved, the run resumed with --data-dir NEW (config.json then named NEW), and
    evaluate.py of its best.npz, saved before the move, looked in the old folder."""
    import json

    from vit import runconfig

    config = runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": "/old",
                                           "cache_dir": "/old-cache"}})
    run = SimpleNamespace(config=config, path=tmp_path / "best.npz")
    assert explain.run_data(run).data_dir == "/old"  # no config.json: the checkpoint's
    saved = config.to_dict()
    saved["data"].update(data_dir="/new", cache_dir="/new-cache")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    data = explain.run_data(run)
    assert (data.data_dir, data.cache_dir, data.dataset) == ("/new", "/new-cache", "image-folder")
    saved["data"]["dataset"] = "tiny-imagenet"  # another run's config.json: not taken
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert explain.run_data(run).data_dir == "/old"


def test_a_class_without_validation_images_has_no_accuracy_in_the_table(faked, monkeypatch,
                                                                         capsys):
    run, _ = faked
    result = evaluate.evaluate_run()
    rows = [("fish", 0, 0), ("cat", 1, 2), ("dog", 2, 2)]
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args: {**result, "per_class": rows})
    assert evaluate.main([str(run), "--per-class"]) == 0
    table = capsys.readouterr().out.split("class ")[1].splitlines()[1:4]
    assert [line.split() for line in table] == [["cat", "1", "2", "50.0%"],
                                                ["dog", "2", "2", "100.0%"],
                                                ["fish", "0", "0", "-"]], table


def test_predict_says_which_checkpoint_answered(monkeypatch, tmp_path, capsys):
    """best.npz and last.npz may answer differently (74% against 99% seen): say which one did."""
    run = SimpleNamespace(path=tmp_path / "last.npz", meta={"epoch": 3, "step_in_epoch": 0},
                          class_names=["cat", "dog"], model=SimpleNamespace(num_classes=2))
    monkeypatch.setattr(evaluate, "load_run", lambda *args: run)
    monkeypatch.setattr(predict, "predict_files",
                        lambda run_, paths, names, batch_size: ([(paths[0], [("dog", 0.75), ("cat", 0.25)])], []))
    assert evaluate.main([str(tmp_path), "--checkpoint", "last", "--predict", "a.png"]) == 0
    out, err = capsys.readouterr()
    assert f"evaluate.py: the model of {tmp_path / 'last.npz'} (epoch 3):" in err, err
    assert out.splitlines()[0] == "a.png" and "dog" in out


def test_the_confusion_matrix_writes_mistakes_in_red_on_any_cell(tmp_path, monkeypatch):
    """Its title says 'red: mistakes', and a class mostly taken for another had its count in
    white on dark blue."""
    from matplotlib.colors import to_rgb

    saved = []
    monkeypatch.setattr(explain, "save_png", lambda fig, path, dpi: saved.append(fig))
    explain.plot_confusion(np.array([[9, 1], [8, 2]]), ["a", "b"], tmp_path / "c.png")
    colours = {t.get_text(): to_rgb(t.get_color()) for t in saved[0].axes[0].texts}
    reddish = [name for name, (r, g, b) in colours.items() if r > g + 0.2 and r > b + 0.2]
    assert sorted(reddish) == ["1", "8"], colours  # the two mistakes, light and dark cells alike


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python's own handler, as in a terminal."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_swallowed_ctrl_c_at_the_end_still_exits_130(faked, monkeypatch, python_sigint):
    run, exits = faked

    def command(*args):
        ctrl_c_swallowed_by_a_gc_callback()
        return 0
    monkeypatch.setattr(evaluate, "evaluate_command", command)
    with pytest.raises(Left):
        evaluate.main([str(run)], standalone=True)
    assert exits == [evaluate.EXIT_INTERRUPTED]


def test_a_swallowed_ctrl_c_stops_before_the_next_figure(faked, monkeypatch, capsys,
                                                        python_sigint):
    run, exits = faked
    write_confusion = explain.write_confusion
    drawn = []

    def confusion_then_ctrl_c(*args):
        figure = write_confusion(*args)
        ctrl_c_swallowed_by_a_gc_callback()
        return figure
    monkeypatch.setattr(explain, "write_confusion", confusion_then_ctrl_c)
    monkeypatch.setattr(explain, "write_saliency", lambda *args: drawn.append(1))
    with pytest.raises(Left):
        evaluate.main([str(run), "--per-class", "--saliency", "2"], standalone=True)
    assert drawn == [] and exits == [evaluate.EXIT_INTERRUPTED]
    assert f"wrote only {run / 'confusion-best.png'}" in capsys.readouterr().err


def test_eval_json_is_written_whole_or_not_at_all(faked, monkeypatch):
    run, exits = faked
    (run / "eval-best.json").write_text("old")

    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate.os, "replace", crash)
    with pytest.raises(Left):
        evaluate.main([str(run)], standalone=True)
    assert (run / "eval-best.json").read_text() == "old"


def test_the_notes_on_flags_that_do_not_apply_go_to_stderr(faked, monkeypatch, capsys):
    run, _ = faked
    monkeypatch.setattr(evaluate, "predict", lambda args: 0)
    assert evaluate.main([str(run), "--predict", "a.png", "--per-class", "--saliency", "2"]) == 0
    out, err = capsys.readouterr()
    assert "note: with --predict nothing else is evaluated: --per-class and --saliency ignored" \
        in err and "note:" not in out, (out, err)
    monkeypatch.setattr(evaluate.cmdline, "build_ops", lambda args: evaluate_ops())
    monkeypatch.setattr(explain, "write_attention", lambda run_, val, n, *rest: {
        "png": run / "attention-best.png", "labels": [0] * n})
    assert evaluate.main([str(run), "--fused", "--interpret", "--attention", "4"]) == 0
    out, err = capsys.readouterr()
    assert "--fused --interpret applies to the evaluation; --saliency and --attention run" in err
    assert "(4 validation images)" in out and "all there are" not in out, out


def test_augment_is_noted_with_predict(faked, monkeypatch, capsys):
    run, _ = faked
    monkeypatch.setattr(evaluate, "predict", lambda args: 0)
    assert evaluate.main([str(run), "--predict", "a.png", "--augment", "2"]) == 0
    assert "note: with --predict nothing else is evaluated: --augment ignored" in capsys.readouterr().err


def test_ctrl_c_after_the_augment_figure_names_it(faked, monkeypatch, capsys):
    """--augment's figure is among the files named when a Ctrl-C stops what follows it."""
    from vit import augment_figure

    run, exits = faked
    monkeypatch.setattr(evaluate, "load_run", lambda *args: SimpleNamespace(model=ViTConfig(), meta={}))
    monkeypatch.setattr(explain, "load_split", lambda *args, **kwargs: SimpleNamespace(labels=[0, 1]))

    def write_augmented(run_, train_set, n, out_dir):
        png = run / "augment.png"
        png.write_bytes(b"png")
        return {"png": png, "rows": list(range(n))}
    monkeypatch.setattr(augment_figure, "write_augmented", write_augmented)
    monkeypatch.setattr(evaluate.os, "replace", interrupted)  # the results' JSON
    with pytest.raises(Left):
        evaluate.main([str(run), "--augment", "2", "--data-dir", str(run)], standalone=True)
    assert exits == [evaluate.EXIT_INTERRUPTED]
    assert f"interrupted (Ctrl-C): wrote only {run / 'augment.png'}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--saliency", "--attention", "--augment"])
def test_a_figure_of_no_images_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.build_parser().parse_args(["run", flag, "0"])
    assert e.value.code == 2 and f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("name, says", [
    ("best.npz", "python evaluate.py '{dir}' --checkpoint best"),
    ("nine.png", "python evaluate.py RUN_DIR --predict '{dir}/nine.png'")])
def test_a_file_in_a_folder_with_a_space_is_told_a_command_that_pastes(tmp_path, capsys, name, says):
    """The command offered is pasted into a shell: a path with a space in it is quoted."""
    folder = tmp_path / "my run"
    folder.mkdir()
    (folder / name).write_bytes(b"x")
    with pytest.raises(SystemExit):
        evaluate.main([str(folder / name)])
    err = capsys.readouterr().err
    assert says.format(dir=folder) in err, err


def test_one_image_in_a_figure_is_one_image():
    assert evaluate.shown({"labels": [3]}, 1) == "1 validation image"  # it said "1 validation images"
    assert evaluate.shown({"labels": [3, 4]}, 5) == "2 validation images: all there are (5 asked for)"


def test_top_5_of_fewer_than_5_classes_is_named_top_k(faked, monkeypatch, capsys):
    """Of 2 classes every label is among the top 5: 'top-5 100.00%' said more than it measured,
    as train.py's epoch line said it."""
    run, _ = faked
    monkeypatch.setattr(evaluate, "load_run", lambda *args: SimpleNamespace(model=ViTConfig(num_classes=2)))
    assert evaluate.main([str(run), "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert "top-1 50.00%  top-2 100.00%" in out and "top-5" not in out, out
    monkeypatch.setattr(evaluate, "load_run", lambda *args: SimpleNamespace(model=ViTConfig()))
    assert evaluate.main([str(run), "--checkpoint", "last"]) == 0
    assert "top-1 50.00%  top-5 100.00%" in capsys.readouterr().out
