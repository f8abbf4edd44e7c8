"""The results files: --bench-merge fills one file from several runs (bench/gpu.sh can split
the benchmark over two commands on a machine that allows 10 minutes per command), and a run
rewrites its files after every test that added rows, so one cut short keeps what it measured."""

import json
import signal
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path

from bench import harness, report


def session(seed, merge, rows):
    s = harness.BenchSession(timing=True, seed=seed, merge=merge)
    for contender, median in rows:
        s.record(group="add+layernorm fwd+bwd", shape="B=64", contender=contender, mode="fwd+bwd",
                 dtype="fp32", status="timed", median_ms=median, p20_ms=median, p80_ms=median,
                 gb_s=1.0)
    return s


def test_merge_keeps_earlier_rows_this_run_did_not_produce(tmp_path):
    report.write_results(session(1, False, [("reference", 2.0), ("autodiff", 3.0)]), tmp_path)
    json_path, md_path, _ = report.write_results(session(2, True, [("fused", 1.0), ("autodiff", 4.0)]),
                                                  tmp_path)
    data = json.loads(json_path.read_text())
    got = {r["contender"]: (r["median_ms"], r["seed"]) for r in data["rows"]}
    assert got == {"reference": (2.0, 1), "fused": (1.0, 2), "autodiff": (4.0, 2)}
    fused = next(r for r in data["rows"] if r["contender"] == "fused")
    assert fused["speedup_vs_reference"] == 2.0  # against the earlier run's reference row
    assert len(data["meta"]["runs"]) == 2 and "merged from 2 runs" in md_path.read_text()


def test_without_merge_a_run_replaces_the_file(tmp_path):
    report.write_results(session(1, False, [("reference", 2.0)]), tmp_path)
    json_path, _, _ = report.write_results(session(2, False, [("fused", 1.0)]), tmp_path)
    assert [r["contender"] for r in json.loads(json_path.read_text())["rows"]] == ["fused"]


def test_partial_writes_of_a_merging_run_read_the_earlier_file_once(tmp_path):
    """A merging run rewrites the file after each test: the earlier run's rows and start stay
    those of the file as it was before this run's first write (not this run's own partial file),
    and the files say 'partial' until the last write."""
    report.write_results(session(1, False, [("reference", 2.0), ("autodiff", 3.0)]), tmp_path)
    earlier_start = json.loads(next(tmp_path.glob("*.json")).read_text())["meta"]["started"]
    run = session(2, True, [("fused", 1.0)])
    json_path, md_path, _ = report.write_results(run, tmp_path, finished=False)
    # the teardown rewrites the files when len(run.rows) grows past this: it counts this run's
    # rows (1), not the merged file's (3), or a merging run would stop writing partial files
    assert run.rows_written == 1
    run.record(group="add+layernorm fwd+bwd", shape="B=64", contender="autodiff", mode="fwd+bwd",
               dtype="fp32", status="timed", median_ms=4.0, p20_ms=4.0, p80_ms=4.0, gb_s=1.0)
    report.write_results(run, tmp_path, finished=False)
    data = json.loads(json_path.read_text())
    assert data["meta"]["runs"] == [earlier_start, run.started], data["meta"]["runs"]
    assert {r["contender"]: r["seed"] for r in data["rows"]} == {"reference": 1, "fused": 2, "autodiff": 2}
    assert data["meta"]["finished"] is False and "row 2 (add+layernorm fwd+bwd, B=64, autodiff, fp32)" \
        in data["meta"]["partial"]
    assert "Partial results" in md_path.read_text()
    report.write_results(run, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["meta"]["finished"] is True and data["meta"]["partial"] is None
    assert data["meta"]["runs"] == [earlier_start, run.started]
    assert "Partial results" not in md_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, md_path.name])


def test_a_merging_run_without_an_earlier_file_is_one_run(tmp_path):
    """With no file of the same day to merge, a merging run's own partial file is not taken for
    an earlier run's when it rewrites it: one run listed, and no 'merged' note."""
    run = session(1, True, [("reference", 2.0)])
    report.write_results(run, tmp_path, finished=False)
    run.record(group="add+layernorm fwd+bwd", shape="B=64", contender="fused", mode="fwd+bwd",
               dtype="fp32", status="timed", median_ms=1.0, p20_ms=1.0, p80_ms=1.0, gb_s=1.0)
    json_path, md_path, _ = report.write_results(run, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["meta"]["runs"] == [run.started], data["meta"]["runs"]
    assert [r["contender"] for r in data["rows"]] == ["reference", "fused"]
    assert "merged from" not in md_path.read_text()


ROW = ('bench.record(group="add+layernorm fwd+bwd", shape="B=64", contender="{0}", mode="fwd+bwd", '
       'dtype="fp32", status="timed", median_ms=1.0, p20_ms=1.0, p80_ms=1.0, gb_s=1.0)')


def run_bench_session(tmp_path, last_test: str, *flags: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """pytest (flags: --benchmark unless given) with bench/conftest.py as a plugin on two tests
    that each add a row and a third, last_test; -> (the process, the results file it left, or
    None unless the results folder holds exactly one). All three are bench rows as the real ones
    are (a harness.KernelCase parameter): --benchmark runs nothing else."""
    tests = tmp_path / "test_rows.py"
    tests.write_text(textwrap.dedent(f"""\
        import os, signal
        import pytest
        from bench import harness
        row = pytest.mark.parametrize("case", [harness.KernelCase(
            "add+layernorm fwd+bwd", "layernorm", "fwd+bwd", "product", "any", "fp32")])
        @row
        def test_reference(bench, case):
            {ROW.format("reference")}
        @row
        def test_fused(bench, case):
            {ROW.format("fused")}
        @row
        def test_last(bench, case):
            {last_test}
        """))
    results = tmp_path / "results"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's settings
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
                           *(flags or ["--benchmark"]), "--bench-results", str(results), str(tests)],
                          cwd=root, capture_output=True, text=True)
    found = list(results.glob("*.json"))
    if len(found) != 1:
        return proc, None
    (json_path,) = found
    return proc, json.loads(json_path.read_text())


def test_a_killed_run_leaves_the_rows_it_measured(tmp_path):
    proc, data = run_bench_session(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert [r["contender"] for r in data["rows"]] == ["reference", "fused"]
    assert data["meta"]["finished"] is False and "row 2" in data["meta"]["partial"]
    fused = data["rows"][1]
    assert fused["speedup_vs_reference"] == 1.0  # rows written so far are finalized like the last write


def test_a_run_that_ends_is_not_marked_partial(tmp_path):
    proc, data = run_bench_session(tmp_path, "assert False, 'a failed check still ends the run'")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [r["contender"] for r in data["rows"]] == ["reference", "fused"]
    assert data["meta"]["finished"] is True and data["meta"]["partial"] is None


def test_an_interrupted_run_stays_partial(tmp_path):
    proc, data = run_bench_session(tmp_path, "raise KeyboardInterrupt")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert [r["contender"] for r in data["rows"]] == ["reference", "fused"]
    assert data["meta"]["finished"] is False and "row 2" in data["meta"]["partial"]


def test_a_run_without_benchmark_writes_no_results_files(tmp_path):
    """Plain pytest (the quick checks, also part of the suite) records rows too, but times
    nothing: it must not write results files (bench/results/ is committed)."""
    proc, data = run_bench_session(tmp_path, "pass", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data is None and not (tmp_path / "results").exists()


def test_merged_rows_runs_and_peaks_keep_their_order_and_the_newest_peaks(tmp_path):
    """Earlier rows ahead of this run's (in their own order); the runs listed oldest first; this
    run's measured peaks win over the earlier run's, which are kept when this run measured none."""
    first = session(1, False, [("reference", 2.0), ("dpa-xla", 5.0), ("autodiff", 3.0)])
    first.started, first.peaks = "2026-01-02T09:00:00+00:00", {"copy_gb_s": 10.0}
    report.write_results(first, tmp_path)
    second = session(2, True, [("fused", 1.0), ("autodiff", 4.0)])
    second.started, second.peaks = "2026-01-02T11:00:00+00:00", {"copy_gb_s": 4.0}
    json_path, _, _ = report.write_results(second, tmp_path)
    data = json.loads(json_path.read_text())
    assert [r["contender"] for r in data["rows"]] == ["reference", "dpa-xla", "fused", "autodiff"]
    assert data["meta"]["runs"] == [first.started, second.started]
    assert data["meta"]["peaks"] == {"copy_gb_s": 4.0}
    assert next(r for r in data["rows"] if r["contender"] == "fused")["frac_of_peak"] == 1.0 / 4.0
    third = session(3, True, [("fused", 1.0)])
    third.started = "2026-01-02T12:00:00+00:00"  # measured no peaks
    json_path, _, _ = report.write_results(third, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["meta"]["peaks"] == {"copy_gb_s": 4.0}
    assert data["meta"]["runs"] == [first.started, second.started, third.started]


def test_merging_into_a_same_day_file_that_is_not_a_results_file_stops_before_any_row(tmp_path):
    """--bench-merge reads the same device and day's file through report.read_results at the
    start: one that is not a results .json is a usage error naming it, before any row (not a
    traceback at the first row's write, after which no row would reach the files)."""
    today = harness.BenchSession(timing=True, seed=0)
    tomorrow = harness.BenchSession(timing=True, seed=0)  # a run started just after midnight
    tomorrow.started = (date.fromisoformat(today.started[:10]) + timedelta(days=1)).isoformat()
    results = tmp_path / "results"
    results.mkdir()
    for s in (today, tomorrow):
        report.results_paths(s, results)[0].write_text('{"rows": []}')
    proc, _ = run_bench_session(tmp_path, "pass", "--benchmark", "--bench-merge")
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest.ExitCode.USAGE_ERROR
    assert "passed" not in proc.stdout, proc.stdout
    said = [f"ERROR: --bench-merge {report.results_paths(s, results)[0]}: not a results .json as "
            "bench/report.py writes it (no 'meta' field); move it away" for s in (today, tomorrow)]
    assert any(line in proc.stderr for line in said), proc.stderr


def test_every_row_records_the_code_it_timed_and_a_mixed_file_says_so(tmp_path):
    """Each row carries the timed code's version (bench.device.code_version: a fingerprint of
    kernels/, vit/, bench/ and train.py, with the git commit when there is one) and the report's
    header names it; rows kept from a run on other code (--bench-merge, --bench-continue, or a
    file from before rows had a `code`) make the file say how many versions its rows span."""
    from bench import device

    first = session(1, False, [("reference", 2.0), ("autodiff", 3.0)])
    json_path, md_path, _ = report.write_results(first, tmp_path)
    data = json.loads(json_path.read_text())
    here = device.code_version()
    assert here.startswith(device.code_fingerprint()) and {r["code"] for r in data["rows"]} == {here}
    assert f"code {here}" in md_path.read_text() and "versions of the code" not in md_path.read_text()
    data["rows"][0]["code"] = "0123456789ab"  # a row timed on other code
    del data["rows"][1]["code"]  # a row written before rows had one
    json_path.write_text(json.dumps(data))
    report.write_results(session(2, True, [("fused", 1.0)]), tmp_path)
    note = json.loads(json_path.read_text())["meta"]["machine_note"]
    assert (f"Rows timed on 3 versions of the code: " in note and "0123456789ab (1 rows)" in note
            and "not recorded (1 rows)" in note and f"{here} (1 rows)" in note), note


def test_the_code_fingerprint_follows_the_timed_files_only(tmp_path):
    """A changed kernel, model or harness file changes the fingerprint; a results file, a cache
    or a file outside the timed code does not; without git there is no commit to name."""
    from bench import device

    for name, text in (("kernels/attention.py", "k"), ("kernels/attention_table.json", "{}"),
                       ("vit/model.py", "m"), ("bench/harness.py", "h"), ("train.py", "t"),
                       ("README.md", "r")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = device.code_fingerprint(tmp_path)
    assert device.git_commit(tmp_path) is None and device.code_version(tmp_path) == before
    # a copy inside another checkout (the lent GPU's, say) does not name that checkout's commit
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit",
                    "-q", "--allow-empty", "-m", "outer"], check=True)
    (tmp_path / "copy").mkdir()
    assert device.git_commit(tmp_path / "copy") is None
    assert device.git_commit(tmp_path).endswith("+changes")  # its own checkout: untracked files
    (tmp_path / "bench/results").mkdir()
    (tmp_path / "bench/results/x.json").write_text("{}")
    (tmp_path / "kernels/__pycache__").mkdir()
    (tmp_path / "kernels/__pycache__/attention.py").write_text("cache")
    (tmp_path / "README.md").write_text("changed")
    assert device.code_fingerprint(tmp_path) == before
    for name in ("kernels/attention.py", "kernels/attention_table.json", "vit/model.py",
                 "bench/harness.py", "train.py"):
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text + " ")
        assert device.code_fingerprint(tmp_path) != before, name
        (tmp_path / name).write_text(text)
    assert device.code_fingerprint(tmp_path) == before


def test_git_changes_follow_the_fingerprinted_files(tmp_path):
    """'+changes' marks a commit when a file the fingerprint hashes differs from it (changed,
    new, in a subfolder), not when a script, a README or a result beside them does."""
    from bench import device

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                        *args], check=True, capture_output=True)
    for name in ("kernels/attention.py", "vit/data/loader.py", "bench/gpu.sh", "train.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "code")
    assert not device.git_commit(tmp_path).endswith("+changes")
    for name in ("bench/gpu.sh", "kernels/README.md", "bench/results/cpu.json", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("y")
    assert not device.git_commit(tmp_path).endswith("+changes")
    for name in ("kernels/attention.py", "vit/data/loader.py", "train.py", "vit/new/table.json"):
        path = tmp_path / name
        text = path.read_text() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("changed")
        assert device.git_commit(tmp_path).endswith("+changes"), name
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
    assert not device.git_commit(tmp_path).endswith("+changes")
