"""train.py and evaluate.py end to end on the real (bundled) digits dataset.

Covers: accuracy on real data, resume exactness (stop after an epoch, a stop mid-epoch, a stop right
after an epoch's last step, a real Ctrl-C, a crash between the checkpoint and the metrics, a crash
mid-epoch after timed checkpoints), a key of its own for every step, the gradient norms recorded,
NaN handling, checkpoints without pickle, metrics/curves, and the error messages. (More faults and
their messages: test_train_faults.py.)

The resume tests switch on every source of randomness the step has (dropout on residual branches,
attention weights and FFN activations, drop-path, crop, flip, RandAugment, random erasing, mixup
and cutmix, label smoothing), a warmup + cosine learning rate and repeated augmentation's order,
and compare bitwise: a resumed run that
draws any random number differently from the run that never stopped, or steps at another
learning rate, fails them."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate
import train
from vit import curves, parallel, runconfig, training
from step_spy import after_each_step
from watch import Watched, interrupt_when

ROOT = Path(__file__).resolve().parents[1]
# A small, quick digits model for the resume tests (the accuracy test uses configs/digits.toml).
QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
         "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128"]
# ... with every source of randomness on (digits: 8x8 images, so a 1-pixel crop padding), and
# a warmup + cosine schedule, so that every step has its own learning rate
RANDOM = [*QUICK, "--set", "model.dropout=0.1", "--set", "model.attn_dropout=0.1",
          "--set", "model.ffn_dropout=0.1", "--set", "model.drop_path=0.2",
          "--set", "train.crop_pad=1", "--set", "train.flip=true",
          "--set", "train.mixup_alpha=0.4", "--set", "train.cutmix_alpha=1.0",
          "--set", "train.random_erase=0.5", "--set", "train.rand_augment_ops=2",
          "--set", "train.label_smoothing=0.1",
          "--set", "train.schedule=cosine", "--set", "train.warmup_epochs=1",
          "--set", "train.repeat_augment=2"]  # and a data order of repeated images
EPOCHS = 3
STEPS_PER_EPOCH = 1437 // 128  # 11: the digits training set in batches of 128
VOLATILE = ("time", "images_per_s")  # the only fields of a metrics line that may differ


def run_train(*args):
    return train.main([str(a) for a in args])


def params_of(run_dir, name="last"):
    """Every array tree of a checkpoint (params/, opt/, and any tree a RunState adds), not its
    __meta__ (whose history holds timings)."""
    with np.load(Path(run_dir) / f"{name}.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    assert any(k.startswith("params/") for k in arrays) and any(k.startswith("opt/") for k in arrays)
    return arrays


def meta_of(run_dir, name="last"):
    with np.load(Path(run_dir) / f"{name}.npz", allow_pickle=False) as data:
        return json.loads(str(data["__meta__"]))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def assert_same_run(ref, run):
    """Bitwise: params, AdamW state, and every metrics line (train loss/accuracy included)."""
    assert_same_state(params_of(ref), params_of(run))
    assert_same_state(params_of(ref, "best"), params_of(run, "best"))
    assert records(run) == records(ref)


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """EPOCHS epochs of RANDOM in one go: what every stopped-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_train(*RANDOM, "--epochs", EPOCHS, "--out", out) == 0
    assert [r["epoch"] for r in records(out)] == list(range(1, EPOCHS + 1))
    return out


@pytest.fixture
def sigint_after_step(monkeypatch):
    """arm(n): SIGINT arrives right after the n-th training step of the next train.main call (as
    a Ctrl-C would, at a known step). The test's own SIGINT handler receives what train.py passes
    on once it has saved."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))

    def arm(n):
        calls = []

        def count(*_):
            calls.append(1)
            if len(calls) == n:
                signal.raise_signal(signal.SIGINT)
        after_each_step(monkeypatch, parallel, "make_parallel_train_step", count)
    arm.received = received
    yield arm
    signal.signal(signal.SIGINT, previous)


def test_stop_after_an_epoch_and_resume_is_bitwise_exact(reference, tmp_path):
    """1 epoch, stop (--stop-after-epoch), resume to EPOCHS == EPOCHS in one go."""
    run = tmp_path / "run"
    assert run_train(*RANDOM, "--epochs", EPOCHS, "--out", run, "--stop-after-epoch", 1) \
        == train.EXIT_INTERRUPTED
    assert [r["epoch"] for r in records(run)] == [1]
    assert (meta_of(run)["epoch"], meta_of(run)["step_in_epoch"]) == (1, 0)
    assert run_train("--resume", run, "--no-progress") == 0
    assert_same_run(reference, run)


def test_stop_mid_epoch_and_resume_is_bitwise_exact(reference, tmp_path, sigint_after_step):
    """A Ctrl-C after step 5 of epoch 2 saves there; the resumed run equals the one in one go."""
    run = tmp_path / "run"
    sigint_after_step(STEPS_PER_EPOCH + 5)
    assert run_train(*RANDOM, "--epochs", EPOCHS, "--out", run) == train.EXIT_INTERRUPTED
    meta = meta_of(run)
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 5), meta
    assert meta["running"]["seen"] == 5 * 128  # the interrupted epoch's running sums are kept
    # called from Python, train.py passes the signal on to the caller's handler once it has saved
    assert sigint_after_step.received == [signal.SIGINT]
    assert run_train("--resume", run, "--no-progress") == 0
    assert_same_run(reference, run)


def test_stop_after_the_last_step_of_an_epoch_and_resume_is_bitwise_exact(reference, tmp_path,
                                                                          sigint_after_step):
    """A Ctrl-C right after epoch 2's last step saves before that epoch is validated: resumed,
    no step is left in it, and its metrics line (the lr too, which no step reports now but the
    schedule gives) equals the one-go run's."""
    run = tmp_path / "run"
    sigint_after_step(2 * STEPS_PER_EPOCH)
    assert run_train(*RANDOM, "--epochs", EPOCHS, "--out", run) == train.EXIT_INTERRUPTED
    meta = meta_of(run)
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, STEPS_PER_EPOCH), meta
    assert run_train("--resume", run, "--no-progress") == 0
    assert_same_run(reference, run)


def test_every_step_draws_its_own_key(tmp_path, monkeypatch):
    """Dropout, drop-path, crop, flip and mixup draw from the key the loop gives each step: no
    two steps of a run get the same one (a key repeated every epoch would replay the same masks
    and augmentations each epoch, and a resumed run would replay them just the same)."""
    keys = []
    after_each_step(monkeypatch, parallel, "make_parallel_train_step",
                    lambda params, opt_state, images, labels, key:
                    keys.append(tuple(np.asarray(key).ravel().tolist())))
    assert run_train(*QUICK, "--epochs", 2, "--out", tmp_path / "run") == 0
    assert len(keys) == 2 * STEPS_PER_EPOCH
    assert len(set(keys)) == len(keys), "a step key repeats"


def test_each_epoch_records_the_mean_and_largest_gradient_norm_of_its_steps(tmp_path,
                                                                           monkeypatch):
    """metrics.jsonl's grad_norm / grad_norm_max are the mean and largest of the norms the steps
    returned (before clipping: with clip_norm below them all, the step still reports them)."""
    norms, make = [], parallel.make_parallel_train_step

    def recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def recorded(*step_args):
            out = step(*step_args)
            norms.append(float(out[2]["grad_norm"]))
            return out
        return recorded
    monkeypatch.setattr(parallel, "make_parallel_train_step", recording)
    figures, run = saved_figures(monkeypatch), tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 2, "--set", "train.clip_norm=1e-3", "--out", run) == 0
    assert len(norms) == 2 * STEPS_PER_EPOCH and min(norms) > 1e-3
    for r, epoch in zip(records(run), (norms[:STEPS_PER_EPOCH], norms[STEPS_PER_EPOCH:])):
        assert r["grad_norm"] == pytest.approx(np.mean(epoch), rel=1e-12)
        assert r["grad_norm_max"] == max(epoch)
    assert norm_lines(figures[-1])["clip_norm 0.001"][1] == [1e-3, 1e-3]  # curves.png's threshold


def saved_figures(monkeypatch) -> list:
    """The list that collects every matplotlib figure saved (curves.png's) during the test."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def saving(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", saving)
    return figures


def norm_lines(fig) -> dict:
    """label -> (x, y) of each line of a curves figure's gradient norm panel."""
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "training gradient norm"]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_curves_draw_a_history_whose_first_records_have_no_gradient_norms(tmp_path, monkeypatch):
    """A run resumed from a checkpoint older than the gradient norms has records without them:
    curves.png draws the ones that have them (mean and largest), beside the clipping threshold
    when there is one (clip_norm 0: none)."""
    old = {"train_accuracy": 0.5, "val_top1": 0.5, "val_top5": 0.9, "train_loss": 1.0,
           "val_loss": 1.2}
    history = [{**old, "epoch": 1}, {**old, "epoch": 2, "grad_norm": None, "grad_norm_max": None},
               {**old, "epoch": 3, "grad_norm": 0.8, "grad_norm_max": 2.0}]
    figures = saved_figures(monkeypatch)
    curves.plot_curves(history, tmp_path / "curves.png", clip_norm=1.0)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    curves.plot_curves(history, tmp_path / "unclipped.png", clip_norm=0.0)
    drawn = {"mean over the epoch's steps": ([3], [0.8]), "largest": ([3], [2.0])}
    assert norm_lines(figures[0]) == {**drawn, "clip_norm 1": ([0, 1], [1.0, 1.0])}
    assert norm_lines(figures[1]) == drawn
    assert all(t == int(t) for ax in figures[0].axes for t in ax.get_xticks())  # epochs, not 1.25


def test_validation_batches_are_no_larger_than_the_validation_set(tmp_path, monkeypatch):
    """train.eval_batch_size 1000 on digits' 360 validation images: one batch of 360, not 1000 rows
    of which 640 are padding (each costs as much as a real one)."""
    from vit.data import loader

    made = []

    class Recording(loader.Batcher):
        def __init__(self, images, labels, batch_size, **kwargs):
            made.append((len(labels), batch_size, kwargs.get("shuffle", True)))
            super().__init__(images, labels, batch_size, **kwargs)

    monkeypatch.setattr(loader, "Batcher", Recording)
    assert run_train(*QUICK, "--epochs", 1, "--set", "train.eval_batch_size=1000",
                     "--out", tmp_path / "run") == 0
    assert made == [(1437, 128, True), (360, 360, False)]
    assert records(tmp_path / "run")[0]["val_images"] == 360


class Crash(BaseException):
    """Stands for the process dying (kill -9, power loss): nothing in train.py catches it."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_between_checkpoint_and_metrics_leaves_them_agreeing(reference, tmp_path,
                                                                   monkeypatch, when):
    """The process dies just before, or just after, writing epoch 2's last.npz (so between that
    and the epoch's metrics line, whichever order they are written in). The checkpoint and
    metrics.jsonl agree: after --resume each epoch has one line, equal to the one-go run's."""
    from vit import checkpoint
    save = checkpoint.save

    def crashing_save(path, trees, meta):
        if Path(path).name == "last.npz" and meta["epoch"] == 2:
            if when == "after":
                save(path, trees, meta)
            raise Crash
        return save(path, trees, meta)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save", crashing_save)
    with pytest.raises(Crash):
        run_train(*RANDOM, "--epochs", EPOCHS, "--out", run)
    monkeypatch.setattr(checkpoint, "save", save)
    saved = meta_of(run)["epoch"]
    assert saved == (2 if when == "after" else 1)
    logged = [r["epoch"] for r in records(run)]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) <= saved, \
        f"metrics.jsonl holds epochs {logged}, last.npz is at epoch {saved}"
    assert run_train("--resume", run, "--no-progress") == 0
    assert [r["epoch"] for r in records(run)] == list(range(1, EPOCHS + 1))
    assert_same_run(reference, run)


@pytest.mark.parametrize("minutes, saved_step", [(1e-9, 4), (0, 0)])
def test_a_crash_mid_epoch_loses_only_the_steps_since_the_last_timed_save(
        reference, tmp_path, monkeypatch, capsys, minutes, saved_step):
    """train.checkpoint_minutes: the process dies (kill -9, power loss) in step 5 of epoch 2.
    Saving every 60 ns (so at every step boundary here), last.npz holds epoch 2's first 4 steps,
    their running sums too; with 0 (at epoch ends only), epoch 1's end. Either way the resumed
    run equals the one in one go, bitwise."""
    steps = []

    def crash_in_step(*_):
        steps.append(1)
        if len(steps) == STEPS_PER_EPOCH + 5:
            raise Crash
    after_each_step(monkeypatch, parallel, "make_parallel_train_step", crash_in_step)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        run_train(*RANDOM, "--epochs", EPOCHS, "--out", run,
                  "--set", f"train.checkpoint_minutes={minutes}")
    monkeypatch.undo()
    meta = meta_of(run)
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, saved_step), meta
    assert meta["running"]["seen"] == saved_step * 128
    assert [r["epoch"] for r in records(run)] == [1]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved ")]
    # at every step boundary but an epoch's last (the epoch's end saves anyway), up to the crash
    boundaries = [(1, k) for k in range(1, STEPS_PER_EPOCH)] + [(2, k) for k in range(1, 5)]
    assert said == [f"saved {run / 'last.npz'} at epoch {e}, step {k} (train.checkpoint_minutes "
                    f"= 1e-09)" for e, k in boundaries if minutes], said
    assert evaluate.main([str(run), "--checkpoint", "last", "--no-progress"]) == 0
    where = "mid-epoch: epoch 2, step 4" if minutes else "epoch 1"  # as train.py says it
    assert f"last.npz ({where}): top-1" in capsys.readouterr().out
    assert run_train("--resume", run, "--no-progress") == 0
    assert_same_run(reference, run)


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path):
    """A real SIGINT to python train.py after its epoch 1: it saves at the current step and exits
    130; resumed to the end of that epoch, it equals a run that never stopped, bitwise."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    # 40 short epochs: the SIGINT sent right after epoch 1 lands long before the end, wherever
    # exactly it lands; both runs are then compared at the end of the epoch it landed in.
    args = [*RANDOM, "--epochs", 40, "--batch-size", 64]
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    proc = Watched([sys.executable, ROOT / "train.py", *args, "--out", run],
                   log=tmp_path / "train.log", env=env, cwd=ROOT)
    # waited for as long as it makes progress (tests/watch.py), not against a clock
    text = interrupt_when(proc, "\nepoch 1:")
    assert proc.returncode == train.EXIT_INTERRUPTED, proc.tail()
    assert "interrupted: saved" in text and "--resume" in text
    assert "train.py: Ctrl-C: finishing the current step, then saving last.npz" in text
    stopped = meta_of(run)
    assert 1 <= stopped["epoch"] < 40  # it really stopped early, after epoch 1
    until = stopped["epoch"] + 1
    assert run_train("--resume", run, "--no-progress", "--stop-after-epoch", until) \
        == train.EXIT_INTERRUPTED
    assert run_train(*args, "--out", ref, "--stop-after-epoch", until) == train.EXIT_INTERRUPTED
    assert meta_of(ref)["epoch"] == meta_of(run)["epoch"] == until
    assert_same_run(ref, run)


def test_second_ctrl_c_while_saving_exits_130_keeping_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, sigint_after_step):
    """A second SIGINT that lands while the first one's checkpoint is being written: exit 130
    with a message (no traceback), last.npz still the end of epoch 1, no .tmp file left."""
    from vit import checkpoint, training  # noqa: PLC0415

    fsync, seconds = checkpoint.os.fsync, []

    def fsync_then_ctrl_c(fd):
        if sys.exc_info()[0] is training.Interrupted:  # the save of the first Ctrl-C
            seconds.append(1)
            signal.raise_signal(signal.SIGINT)
        return fsync(fd)
    monkeypatch.setattr(checkpoint.os, "fsync", fsync_then_ctrl_c)
    run = tmp_path / "run"
    sigint_after_step(STEPS_PER_EPOCH + 3)
    assert run_train(*QUICK, "--epochs", 2, "--out", run) == train.EXIT_INTERRUPTED
    assert seconds == [1]
    assert "interrupted twice: exiting without saving" in capsys.readouterr().err
    assert (meta_of(run)["epoch"], meta_of(run)["step_in_epoch"]) == (1, 0)
    assert not list(run.glob("*.tmp*"))
    assert sigint_after_step.received == [signal.SIGINT]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train(*QUICK, "--epochs", 1, "--out", run) == 0
    before = (run / "last.npz").read_bytes()
    # resume with an absurd learning rate and more epochs: the loss becomes inf/NaN
    code = run_train("--resume", run, "--no-progress", "--epochs", 3, "--lr", 1e30)
    assert code == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "training loss became" in err and "untouched" in err
    # digits.toml warms up already: the remedies offered are the ones not on yet
    assert "Try a lower --lr or gradient clipping (--set train.clip_norm=1.0)." in err, err
    assert (run / "last.npz").read_bytes() == before


@pytest.mark.parametrize("clip_norm, warmup_epochs, tries", [
    (0.0, 0.0, "a lower --lr, gradient clipping (--set train.clip_norm=1.0) or warmup "
               "(--set train.warmup_epochs=2)"),
    (1.0, 0.0, "a lower --lr or warmup (--set train.warmup_epochs=2)"),
    (1.0, 2.0, "a lower --lr")])
def test_a_nan_loss_suggests_only_the_remedies_not_on_yet(clip_norm, warmup_epochs, tries):
    t = runconfig.from_dict({"train": {"clip_norm": clip_norm, "warmup_epochs": warmup_epochs}}).train
    assert training._remedies(t) == tries


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
                 "--accum-steps", "--lr", "--out", "--resume", "--interpret", "--compute-dtype",
                 "--dot-precision", "--set"):
        assert flag in text
