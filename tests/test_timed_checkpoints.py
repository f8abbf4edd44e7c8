"""train.checkpoint_minutes (vit/training.py): when a mid-epoch save of last.npz is due
(Run.checkpoint_due, Run.save), read on a fake clock, and that a run's images/s leaves the time of
those saves, and of compiling the step, out; and when curves.png is redrawn (Run.draw_curves), on the same clock; and which
epoch's state an epoch's end writes to best.npz (training.finish_epoch). (A crash mid-epoch after
timed saves, and the resume from one: test_train.py.)"""

import json
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest

import train
from vit import checkpoint, parallel, runconfig, training
from vit.runstate import RunState
from step_spy import after_each_step

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
         "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128"]
STEPS_PER_EPOCH = 1437 // 128  # 11: the digits training set in batches of 128


class FakeTime:
    """vit.training's `time` module with its clocks at `now` seconds, which only the test moves on
    (strftime and the rest are time's own). Far ahead of the real monotonic clock, which a Run
    reads when it is made: a run's start is long past on this clock until last.npz is saved."""

    def __init__(self):
        self.now = 1e9

    def monotonic(self):
        return self.now

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(training, "time", fake)
    return fake


def make_run(tmp_path, minutes=30.0, main_process=True):
    cfg = runconfig.from_dict({"train": {"checkpoint_minutes": minutes}})
    state = RunState.fresh({"w": np.ones((2, 3), np.float32)}, {"step": np.int32(0)}, [0.5], [0.25])
    return training.Run(cfg=cfg, run_dir=tmp_path, ops=None, mesh=None, state=state, batcher=None,
                        val_batcher=None, train_step=None, eval_step=None, hparams=None,
                        steps_per_epoch=4, class_names=["a", "b"], train_images=8,
                        main_process=main_process,
                        progress=False, resumed=False, saved_at=1e9)


def test_a_save_is_due_the_given_minutes_after_last_npz_was_written(tmp_path, clock):
    """Minutes, not seconds; counted from the last save of last.npz (best.npz's does not restart
    the count); 0 switches the timed saves off."""
    run = make_run(tmp_path)
    clock.now += 29 * 60 + 50
    assert not run.checkpoint_due()
    clock.now += 20  # 30 minutes 10 s since the run started
    assert run.checkpoint_due()
    run.save("best")  # a new best epoch: last.npz is as old as it was
    assert (tmp_path / "best.npz").is_file() and run.checkpoint_due()
    run.save("last")
    assert (tmp_path / "last.npz").is_file() and not run.checkpoint_due()
    clock.now += 29 * 60 + 50
    assert not run.checkpoint_due()
    clock.now += 20
    assert run.checkpoint_due()
    assert not make_run(tmp_path / "off", minutes=0).checkpoint_due()  # even after 60 minutes


def test_only_process_0_has_a_save_due(tmp_path, clock):
    """The other processes of a multi-process run write nothing, so no save is ever due there (each
    would count its step early and print a 'saved' line for a file it never wrote)."""
    run = make_run(tmp_path, main_process=False)
    clock.now += 3600
    assert not run.checkpoint_due()
    run.save("last")
    assert not (tmp_path / "last.npz").exists()


def test_the_default_is_the_documented_30_minutes():
    """The README and train.py --help (whose end also gives the exit codes) state the default."""
    assert runconfig.TrainSection().checkpoint_minutes == 30.0
    assert "`train.checkpoint_minutes` (default 30;" in (ROOT / "README.md").read_text()
    text = " ".join(train.build_parser().format_help().split())
    assert "every train.checkpoint_minutes (30 unless set)" in text, text
    for code in (0, train.EXIT_INTERRUPTED, train.EXIT_NONFINITE, 2):
        assert f" {code} " in text.split("Exit codes:")[1]


def slow_steps_and_saves(monkeypatch, clock):
    """On the fake clock: each training step takes 1 s, the first call 500 s more (it compiles
    the step), and each save of a checkpoint 1000 s."""
    calls = []

    def tick(*_):
        calls.append(1)
        clock.now += 1 + 500 * (len(calls) == 1)
    after_each_step(monkeypatch, parallel, "make_parallel_train_step", tick)
    save = checkpoint.save

    def slow_save(*args, **kwargs):
        clock.now += 1000
        return save(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save", slow_save)


def test_images_per_second_leaves_out_the_time_spent_saving_and_compiling(tmp_path, monkeypatch,
                                                                          clock, capsys):
    """Each step takes 1 s on the fake clock, the first call 500 s more (it compiles the step), and
    each save of a checkpoint 1000 s; saving at every step boundary (train.checkpoint_minutes =
    1e-9), the epoch's images/s is still 128 images a step over 1 s a step. (The first call's
    time is left out whole: on a device the step it compiled runs after it returns.)"""
    slow_steps_and_saves(monkeypatch, clock)
    run = tmp_path / "run"
    assert train.main([*QUICK, "--epochs", "1", "--set", "train.checkpoint_minutes=1e-9",
                       "--out", str(run)]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["images_per_s"] == pytest.approx(128.0 * STEPS_PER_EPOCH / (STEPS_PER_EPOCH - 1),
                                                   rel=1e-12)
    assert "compiled the training step in 501.0 s (not counted in img/s or s/step)" in capsys.readouterr().out


@pytest.mark.parametrize("saving", [False, True], ids=["one-save", "a-save-a-step"])
def test_the_epoch_bar_leaves_out_the_time_spent_compiling_and_saving(tmp_path, monkeypatch,
                                                                       clock, capsys, saving):
    """The bar's clock (tqdm's, here the fake one too): its elapsed time, s/step and ETA counted
    the first call's compile and the timed saves, which img/s left out (a digits epoch of 11
    steps showed 08:31 for 11 s of steps). Each step takes 1 s, the first call 500 s more, and a
    save of last.npz 1000 s: once (the first boundary) or, with saving, at every boundary."""
    import tqdm.std  # noqa: PLC0415

    monkeypatch.setattr(tqdm.std, "time", clock.perf_counter)
    slow_steps_and_saves(monkeypatch, clock)
    quick = [flag for flag in QUICK if flag != "--no-progress"]
    saves = ["--set", "train.checkpoint_minutes=1e-9"] if saving else []
    assert train.main([*quick, *saves, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    bar = [line for line in err.splitlines() if line.startswith("epoch 1/1")][-1]
    assert f"{STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} [00:{STEPS_PER_EPOCH - 1:02d}<00:00" in bar, bar
    # the fake clock starts long after the run's start: the first step boundary saves either way
    assert out.count("saved ") == (STEPS_PER_EPOCH - 1 if saving else 1), out


class Crash(BaseException):
    pass


def test_a_resumed_epoch_bar_goes_on_from_its_step_without_the_compile(tmp_path, monkeypatch, clock,
                                                                       capsys):
    """Resumed at step 4 of 11 (a crash in step 5 after timed saves), the bar goes on from 4 to
    11/11 over its 7 steps, the resumed process's compile left out too: tqdm's reset() for
    unpause() restarts the clock as well, but counts the steps from 0 (it ended at 7/11)."""
    import tqdm.std  # noqa: PLC0415

    monkeypatch.setattr(tqdm.std, "time", clock.perf_counter)
    calls = []

    def tick(*_):
        calls.append(1)
        clock.now += 1 + 500 * (len(calls) in (1, 6))  # each process's first call compiles
        if len(calls) == 5:
            raise Crash
    after_each_step(monkeypatch, parallel, "make_parallel_train_step", tick)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train.main([*QUICK, "--epochs", "1", "--set", "train.checkpoint_minutes=1e-9", "--out", str(run)])
    capsys.readouterr()
    assert train.main(["--resume", str(run)]) == 0 and len(calls) == 5 + STEPS_PER_EPOCH - 4
    bar = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/1")][-1]
    assert f"{STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} [00:{STEPS_PER_EPOCH - 4 - 1:02d}<00:00" in bar, bar


def test_curves_are_drawn_when_due_and_when_training_stops(tmp_path, monkeypatch, clock):
    """A drawing of curves.png takes about 0.2 s, which after every epoch was half of a digits run:
    it is drawn after an epoch once CURVES_SECONDS have passed since the last drawing (after the
    first epoch always), at once when forced (training stops), and never twice for one history."""
    drawn = []
    monkeypatch.setattr(training, "plot_curves", lambda history, *_: drawn.append(len(history)))
    run = make_run(tmp_path)
    run.draw_curves(force=True)  # no epoch yet: nothing to draw

    def epoch_ends(seconds):
        clock.now += seconds
        run.state.history.append({"epoch": len(run.state.history) + 1})
        run.draw_curves()
    for seconds in (1, 1, training.CURVES_SECONDS - 2, 1, 1):
        epoch_ends(seconds)  # drawn after the first, and once 10 s have passed: the fourth
    run.draw_curves(force=True)
    run.draw_curves(force=True)
    assert drawn == [1, 4, 5]


def test_a_quick_run_draws_its_first_and_last_epochs(tmp_path, monkeypatch, clock):
    """Steps of 0.1 s on the fake clock (an epoch of 1.1 s): 3 epochs of train.py draw curves.png
    after epoch 1 and when the run ends, with all 3 epochs."""
    drawn = []
    monkeypatch.setattr(training, "plot_curves", lambda history, *_: drawn.append(len(history)))
    after_each_step(monkeypatch, parallel, "make_parallel_train_step",
                    lambda *_: setattr(clock, "now", clock.now + 0.1))
    assert train.main([*QUICK, "--epochs", "3", "--out", str(tmp_path / "run")]) == 0
    assert drawn == [1, 3]


def test_best_npz_is_written_only_by_an_epoch_better_than_every_earlier_one(tmp_path, monkeypatch):
    """Validation top-1 of 0.5, 0.7, 0.6, 0.7 over four epochs: best.npz holds epoch 2 (a later
    epoch that only ties it does not replace it), last.npz epoch 4."""
    import vit.step  # noqa: PLC0415  (finish_epoch reads evaluate_batches from it at each call)

    tops = iter([0.5, 0.7, 0.6, 0.7])
    monkeypatch.setattr(vit.step, "evaluate_batches", lambda *_: {
        "loss": 1.0, "top1": next(tops), "top5": 1.0, "count": 8})
    monkeypatch.setattr(training, "plot_curves", lambda *_: None)
    run = make_run(tmp_path)
    run.val_batcher = SimpleNamespace(eval_batches=lambda: iter(()))
    for _ in range(4):
        training.finish_epoch(run, {"lr": 0.1}, 128, 1.0)
    best = checkpoint.load(tmp_path / "best.npz")[1]
    assert (best["epoch"], best["best_top1"]) == (2, 0.7)
    assert checkpoint.load(tmp_path / "last.npz")[1]["epoch"] == 4
