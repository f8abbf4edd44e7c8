"""evaluate.py --predict (vit/predict.py): the top classes of image files, batch by batch; a file
that cannot be read is named after the others' predictions (it used to stop them all), and
names that are not UTF-8 print."""

import os

import jax
import numpy as np
import pytest

import evaluate
import vit
from vit import explain, predict, runconfig
from vit.data.fake import fake_colour_image, save_as
from vit.data.image_folder import load_image

NAMES = [f"c{i}" for i in range(7)]


@pytest.fixture
def run(tmp_path):
    """A model of 7 classes (untrained: any prediction will do) as evaluate.py loads one."""
    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=8, heads=2, layers=1, mlp_dim=8,
                        num_classes=7)
    mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
    return explain.Run(tmp_path / "best.npz", vit.init_params(jax.random.key(1), cfg), mean, std,
                       runconfig.RunConfig(cfg), {"epoch": 3, "step_in_epoch": 0, "class_names": NAMES})


def images(folder, n):
    rng = np.random.default_rng(0)
    paths = [folder / f"x{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        save_as(fake_colour_image((20 * i, 30, 90), 20 + i, 13, rng), path, "PNG", "RGB")
    return paths


def test_predict_gives_the_top_5_of_more_classes(run, tmp_path):
    """With 7 classes, predict_files lists 5: the model's most probable classes, best first."""
    [image] = images(tmp_path, 1)
    [(path, top)], not_read = predict.predict_files(run, [image], NAMES)
    x = explain.model_input(load_image(image, 8)[None], run.mean, run.std)
    logits = np.asarray(vit.forward(run.params, x, run.model))[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert not_read == [] and path == str(image)
    assert [name for name, _ in top] == [NAMES[k] for k in np.argsort(-probs)[:5]]
    np.testing.assert_allclose([p for _, p in top], np.sort(probs)[::-1][:5], rtol=1e-5)


def test_files_go_through_the_model_a_batch_at_a_time(run, tmp_path, monkeypatch):
    """7 files in batches of 3: three forward passes of 3 images (the last padded), and the same
    predictions as all 7 at once."""
    paths = images(tmp_path, 7)
    whole, _ = predict.predict_files(run, paths, NAMES)
    shapes, forward = [], predict.jitted_forward
    monkeypatch.setattr(predict, "jitted_forward", lambda p, x, m: shapes.append(x.shape) or forward(p, x, m))
    batched, not_read = predict.predict_files(run, paths, NAMES, batch_size=3)
    assert shapes == [(3, 8, 8, 3)] * 3 and not_read == []
    assert [path for path, _ in batched] == [str(p) for p in paths]
    for (_, a), (_, b) in zip(whole, batched):
        assert [name for name, _ in a] == [name for name, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], rtol=1e-5)


def test_a_file_that_cannot_be_read_is_named_after_the_others_predictions(run, tmp_path, monkeypatch,
                                                                           capsys):
    good = images(tmp_path, 2)
    (broken := tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    (folder := tmp_path / "holiday").mkdir()
    given = [good[0], broken, folder, tmp_path / "gone.jpg", good[1]]
    monkeypatch.setattr(evaluate, "load_run", lambda *args: run)
    assert evaluate.main([str(tmp_path), "--predict", *map(str, given)]) == 1
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [str(good[0]), str(good[1])]
    assert f"evaluate.py: 3 of 5 files could not be read:\n  {broken}: cannot decode image" in err, err
    assert f"\n  {folder}: a folder, not an image file" in err and f"\n  {tmp_path / 'gone.jpg'}: no such " \
           "image file" in err, err


def test_when_no_file_can_be_read_it_is_an_error(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_run", lambda *args: run)
    (broken := tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    for given, said in (([broken], f"evaluate.py: error: {broken}: cannot decode image"),
                        ([broken, tmp_path], "evaluate.py: error: none of the files given could be read:\n"
                                             f"  {broken}: cannot decode image")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(tmp_path), "--predict", *map(str, given)])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and said in err and out == "", err


def test_a_file_name_that_is_not_utf8_prints(run, tmp_path):
    """A name from a zip made on Windows (Latin-1 bytes, kept by Python as surrogates): printed
    with the byte escaped, not a UnicodeEncodeError from a strict stdout."""
    [image] = images(tmp_path, 1)
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    os.rename(image, odd)
    predictions, _ = predict.predict_files(run, [odd], NAMES)
    text = predict.format_predictions(predictions)
    assert text.splitlines()[0] == f"{tmp_path}/caf\\xe9.png"
    text.encode("utf-8")  # strict: no surrogate left


def test_predictions_to_a_reader_that_went_away_end_quietly(run, tmp_path, monkeypatch, capsys):
    """python evaluate.py RUN --predict *.jpg | head: a BrokenPipeError traceback; now exit code
    141 (the shell's for SIGPIPE) and no error on stderr. Called from Python, the caller gets it."""
    import sys

    monkeypatch.setattr(evaluate, "load_run", lambda *args: run)
    given = [str(p) for p in images(tmp_path, 2)]
    for standalone in (True, False):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line
        with open(write, "w") as stream, monkeypatch.context() as patch:
            patch.setattr(sys, "stdout", stream)
            if standalone:
                assert evaluate.main([str(tmp_path), "--predict", *given], standalone=True) == 141
            else:
                with pytest.raises(BrokenPipeError):
                    evaluate.main([str(tmp_path), "--predict", *given])
                    stream.flush()
                os.dup2(os.open(os.devnull, os.O_WRONLY), write)  # so that closing it can flush
        err = capsys.readouterr().err
        assert "Error" not in err and "Traceback" not in err, err
