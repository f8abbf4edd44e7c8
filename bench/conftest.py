"""pytest wiring of the vitfuse benchmarks.

    python -m pytest bench/                  # quick: every contender checked at reduced sizes, no timing
    python -m pytest bench/ --benchmark      # check at full size, then time; write bench/results/

Without --benchmark (and so in plain ``python -m pytest``, whose testpaths include bench/) every
contender is checked against the reference at a reduced size and nothing is timed. With
--benchmark every contender is checked at the timed shape, then timed, and at the end of the
session bench/results/<device>-<date>.json and .md are written and the tables printed. Where
there is no GPU, the fused kernels run in Triton's interpreter: they are checked (at the reduced
size) but not timed, and their timing rows are skipped with that reason. --benchmark runs the
rows only: the tests of the bench's own code (the results files, gpu.sh, the tunes, ...) are
deselected, as they time nothing; they run without it, as CI runs them. The files are also
rewritten after every test that added rows, marked partial until the session ends, so a run cut
short (a timeout, a crash) keeps every row it measured.

    python -m pytest bench/ --benchmark --bench-continue bench/results/nvidia-h200-2026-11-30.json

finishes a run cut short, on any later day: the rows that file measured (a timing; rows "not run",
such as cuDNN refusing a shape, run again) are deselected, and this run's results file keeps them
beside its own rows (its own row wins where both exist) and lists the earlier file's runs. The
file must be of this device. With --bench-merge as well, the rows of the same device and day's
file are kept too (over the continued file's): gpu.sh's bench-ops and bench-step, each
continuing the same file, fill one results file between them.

``--benchmark`` is our own flag, not pytest-benchmark's (whose options all start with
``--benchmark-``; pytest matches option names exactly, so the two live side by side). The tests
do not use pytest-benchmark's fixture: bench/timer.py is the timer (harness.py calls it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import harness, report

SESSION = pytest.StashKey[harness.BenchSession]()


def pytest_addoption(parser):
    group = parser.getgroup("vitfuse bench", "vitfuse benchmarks (bench/)")
    group.addoption("--benchmark", action="store_true", dest="vitfuse_benchmark",
                    help="bench/: check every contender at full size, time it, and write "
                         "bench/results/<device>-<date>.{json,md} (default: quick correctness checks only)")
    group.addoption("--bench-merge", action="store_true", dest="vitfuse_bench_merge",
                    help="bench/: keep the rows of an earlier results file of the same device and "
                         "day that this run does not produce (to fill one file in several runs)")
    group.addoption("--bench-continue", metavar="PATH", default=None, dest="vitfuse_bench_continue",
                    help="bench/: an earlier results .json of this device (any day): with --benchmark, "
                         "the rows it measured are not run again (deselected) and are kept in this "
                         "run's results file (rows it did not time run again); combines with --bench-merge")
    group.addoption("--bench-results", default=str(report.RESULTS_DIR), dest="vitfuse_bench_results", metavar="DIR",
                    help="bench/: the folder the results files go to (default: bench/results)")
    group.addoption("--bench-seed", type=int, default=None, dest="vitfuse_bench_seed", metavar="SEED",
                    help="bench/: seed of the random inputs (default: fresh each session, recorded)")


def _session(config) -> harness.BenchSession:
    if SESSION not in config.stash:
        seed = config.getoption("vitfuse_bench_seed")
        if seed is None:
            seed = time.time_ns() % (2**31 - 1)
        config.stash[SESSION] = harness.BenchSession(
            timing=bool(config.getoption("vitfuse_benchmark")), seed=int(seed),
            merge=bool(config.getoption("vitfuse_bench_merge")))
    return config.stash[SESSION]


def pytest_configure(config):
    """The earlier results files a timed run keeps the rows of are read and checked at the start,
    before anything is collected or run: --bench-continue's (missing, not a results .json or of
    another device than this session's) and, with --bench-merge, this device and day's (not a
    results .json) are a usage error naming the file and what is wrong, not a traceback at the
    first row's write."""
    path = config.getoption("vitfuse_bench_continue", None)
    if path is not None:
        session = _session(config)
        try:
            session.continued = report.continued_results(Path(path), session.info)
        except ValueError as e:
            raise pytest.UsageError(f"--bench-continue {path}: {e}") from None
    if config.getoption("vitfuse_benchmark", False) and config.getoption("vitfuse_bench_merge", False):
        session = _session(config)
        try:
            report.merged_results(session, _results_dir(config))
        except ValueError as e:
            same_day, _ = report.results_paths(session, _results_dir(config))
            raise pytest.UsageError(f"--bench-merge {same_day}: {e}; move it away to start this "
                                    "day's file afresh") from None


def pytest_collection_modifyitems(config, items):
    """With --benchmark: the tests that record no row and the rows --bench-continue's file
    measured are deselected; of the rest,
    the rows the targets' verdicts need run first (in their files' order), then the others: a run
    cut short still judges as many targets as it measured."""
    if not config.getoption("vitfuse_benchmark"):
        return
    machinery = [item for item in items if _item_row_key(item) is None]
    if machinery:  # the bench's own tests: run without --benchmark (CI does), never on a GPU's time
        items[:] = [item for item in items if _item_row_key(item) is not None]
        config.hook.pytest_deselected(items=machinery)
    session = config.stash.get(SESSION, None)
    if session is not None and session.continued:
        measured = report.measured_keys(session.continued["rows"])
        left, done = [], []
        for item in items:
            (done if _item_row_key(item) in measured else left).append(item)
        if done:
            items[:] = left
            config.hook.pytest_deselected(items=done)
    first = report.target_rows()
    items.sort(key=lambda item: _item_row_key(item) not in first)  # stable: False first


def _item_row_key(item) -> tuple | None:
    """The key (report._row_key: group, shape label, contender, dtype) of the row a bench test
    records, as the results files and report.target_rows name rows; None for other tests."""
    params = getattr(item, "callspec", None) and item.callspec.params
    if not params:
        return None
    if "case" in params:  # attention, add+LayerNorm: a harness.KernelCase
        case = params["case"]
        return case.group, harness.shape_label(case.kind, case.shape), case.contender, case.dtype
    if "step_case" in params:  # the train step: (shape name, contender)
        shape, contender = params["step_case"]
        return ("train step", harness.shape_label("step", shape), contender,
                harness.step_dtype(contender))
    return None


def _results_dir(config) -> Path:
    return Path(config.getoption("vitfuse_bench_results"))


@pytest.fixture(scope="session")
def bench(request) -> harness.BenchSession:
    return _session(request.config)


def pytest_runtest_teardown(item, nextitem):
    """After each test that added rows, the results files are rewritten (marked partial): a run
    cut short (gpu.sh's PART_TIMEOUT, a machine's time limit, a crash) keeps what it measured."""
    session = item.config.stash.get(SESSION, None)
    if session is not None and session.timing and len(session.rows) > session.rows_written:
        report.write_results(session, _results_dir(item.config), finished=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SESSION not in config.stash:
        return
    session = config.stash[SESSION]
    if not session.timing or not session.rows:
        return
    # a run stopped by Ctrl-C keeps its files marked partial; failed checks still end a run
    finished = exitstatus != pytest.ExitCode.INTERRUPTED
    json_path, md_path, table = report.write_results(session, _results_dir(config), finished=finished)
    terminalreporter.section("vitfuse benchmark results")
    for line in table.splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written: {json_path} and {md_path}")
