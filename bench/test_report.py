"""The verdicts on the benchmark targets (bench/report.py evaluate_targets): which way a ratio of
medians goes, where the line falls, and what happens without a row to compare."""

from bench import report
from bench.harness import shape_label

ATTN = "attention fwd+bwd"


def row(contender, dtype, median_ms, group=ATTN, kind="attention", shape="product", note=""):
    return {"group": group, "shape": shape_label(kind, shape), "contender": contender,
            "dtype": dtype, "median_ms": median_ms, "status": "timed", "note": note}


def verdicts(rows) -> dict:
    return {target: (measured, verdict) for target, measured, verdict in report.evaluate_targets(rows)}


FP32_2X = "fused attention fwd+bwd >= 2x faster than reference (fp32)"
CUDNN = "fused attention fwd+bwd no slower than dot_product_attention(cudnn) (bf16)"


def test_a_target_is_met_when_the_fused_row_is_fast_enough_and_missed_when_it_is_not():
    met = verdicts([row("fused", "fp32", 1.0), row("reference", "fp32", 3.0)])
    measured, verdict = met[FP32_2X]
    assert verdict == "met" and "= 3.00x" in measured, met[FP32_2X]
    missed = verdicts([row("fused", "fp32", 1.0), row("reference", "fp32", 1.5)])
    measured, verdict = missed[FP32_2X]
    assert "= 1.50x" in measured and verdict.startswith("missed by 1.33x"), missed[FP32_2X]
    # slower than the reference is never met, however the numbers fall
    slower = verdicts([row("fused", "fp32", 3.0), row("reference", "fp32", 1.0)])
    assert slower[FP32_2X][1].startswith("missed"), slower[FP32_2X]


def test_no_slower_means_a_ratio_of_at_least_one():
    same = verdicts([row("fused", "bf16", 2.0), row("dpa-cudnn", "bf16", 2.0)])
    assert same[CUDNN][1] == "met"
    slower = verdicts([row("fused", "bf16", 2.2), row("dpa-cudnn", "bf16", 2.0)])
    assert slower[CUDNN][1].startswith("missed"), slower[CUDNN]


def test_a_target_without_its_rows_is_not_evaluated():
    got = verdicts([row("fused", "fp32", 1.0)])
    assert got[FP32_2X] == ("-", "not evaluated: no reference (fp32) row in this run")
    untimed = dict(row("reference", "fp32", None), status="failed", why="wrong result")
    got = verdicts([row("fused", "fp32", 1.0), untimed])
    assert got[FP32_2X] == ("-", "not evaluated: reference (fp32) failed: wrong result")
