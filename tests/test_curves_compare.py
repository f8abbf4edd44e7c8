"""`python -m vit.curves RUN [RUN ...] --out PNG`: several runs' validation top-1 and loss on shared
axes (a fine-tuned run beside one from scratch), each run's best epoch printed; a folder that is
not a run, or a metrics.jsonl line that is not an epoch's record, is an error naming it."""

import json

import numpy as np
import pytest

from vit import curves


def write_run(folder, top1, losses):
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "val_top1": a, "val_loss": v, "train_loss": t})
             for e, (a, (v, t)) in enumerate(zip(top1, losses), 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def drawn(monkeypatch):
    """The figures vit.curves saves, kept to be read back."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    return figures


def test_runs_are_drawn_on_shared_axes_and_their_best_epochs_printed(tmp_path, capsys, drawn):
    tuned = write_run(tmp_path / "tuned", [0.6, 0.9, 0.85], [(1.0, 1.2), (0.3, 0.4), (0.35, 0.2)])
    scratch = write_run(tmp_path / "scratch", [0.7, 0.7], [(1.1, 1.5), (0.8, 0.9)])  # a tie
    out = tmp_path / "compare.png"
    assert curves.main([str(tuned), str(scratch), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == (f"{tuned}: best val top-1 90.00% at epoch 2 of 3\n"
                                       f"{scratch}: best val top-1 70.00% at epoch 2 of 2\n"
                                       f"wrote {out}\n")
    (fig,) = drawn
    acc, loss = fig.axes
    lines = {line.get_label(): line for line in acc.lines + loss.lines}
    np.testing.assert_allclose(lines[str(tuned)].get_ydata(), [60, 90, 85])
    np.testing.assert_allclose(lines[str(scratch)].get_xdata(), [1, 2])
    np.testing.assert_allclose(lines[f"{tuned} (val)"].get_ydata(), [1.0, 0.3, 0.35])
    np.testing.assert_allclose(lines[f"{scratch} (train)"].get_ydata(), [1.5, 0.9])
    assert lines[f"{tuned} (train)"].get_color() == lines[str(tuned)].get_color() != \
        lines[str(scratch)].get_color()


def test_what_is_not_a_run_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "run", [0.5], [(1.0, 1.0)])
    assert curves.main([str(run), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path / 'nowhere'}: no metrics.jsonl" in capsys.readouterr().err
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2}\n')
    assert curves.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{run / 'metrics.jsonl'}, line 2: not an epoch's record (it lacks epoch, val_top1" in \
        capsys.readouterr().err
    (run / "metrics.jsonl").write_text("")
    assert curves.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "is empty: the run has finished no epoch" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("line", ['{"val_top1": 0.5, "val_loss": 1.0, "train_loss": 1.0}',
                                  '{"epoch": 2, "val_loss": 1.0, "train_loss": 1.0}',
                                  '{"epoch": 2, "val_top1": 0.5, "train_loss": 1.0}',
                                  '{"epoch": 2, "val_top1": 0.5, "val_loss": 1.0}',
                                  "3", "null", "[1, 2]", '"epoch"'])
def test_a_record_lacking_a_key_or_not_an_object_is_named(tmp_path, capsys, line):
    """Each key the figure draws is required; a line of JSON that is no object is no record
    (a number or null was a TypeError's traceback, a missing train_loss a KeyError's)."""
    run = write_run(tmp_path / "run", [0.5], [(1.0, 1.0)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    assert curves.main([str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{run / 'metrics.jsonl'}, line 2: not an epoch's record" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("top1, losses", [
    ([0.5, 0.8, 0.8, 0.7], [(1.0, 1.0), (0.4, 0.5), (0.4, 0.3), (0.6, 0.2)]),  # a full tie: the first
    ([0.8, 0.8, 0.8], [(0.5, 1.0), (0.3, 1.0), (0.4, 1.0)]),  # of equal top-1 the lower loss
    ([0.2, 0.9, 0.9], [(0.1, 1.0), (0.9, 1.0), (0.9, 1.0)])])  # top-1 first, then the first
def test_the_best_epoch_printed_is_the_one_best_npz_holds(tmp_path, capsys, top1, losses):
    """The epoch printed is the last for which RunState.finish_epoch said 'best' (run.save("best"))."""
    from vit.runstate import RunState

    run = write_run(tmp_path / "run", top1, losses)
    state = RunState.fresh({}, {}, [0.0], [1.0])
    saved = [h["epoch"] for h in curves.read_history(run) if state.finish_epoch(h)][-1]
    assert curves.main([str(run), "--out", str(tmp_path / "x.png")]) == 0
    assert f"{run}: best val top-1 {100 * max(top1):.2f}% at epoch {saved} of {len(top1)}\n" in \
        capsys.readouterr().out
