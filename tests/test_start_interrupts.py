"""Ctrl-C while the run starts (the data loads or decodes into its cache): `python train.py`
leaves at once with a message and exit code 130, not a
KeyboardInterrupt traceback, and writes no run directory; called from Python, the caller gets
its KeyboardInterrupt, as without train.py. (Once training runs, tests/test_train.py's Ctrl-C
tests hold: the current step is finished and last.npz saved.) And the edges: a Ctrl-C raised
inside a garbage-collector callback, a SIGINT ignored from the start, a second signal, and a
signal while an epoch is evaluated and saved."""

import gc
import signal
import sys
from types import SimpleNamespace

import pytest

import cmdline
import train
from sigint import ctrl_c_swallowed_by_a_gc_callback
from vit import training

QUICK = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1", "--set", "model.d_model=32",
         "--set", "model.mlp_dim=64", "--epochs", "1"]


@pytest.fixture
def sigint_while_loading_data(monkeypatch):
    """A real SIGINT (as Ctrl-C sends) arrives while train.py loads its data."""
    load_data = training.load_data

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return load_data(*args, **kwargs)
    monkeypatch.setattr(training, "load_data", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as a terminal's
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_starting_is_a_message_and_exit_130(sigint_while_loading_data, tmp_path, capsys):
    run = tmp_path / "run"
    try:
        code = train.main([*QUICK, "--out", str(run)], standalone=True)
    except KeyboardInterrupt:
        pytest.fail("python train.py ended in a KeyboardInterrupt traceback")
    assert code == train.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "train.py: interrupted while starting" in err and "no checkpoint was written" in err, err
    assert "run the same command again" in err and "Traceback" not in err, err
    assert not run.exists()


def test_ctrl_c_while_starting_reaches_a_python_caller(sigint_while_loading_data, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train.main([*QUICK, "--out", str(tmp_path / "run")])


def test_a_second_signal_leaves_the_script_without_the_interpreters_teardown(tmp_path, monkeypatch):
    """After a second Ctrl-C, `python train.py` (standalone) leaves through os._exit(130): the
    exception may have unwound a JAX call half-way (the first step compiling), and the
    interpreter's teardown then crashed with SIGSEGV (exit -11, seen twice in two tries).
    Called from Python, main returns 130 as before."""
    def leave(code):
        exits.append(code)
        raise SystemExit(code)
    exits = []
    monkeypatch.setattr(training, "train", lambda *args: training.LEFT)
    monkeypatch.setattr(train.os, "_exit", leave)
    assert train.main([*QUICK, "--out", str(tmp_path / "a")]) == train.EXIT_INTERRUPTED and not exits
    with pytest.raises(SystemExit):
        train.main([*QUICK, "--out", str(tmp_path / "b")], standalone=True)
    assert exits == [train.EXIT_INTERRUPTED]


def test_a_signal_during_an_epochs_evaluation_stops_at_that_epochs_end(tmp_path, monkeypatch, capsys):
    """It stopped one step into the next epoch (the step loop was the only place that looked)."""
    from vit import checkpoint

    finish_epoch = training.finish_epoch

    def finish_then_ctrl_c(run, *args):
        record = finish_epoch(run, *args)
        signal.raise_signal(signal.SIGINT)  # as if it came while evaluating or saving
        return record
    monkeypatch.setattr(training, "finish_epoch", finish_then_ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # called from Python: passed on once saved
        train.main([*QUICK, "--epochs", "3", "--out", str(run)])
    meta = checkpoint.load(run / "last.npz")[1]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0), meta
    # named as evaluate.py names it (it said "epoch 2, step 0")
    assert f"interrupted: saved {run / 'last.npz'} at the end of epoch 1;" in capsys.readouterr().err


def test_a_ctrl_c_swallowed_by_a_garbage_collector_callback_still_stops_the_start(
        monkeypatch, tmp_path, capsys):
    """A KeyboardInterrupt raised inside a gc callback (JAX registers one) is printed as
    "Exception ignored" and lost: a Ctrl-C in the first second then trained on (3 of 6 tries)."""
    load_data = training.load_data

    def ctrl_c_in_a_gc_callback(*args, **kwargs):
        ctrl_c_swallowed_by_a_gc_callback()
        return load_data(*args, **kwargs)
    monkeypatch.setattr(training, "load_data", ctrl_c_in_a_gc_callback)
    swallowed = []  # what gc would print as "Exception ignored" (sys.unraisablehook)
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    gc.collect()  # nothing of before this test is reported below
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own
    run = tmp_path / "run"
    try:
        assert train.main([*QUICK, "--out", str(run)], standalone=True) == train.EXIT_INTERRUPTED
        assert swallowed == []  # kept quiet: train.py's message says it all
        assert "interrupted while starting" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):  # called from Python: the caller gets it
            train.main([*QUICK, "--out", str(run)])
        # and what was there before is back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert sys.unraisablehook is not cmdline.InterruptWhileStarting._on_unraisable
        sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt))
        assert swallowed == [KeyboardInterrupt]
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not run.exists()


def test_a_sigint_ignored_when_started_stays_ignored(monkeypatch, tmp_path):
    """Started with SIGINT ignored (as `nohup ... &` starts a job), a SIGINT while starting does
    not stop the run."""
    load_data = training.load_data

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return load_data(*args, **kwargs)
    monkeypatch.setattr(training, "load_data", interrupted)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert train.main([*QUICK, "--out", str(tmp_path / "run")], standalone=True) == 0
    finally:
        signal.signal(signal.SIGINT, previous)


class Stop(Exception):
    pass


def test_while_starting_a_callers_own_sigint_handler_is_called(monkeypatch, tmp_path):
    """Called from Python with a SIGINT handler of the caller's: that handler gets the signal."""
    calls = []

    def own_handler(signum, frame):
        calls.append(signum)
        raise Stop
    load_data = training.load_data

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return load_data(*args, **kwargs)
    monkeypatch.setattr(training, "load_data", interrupted)
    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        with pytest.raises(Stop):
            train.main([*QUICK, "--out", str(tmp_path / "run")])
        assert signal.getsignal(signal.SIGINT) is own_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [signal.SIGINT]


def test_only_a_ctrl_c_that_came_is_kept_quiet(monkeypatch):
    """A KeyboardInterrupt that no SIGINT raised (code of someone else's) is reported as ever."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))

    def callback(phase, info):
        if phase == "start":
            raise KeyboardInterrupt
    with cmdline.InterruptWhileStarting():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
    assert seen == [KeyboardInterrupt]


def test_a_ctrl_c_during_an_import_is_held_until_the_import_is_done(tmp_path, monkeypatch):
    """Raised inside numpy's import (under jax's), it became ImportError: 'numpy._core.multiarray
    failed to import' (a traceback), or the process aborted; now it is held, and check() gives it."""
    module = tmp_path / "slow_module_for_the_test.py"
    module.write_text("import signal\nsignal.raise_signal(signal.SIGINT)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with cmdline.InterruptWhileStarting() as interrupt:
                import slow_module_for_the_test  # noqa: PLC0415
                reached.append(slow_module_for_the_test.DONE and interrupt.raised)  # imported whole
                interrupt.check()
        assert reached == [True] and "slow_module_for_the_test" in sys.modules
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.modules.pop("slow_module_for_the_test", None)


def test_a_process_other_than_0_does_not_say_it_saved(tmp_path, monkeypatch, capsys):
    """Seen in a two-process run stopped at process 1 alone: 'interrupted: saved last.npz', which
    only process 0 writes (and had not)."""
    from vit import parallel

    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    finish_epoch = training.finish_epoch

    def finish_then_ctrl_c(run, *args):
        record = finish_epoch(run, *args)
        signal.raise_signal(signal.SIGINT)
        return record
    monkeypatch.setattr(training, "finish_epoch", finish_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train.main([*QUICK, "--epochs", "3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "interrupted at the end of epoch 1: process 0 saves last.npz" in err, err
    assert "saved" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_decoding_workers_start_with_ctrl_c_blocked_and_this_process_gets_it():
    """A terminal's Ctrl-C goes to the whole process group: it raised KeyboardInterrupt in every
    decoding worker of a cache being built (each mid-import of jax, with a traceback). They start
    with SIGINT blocked; this process keeps it, held only while it starts them."""
    from sigint import sigint_blocked_here
    from vit.data.cache import decode_all

    seen = []
    decode_all([f"x{i}" for i in range(4)], sigint_blocked_here, (1, 1, 1), 2,
               lambda start, images, errors: seen.extend(images.ravel().tolist()), desc="x", progress=False)
    assert seen == [1, 1, 1, 1]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
