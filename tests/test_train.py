"""train.py and evaluate.py end to end on the real (bundled) digits dataset.

Covers: accuracy on real data, resume exactness (stop after an epoch, and Ctrl-C mid-epoch),
NaN handling, checkpoints without pickle, metrics/curves, and the error messages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]
# A small, quick digits model for the resume tests (the accuracy test uses configs/digits.toml).
QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
         "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128"]


def run_train(*args):
    return train.main([str(a) for a in args])


def params_of(run_dir, name="last"):
    with np.load(Path(run_dir) / f"{name}.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k.startswith(("params/", "opt/"))}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_digits_reaches_90_percent(tmp_path):
    """configs/digits.toml on scikit-learn's real 8x8 digits: >= 90% validation top-1."""
    out = tmp_path / "run"
    assert run_train("--dataset", "digits", "--no-progress", "--out", out) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and lines[-1]["epoch"] == 30
    assert lines[-1]["val_images"] == 360
    best = max(x["val_top1"] for x in lines)
    assert best >= 0.90, [round(x["val_top1"], 3) for x in lines]
    assert (out / "curves.png").stat().st_size > 10_000
    assert (out / "best.npz").exists() and (out / "last.npz").exists()
    # evaluate.py recomputes the best checkpoint's validation accuracy from scratch
    result = evaluate.evaluate(out, "best", progress=False)
    assert result["count"] == 360
    assert result["top1"] == pytest.approx(best, abs=1e-6)
    assert sum(t for _, _, t in result["per_class"]) == 360


def test_stop_and_resume_is_exact(tmp_path):
    """3 epochs in one go == 1 epoch, stop, resume to 3 (bitwise, params and optimizer state)."""
    one_go, resumed = tmp_path / "one", tmp_path / "two"
    assert run_train(*QUICK, "--epochs", 3, "--out", one_go) == 0
    assert run_train(*QUICK, "--epochs", 3, "--out", resumed, "--stop-after-epoch", 1) == 0
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 1
    assert run_train("--resume", resumed, "--no-progress") == 0
    assert_same_state(params_of(one_go), params_of(resumed))
    a = [json.loads(x) for x in (one_go / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["val_top1"] for x in a] == [x["val_top1"] for x in b]


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path):
    """SIGINT after epoch 1 of a subprocess: it saves at the current step and exits 130; the
    resumed run ends bitwise equal to an uninterrupted one."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    # 40 short epochs (~0.1 s each): long enough that the SIGINT sent right after epoch 1 lands
    # well before the end, wherever exactly it lands.
    assert run_train(*QUICK, "--epochs", 40, "--batch-size", 16, "--out", ref) == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *QUICK, "--epochs", "40",
                             "--batch-size", "16", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    output = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait for epoch 1 to finish, then interrupt epoch 2
        output.append(line)
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(output)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(output) + rest
    assert proc.returncode == train.EXIT_INTERRUPTED, text
    assert "interrupted: saved" in text and "--resume" in text
    meta = json.loads(str(np.load(run / "last.npz")["__meta__"]))
    assert meta["epoch"] < 40  # it really stopped early
    assert run_train("--resume", run, "--no-progress") == 0
    assert_same_state(params_of(ref), params_of(run))


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 1, "--out", run) == 0
    before = (run / "last.npz").read_bytes()
    # resume with an absurd learning rate and more epochs: the loss becomes inf/NaN
    code = run_train("--resume", run, "--no-progress", "--epochs", 3, "--lr", 1e30)
    assert code == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "training loss became" in err and "untouched" in err
    assert (run / "last.npz").read_bytes() == before


def test_checkpoint_has_no_pickle(tmp_path):
    run = tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 1, "--out", run) == 0
    with np.load(run / "last.npz", allow_pickle=False) as data:  # would raise on object arrays
        assert all(data[k].dtype != object for k in data.files)
        meta = json.loads(str(data["__meta__"]))
    assert meta["epoch"] == 1 and meta["config"]["model"]["image_size"] == 8
    assert not list(run.glob("*.tmp"))


def test_errors_name_the_fault(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_train("--dataset", "tiny-imagenet", "--data-dir", tmp_path / "nothing", "--no-progress")
    err = capsys.readouterr().err
    assert "python -m vit.data download" in err and "--dataset digits" in err
    with pytest.raises(SystemExit):
        run_train("--dataset", "digits", "--set", "model.layerz=3")
    assert "model.layerz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_train("--config", tmp_path / "missing.toml")
    assert "missing.toml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_train("--dataset", "digits", "--interpret")
    assert "--interpret only makes sense with --fused" in capsys.readouterr().err


def test_fused_without_gpu_asks_for_interpret(capsys):
    with pytest.raises(SystemExit):
        run_train("--dataset", "digits", "--fused", "--no-progress")
    err = capsys.readouterr().err
    assert "--interpret" in err and "GPU" in err


def test_help_explains_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--fused", "--config", "--dataset", "--data-dir", "--epochs", "--batch-size",
                 "--lr", "--out", "--resume", "--interpret", "--compute-dtype", "--dot-precision",
                 "--set"):
        assert flag in text
