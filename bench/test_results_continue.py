"""--bench-continue: a later run (another day) of a bench cut short measures only the rows that the
earlier results file of the same device did not time, and writes one results file holding the
earlier rows and its own; a file that is missing, not a results .json or of another device stops
the run before any row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness, report
from bench.device import device_info

ROOT = Path(__file__).resolve().parent.parent
LN, LABEL = "add+layernorm fwd+bwd", harness.shape_label("layernorm", "product")
ATTENTION_ROW = dict(group="attention fwd", shape=harness.shape_label("attention", "product"),
                     contender="fused", mode="fwd", dtype="fp32", status="timed", median_ms=0.5,
                     p20_ms=0.5, p80_ms=0.5, tflop_s=1.0)

# three bench rows as the real bench's tests name them (a harness.KernelCase parameter "case"),
# each noting that it ran
TESTS = '''\
import pytest
from bench import harness

CASES = [harness.KernelCase("add+layernorm fwd+bwd", "layernorm", "fwd+bwd", "product", contender, "fp32")
         for contender in {contenders!r}]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_row(case, bench):
    with open({ran!r}, "a") as f:
        f.write(case.contender + "\\n")
    bench.record(group=case.group, shape=harness.shape_label(case.kind, case.shape),
                 contender=case.contender, mode=case.mode, dtype=case.dtype, status="timed",
                 median_ms=1.0, p20_ms=1.0, p80_ms=1.0, gb_s=1.0)
'''


def earlier_session(statuses: dict, seed=1, started="2026-01-01T09:00:00+00:00") -> harness.BenchSession:
    """An earlier run on this machine: one add+LN fwd+bwd row per contender with the given status
    ("timed": 2 ms; otherwise no timing, as a contender unavailable or failing its check), and an
    attention row that the later run has no test for."""
    s = harness.BenchSession(timing=True, seed=seed)
    s.started = started
    for contender, status in statuses.items():
        ms = 2.0 if status == "timed" else None
        s.record(group=LN, shape=LABEL, contender=contender, mode="fwd+bwd", dtype="fp32", status=status,
                 median_ms=ms, p20_ms=ms, p80_ms=ms, gb_s=1.0 if ms else None, note="" if ms else "unavailable here")
    s.record(**ATTENTION_ROW)
    return s


def earlier_file(tmp_path, statuses: dict, device: str | None = None) -> Path:
    """earlier_session's results file, in a folder of its own (device: another device's name)."""
    json_path, _, _ = report.write_results(earlier_session(statuses), tmp_path / "earlier")
    if device:
        data = json.loads(json_path.read_text())
        data["meta"]["info"]["device"] = device
        json_path.write_text(json.dumps(data))
    return json_path


def run_bench(tmp_path, continued, *flags: str, contenders=("reference", "fused", "autodiff"),
              more_tests: str = "") -> tuple[subprocess.CompletedProcess, list[str], dict | None]:
    """pytest (flags: --benchmark unless given) with bench/conftest.py as a plugin on TESTS (one
    test per contender, in this order), --bench-seed 2, --bench-continue continued; -> (the
    process, the contenders whose test ran, in the order they ran, the results file it wrote or
    None). more_tests: more of that file's text (it may write to RAN)."""
    ran = tmp_path / "ran"
    tests = tmp_path / "test_rows.py"
    tests.write_text(TESTS.format(ran=str(ran), contenders=tuple(contenders))
                     + more_tests.replace("RAN", repr(str(ran))))
    results = tmp_path / "results"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's settings
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
                           *(flags or ["--benchmark"]), "--bench-seed", "2", "--bench-results", str(results),
                           "--bench-continue", str(continued), str(tests)],
                          cwd=ROOT, capture_output=True, text=True)
    found = list(results.glob("*.json"))
    data = json.loads(found[0].read_text()) if found else None
    return proc, ran.read_text().split() if ran.exists() else [], data


def test_continue_runs_only_the_rows_the_earlier_file_did_not_time_and_keeps_its_rows(tmp_path):
    """reference was timed: deselected, its row kept; fused was "not run" (unavailable) and
    autodiff failed its check: both run again, and their new rows replace the earlier ones."""
    continued = earlier_file(tmp_path, {"reference": "timed", "fused": "not run", "autodiff": "check FAILED"})
    proc, ran, data = run_bench(tmp_path, continued)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(ran) == ["autodiff", "fused"] and "1 deselected" in proc.stdout, proc.stdout
    rows = {(r["group"], r["contender"]): (r["status"], r["median_ms"], r["seed"]) for r in data["rows"]}
    assert rows == {(LN, "reference"): ("timed", 2.0, 1), (LN, "fused"): ("timed", 1.0, 2),
                    (LN, "autodiff"): ("timed", 1.0, 2), ("attention fwd", "fused"): ("timed", 0.5, 1)}
    fused = next(r for r in data["rows"] if r["contender"] == "fused" and r["group"] == LN)
    assert fused["speedup_vs_reference"] == 2.0  # against the earlier run's reference row
    earlier_start = json.loads(continued.read_text())["meta"]["started"]
    assert data["meta"]["runs"][0] == earlier_start and len(data["meta"]["runs"]) == 2
    assert "merged from 2 runs (--bench-continue)" in data["meta"]["machine_note"]
    assert json.loads(continued.read_text())["meta"]["runs"] == [earlier_start]  # read, not rewritten


def test_continue_deselects_nothing_without_benchmark(tmp_path):
    """The quick checks (no --benchmark) run every test and write no results file."""
    continued = earlier_file(tmp_path, {"reference": "timed", "fused": "timed", "autodiff": "timed"})
    proc, ran, data = run_bench(tmp_path, continued, "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(ran) == ["autodiff", "fused", "reference"] and data is None


MACHINERY_TEST = '''

def test_the_bench_code(bench):
    with open(RAN, "a") as f:
        f.write("machinery\\n")
'''


def test_benchmark_runs_the_rows_only(tmp_path):
    """A test that records no row (the bench's own code: results files, gpu.sh, the tunes) is
    deselected by --benchmark, so a GPU's time goes to the rows; without it, it runs."""
    continued = earlier_file(tmp_path, {"reference": "timed"})
    proc, ran, _ = run_bench(tmp_path, continued, more_tests=MACHINERY_TEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(ran) == ["autodiff", "fused"] and "2 deselected" in proc.stdout, (ran, proc.stdout)
    (tmp_path / "ran").unlink()
    proc, ran, _ = run_bench(tmp_path, continued, "-q", more_tests=MACHINERY_TEST)
    assert proc.returncode == 0 and sorted(ran) == ["autodiff", "fused", "machinery", "reference"], ran


def test_continue_still_runs_the_target_rows_first(tmp_path):
    """Of the rows left to run, the ones the targets' verdicts need still run first (as without
    --bench-continue): a continued run cut short again judges as many targets as it can. Here
    "dpa-xla" (no target needs an add+LN dpa-xla row) is collected first and runs last."""
    continued = earlier_file(tmp_path, {"reference": "timed"})
    proc, ran, _ = run_bench(tmp_path, continued, contenders=("dpa-xla", "reference", "fused", "autodiff"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ran == ["fused", "autodiff", "dpa-xla"] and "1 deselected" in proc.stdout, (ran, proc.stdout)


def test_continue_from_another_device_stops_before_any_row(tmp_path):
    continued = earlier_file(tmp_path, {"reference": "timed"}, device="NVIDIA H200")
    proc, ran, data = run_bench(tmp_path, continued)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    here = device_info()["device"]
    assert (f"ERROR: --bench-continue {continued}: its rows were measured on 'NVIDIA H200', "
            f"this run is on {here!r}") in proc.stderr, proc.stderr
    assert ran == [] and data is None


# a results file but for the one field named (what write_results writes, cut down; read_results
# finds the missing field before the device is compared)
META = {"info": {"device": "a GPU"}, "started": "2026-01-01T09:00:00+00:00"}
ROW = {"group": LN, "shape": LABEL, "contender": "fused", "dtype": "fp32", "median_ms": 1.0}
NOT_OURS = "not a results .json as bench/report.py writes it"


@pytest.mark.parametrize("text, wrong", [
    (None, "no such file"),
    ("<a folder>", "not a file"),
    ("rows: none", "not a results .json: cannot read it as JSON"),
    ('{"rows": []}', f"{NOT_OURS} (no 'meta' field)"),
    ("[]", NOT_OURS),
    (json.dumps({"meta": {"info": META["info"]}, "rows": []}), f"{NOT_OURS} (no 'started' field)"),
    (json.dumps({"meta": META, "rows": [ROW]}), f"{NOT_OURS} (no 'status' field)"),
    (json.dumps({"meta": META, "rows": [{"status": "timed", "median_ms": 1.0}]}), f"{NOT_OURS} (no 'group' field)"),
], ids=["missing", "a-folder", "not-json", "no-meta", "a-list", "no-started", "row-without-status",
        "row-without-key"])
def test_continue_from_a_missing_or_wrong_file_stops_before_any_row(tmp_path, text, wrong):
    """Every field that continuing reads (the device, the start, each row's key, status and
    timing) is checked at the start: a file without one is a usage error naming the field, not
    a traceback at collection or at the first write."""
    continued = tmp_path / "earlier.json"
    if text == "<a folder>":
        continued.mkdir()
    elif text is not None:
        continued.write_text(text)
    proc, ran, data = run_bench(tmp_path, continued)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert f"ERROR: --bench-continue {continued}: {wrong}" in proc.stderr, proc.stderr
    assert ran == [] and data is None


def test_a_row_without_a_timing_is_not_measured(tmp_path):
    session = earlier_session({"reference": "timed", "fused": "not run", "autodiff": "check FAILED"})
    session.record(group=LN, shape=LABEL, contender="fused-bf16", mode="fwd+bwd", dtype="bf16",
                   status="checked, not timed", note="bf16 on a CPU")
    assert report.measured_keys(session.rows) == {(LN, LABEL, "reference", "fp32"),
                                                  ("attention fwd", ATTENTION_ROW["shape"], "fused", "fp32")}


def test_continue_keys_are_the_rows_the_real_bench_records(tmp_path):
    """The first GPU run's file, moved to this device: collecting the real bench deselects its
    timed rows, one test each, and keeps the rows it did not time (cuDNN refused them) and the
    rows it never reached."""
    data = json.loads((ROOT / "bench" / "results" / "nvidia-h200-2026-11-30.json").read_text())
    data["meta"]["info"]["device"] = device_info()["device"]
    continued = tmp_path / "earlier.json"
    continued.write_text(json.dumps(data))
    timed = len(report.measured_keys(data["rows"]))

    def collect(*flags):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                               "--benchmark", *flags, "bench/test_bench_attention.py",
                               "bench/test_bench_layernorm.py", "bench/test_bench_train_step.py"],
                              cwd=ROOT, capture_output=True, text=True)
    # the tests of those files that record no row (--benchmark deselects them in any case)
    machinery = int(collect().stdout.rpartition("(")[2].split()[0])
    proc = collect("--bench-continue", str(continued))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert timed == 64 and f"({timed + machinery} deselected)" in proc.stdout, proc.stdout[-500:]
    for measured in ("test_attention[fwd+bwd-product-fp32-fused]", "test_add_layernorm[fwd+bwd-product-fp32-fused]",
                     "test_train_step[large-fused-bf16]"):
        assert measured not in proc.stdout, measured
    for missing in ("test_attention[fwd+bwd-product-bf16-dpa-cudnn]", "test_add_layernorm[fwd+bwd-large-fp32-fused]",
                    "test_train_step[vit-s16-fused]"):
        assert missing in proc.stdout, missing


def test_continue_with_merge_keeps_the_same_days_rows_too(tmp_path):
    """gpu.sh's bench-ops then bench-step, both continuing one file: the second writes the first's
    file of the same day (--bench-merge), which already holds the continued file's rows. Newer
    rows win (this run's, then the same day's, then the continued file's); each run listed once;
    the newest measured peaks are kept (the same day's, where this run measured none)."""
    continued = earlier_session({"reference": "timed", "fused": "timed", "autodiff": "not run"})
    ops = earlier_session({"fused": "timed"}, seed=2, started="2026-01-02T09:00:00+00:00")
    ops.rows = ops.rows[:1]
    ops.continued = json.loads(json.dumps({"meta": {"started": continued.started, "runs": [continued.started],
                                                    "peaks": {"copy_gb_s": 1.0}}, "rows": continued.rows}))
    ops.peaks = {"copy_gb_s": 2.0}
    report.write_results(ops, tmp_path)
    step = earlier_session({"autodiff": "timed"}, seed=3, started="2026-01-02T11:00:00+00:00")
    step.rows = step.rows[:1]
    step.merge, step.continued = True, ops.continued
    json_path, md_path, _ = report.write_results(step, tmp_path)
    data = json.loads(json_path.read_text())
    assert {(r["group"], r["contender"]): r["seed"] for r in data["rows"]} == {
        (LN, "reference"): 1, (LN, "fused"): 2, (LN, "autodiff"): 3, ("attention fwd", "fused"): 1}
    assert data["meta"]["runs"] == [continued.started, ops.started, step.started]
    assert step.peaks is None and data["meta"]["peaks"] == {"copy_gb_s": 2.0}
    assert "merged from 3 runs (--bench-continue, --bench-merge)" in md_path.read_text()
