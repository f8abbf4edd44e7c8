"""Progress bars (vit/progress.py): on a terminal tqdm redraws in place; in a log (stderr a file
or a pipe) a bar is a plain line at most every LOG_SECONDS and its last frame, not hundreds of
frames joined by carriage returns (`python train.py > train.log 2>&1` held one per 10 steps)."""

import io
import re

import pytest

import train
from vit import progress
from vit.progress import LOG_SECONDS, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def steps_shown(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+)/100", text)]


@pytest.fixture
def clock(monkeypatch):
    """vit.progress's clock, moved by hand."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_in_a_log_a_bar_is_a_line_at_most_every_interval_and_its_last_frame(clock):
    log = io.StringIO()
    bar = progress_bar(total=100, desc="epoch 1/2", unit="step", file=log, mininterval=0,
                       miniters=1)
    for step in range(1, 101):  # a step a second; tqdm asked to draw every one
        clock[0] = float(step)
        bar.update(1)
        bar.set_postfix(loss=f"{1 / step:.3f}")  # redraws, as train.py's does every 10 steps
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n"), repr(text)
    shown = steps_shown(text)
    assert shown[-1] == 100 and shown == sorted(set(shown)), shown  # the end, each frame once
    assert len(shown) <= 100 / LOG_SECONDS + 1, shown  # one per interval, the last
    assert shown[0] >= LOG_SECONDS, shown  # no 0% line: a short bar is its last line alone
    assert all(b - a >= LOG_SECONDS for a, b in zip(shown[:-2], shown[1:-1])), shown


def test_a_line_is_due_exactly_an_interval_after_the_last(clock):
    log = io.StringIO()
    bar = progress_bar(total=100, file=log, mininterval=0, miniters=1)
    clock[0] = LOG_SECONDS - 0.5
    bar.update(1)
    assert log.getvalue() == ""
    clock[0] = LOG_SECONDS
    bar.update(1)
    assert steps_shown(log.getvalue()) == [2]
    bar.close()


def test_a_message_written_beside_the_bar_leaves_no_blank_line_in_the_log(clock, capsys):
    log = io.StringIO()
    bar = progress_bar(total=100, file=log, mininterval=0, miniters=1)
    bar.update(5)
    bar.write("saved last.npz")  # tqdm.write: clears the bar (spaces), prints, redraws
    bar.close()
    assert "saved last.npz" in capsys.readouterr().out
    assert "" not in log.getvalue().splitlines() and "\r" not in log.getvalue()


def test_on_a_terminal_the_bar_redraws_in_place():
    tty = Terminal()
    bar = progress_bar(total=100, file=tty, mininterval=0, miniters=1)
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") >= 100  # every frame, carriage return first
    assert steps_shown(tty.getvalue())[-1] == 100


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    for _ in progress_bar(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""


def test_train_py_logs_its_bars_as_lines(tmp_path, capsys):
    """A real run with its bars on and stderr captured (not a terminal), as in a log file."""
    args = ["--dataset", "digits", "--set", "model.layers=1", "--set", "model.d_model=32",
            "--set", "model.mlp_dim=64", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert train.main(args) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "epoch 1/1" in err and "\r" not in err, repr(err[-500:])
    # the bar's last line shows the epoch's figures, as its epoch line does (they were up to 10
    # steps old)
    bar_acc = re.findall(r"acc=([0-9.]+)%", err)[-1]
    line_acc = re.search(r"epoch 1: train loss [0-9.]+ acc ([0-9.]+)%", captured.out).group(1)
    assert abs(float(bar_acc) - float(line_acc)) <= 0.051, (bar_acc, line_acc)  # rounded: .1f, .2f
