"""--bench-merge: one results file filled by several runs (bench/gpu.sh can split the benchmark
over two commands on a machine that allows 10 minutes per command)."""

import json

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
