"""A pytest session of its own, started by tests/test_test_run.py: a long in-process train.py run,
then a test that leaves a marker file. A signal sent to the session's process group while the
first one trains must stop the whole session (the marker never appears), with the checkpoint
saved. Not collected by the suite itself (the name does not match test_*.py)."""

import os
from pathlib import Path

import train

OUT = Path(os.environ["VITFUSE_INNER_OUT"])


def test_a_long_training_run():
    code = train.main(["--dataset", "digits", "--no-progress", "--epochs", "1000",
                       "--batch-size", "128", "--set", "model.layers=1", "--set", "model.d_model=16",
                       "--set", "model.heads=2", "--set", "model.mlp_dim=16",
                       "--out", str(OUT / "run")])
    assert code == 0


def test_after_it():
    (OUT / "second-test-ran").write_text("the session went on after the signal\n")
