"""The verdicts on the benchmark targets (bench/report.py evaluate_targets): which way a ratio of
medians goes, where the line falls, and what happens without a row to compare; that --benchmark
measures the targets' rows first; and the speedup plot bench/plot.py draws from a results file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness, report
from bench.harness import shape_label
from vit.figures import save_png

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


def test_faster_than_targets_are_strict():
    """"faster than" needs a ratio above 1 (a tie is missed); ">= 1.5x" is met at exactly 1.5x."""
    ln = dict(group="add+layernorm fwd+bwd", kind="layernorm")
    step = dict(group="train step", kind="step")
    tie = verdicts([row("fused", "fp32", 2.0, **ln), row("autodiff", "fp32", 2.0, **ln),
                    row("reference", "fp32", 3.0, **ln),
                    row("fused", "fp32", 2.0, **step), row("reference", "fp32", 2.0, **step),
                    row("autodiff", "fp32", 2.0, **step)])
    for target in ("fused add+LN fwd+bwd faster than autodiff (fp32)",
                   "train step --fused faster than the reference step (fp32)",
                   "train step --fused faster than the autodiff step (fp32)"):
        assert tie[target][1].startswith("missed"), (target, tie[target])
    assert tie["fused add+LN fwd+bwd >= 1.5x faster than reference (fp32)"][1] == "met"


def test_key_blocked_targets_at_the_vit_shapes():
    """Within 1.25x of cuDNN means fused-key-blocked / cuDNN <= 1.25, at each ViT size's own
    shape (rows of the product shape do not count for it)."""
    within = "key-blocked attention fwd+bwd within 1.25x of cuDNN at L=197 Dh=64, {} (bf16)"
    twice = "key-blocked attention fwd+bwd >= 2x faster than reference at L=197 Dh=64, {} (bf16)"
    rows = [row("fused-key-blocked", "bf16", 1.2, shape="vit-s"), row("dpa-cudnn", "bf16", 1.0, shape="vit-s"),
            row("reference", "bf16", 2.5, shape="vit-s"),
            row("fused-key-blocked", "bf16", 1.3, shape="vit-b"), row("dpa-cudnn", "bf16", 1.0, shape="vit-b"),
            row("reference", "bf16", 2.5, shape="vit-b")]
    got = verdicts(rows)
    assert got[within.format("ViT-S/16")][1] == "met"
    assert got[within.format("ViT-B/16")][1].startswith("missed")
    assert got[twice.format("ViT-S/16")][1] == "met" and got[twice.format("ViT-B/16")][1].startswith("missed")
    product = verdicts([dict(r, shape=shape_label("attention", "product")) for r in rows])
    for size in ("ViT-S/16", "ViT-B/16"):
        for target in (within, twice):
            assert product[target.format(size)][1].startswith("not evaluated"), product[target.format(size)]


def test_the_dispatcher_target_is_met_outright_only_when_both_directions_run_one_tile():
    target = "at L=65 the dispatcher's choice no slower than the one-tile kernel, fwd+bwd (fp32)"
    one_tile = verdicts([row("fused", "fp32", 1.0, note="dispatcher: fwd one-tile (rule), bwd one-tile (rule)")])
    assert one_tile[target][1].startswith("met: the dispatcher runs the one-tile kernel itself")
    mixed = "dispatcher: fwd key-blocked (table), bwd one-tile (rule)"
    slower = verdicts([row("fused", "fp32", 1.2, note=mixed), row("fused-one-tile", "fp32", 1.0)])
    assert slower[target][1].startswith("missed"), slower[target]
    untimed = verdicts([row("fused", "fp32", 1.0, note=mixed)])
    assert untimed[target][1] == "not evaluated: no fused-one-tile (fp32) row in this run"


def test_the_rows_the_bench_runs_first_are_enough_to_judge_every_target():
    """report.target_rows names rows as the results files do (group, shape label, contender,
    dtype): timed rows of exactly those give every target a verdict (a row left out, or named at
    the wrong shape, would be run late and leave its target unjudged in a run cut short)."""
    rows = [{"group": group, "shape": shape, "contender": contender, "dtype": dtype,
             "median_ms": 1.0, "status": "timed", "note": ""}
            for group, shape, contender, dtype in report.target_rows()]
    assert {r["shape"] for r in rows} == {shape_label("attention", "product"),
                                          shape_label("attention", "vit-s"),
                                          shape_label("attention", "vit-b"),
                                          shape_label("layernorm", "product"),
                                          shape_label("step", "product")}
    for target, (measured, verdict) in verdicts(rows).items():
        assert not verdict.startswith("not evaluated"), (target, verdict)


def test_speedups_are_against_the_reference_row_of_the_same_dtype():
    rows = [dict(row("reference", "fp32", 2.0), speedup_vs_reference=None),
            dict(row("reference", "bf16", 1.0), speedup_vs_reference=None),
            dict(row("fused", "fp32", 1.0), speedup_vs_reference=None),
            dict(row("fused", "bf16", 0.25), speedup_vs_reference=None),
            dict(row("dpa-cudnn", "fp16", 0.5), speedup_vs_reference=None)]  # no fp16 reference
    got = {(r["contender"], r["dtype"]): r["speedup_vs_reference"] for r in report.finalize(rows, None)}
    assert got == {("reference", "fp32"): 1.0, ("reference", "bf16"): 1.0, ("fused", "fp32"): 2.0,
                   ("fused", "bf16"): 4.0, ("dpa-cudnn", "fp16"): None}
    # the train step's bf16 reference is a contender of its own, reference-bf16
    step = [row("reference", "fp32", 8.0, group="train step", kind="step"),
            row("reference-bf16", "bf16", 6.0, group="train step", kind="step"),
            row("fused-bf16", "bf16", 4.0, group="train step", kind="step"),
            row("fused-bf16", "bf16", 4.0, group="train step", kind="step", shape="large")]
    got = [r.get("speedup_vs_reference") for r in report.finalize(step, None)]
    assert got == [1.0, 1.0, 1.5, None]


def test_plot_draws_each_timed_rows_speedup(tmp_path, capsys, monkeypatch):
    """bench/plot.py on a results file: one bar per timed row with a speedup, its height that
    speedup; untimed rows are listed, not drawn."""
    pytest.importorskip("matplotlib")

    from bench import plot

    saved = []
    monkeypatch.setattr(plot, "save_png", lambda fig, out, dpi: (saved.append(fig), save_png(fig, out, dpi)))
    rows = [dict(row("reference", "fp32", 2.0), speedup_vs_reference=1.0),
            dict(row("fused", "fp32", 0.5), speedup_vs_reference=4.0),
            dict(row("fused", "bf16", None), status="checked, not timed", speedup_vs_reference=None)]
    path = tmp_path / "cpu-2026-01-01.json"
    path.write_text(json.dumps({"meta": {"date": "2026-01-01", "info": {"device": "cpu"}}, "rows": rows}))
    assert plot.main([str(path), "-o", str(tmp_path / "speedup.png")]) == 0
    assert "speedup.png: 2 bars" in capsys.readouterr().out and (tmp_path / "speedup.png").is_file()
    (fig,) = saved
    (ax,) = fig.axes
    assert sorted(bar.get_height() for bar in ax.patches) == [1.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-2026-01-01.json", "speedup.png"]


def test_plot_names_a_file_that_is_not_a_results_file(tmp_path, capsys):
    from bench import plot

    for text, says in (("# a README", "not a results file of the bench, which is JSON"),
                       ('{"meta": {}}', "not a vitfuse results file (no 'rows')")):
        path = tmp_path / "notes.md"
        path.write_text(text)
        assert plot.main([str(path)]) == 2
        assert f"plot.py: error: {path}: {says}" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "nosuch.json")]) == 2
    assert str(tmp_path / "nosuch.json") in capsys.readouterr().err


def test_benchmark_runs_every_targets_rows_first():
    """Under --benchmark, the tests of the rows the targets need are collected first (a run cut
    short still judges what it can), and every such row has a test (a target naming a contender,
    dtype or shape the bench does not produce could never be judged)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--benchmark",
                           "-p", "no:cacheprovider", "bench/"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    # test ids name mode-shape-dtype-contender (attention, add+LN) and shape-contender (step);
    # shape names may hold a '-' (vit-s), so they are matched against the shape tables
    def split_shape(params, names):
        shape = max((s for s in names if params.startswith(s + "-")), key=len)  # vit-b-384, not vit-b
        return shape, params[len(shape) + 1:]

    def key(test_id):
        name, _, params = test_id.partition("[")
        params = params.rstrip("]")
        name = name.rpartition("::")[2]
        if name == "test_train_step":
            shape, contender = split_shape(params, harness.STEP_BATCH)
            dtype = "bf16" if contender.endswith("-bf16") else "fp32"
            return "train step", shape_label("step", shape), contender, dtype
        for test, group, kind, shapes in (
                ("test_attention", "attention", "attention", harness.ATTN_SHAPES),
                ("test_add_layernorm", "add+layernorm", "layernorm", harness.LN_SHAPES)):
            if name == test:
                mode, rest = params.split("-", 1)
                shape, rest = split_shape(rest, shapes)
                dtype, contender = rest.split("-", 1)
                return f"{group} {mode}", shape_label(kind, shape), contender, dtype
        return None

    keys = [key(i) for i in ids]
    wanted = report.target_rows()
    assert wanted <= set(keys), sorted(wanted - set(keys))
    n = len(wanted)
    assert set(keys[:n]) == wanted, keys[:n]


def test_each_targets_rows_say_why_in_kernels_bytes_and_peak():
    """The reason a verdict can give without a profile: both rows' kernel counts, XLA's bytes
    (not for our kernels alone, which XLA counts as 0) and % of peak; '-' without both timings."""
    ref = dict(row("reference", "fp32", 0.147), kernels=13, hlo_mbytes=180.51, frac_of_peak=0.133)
    fused = dict(row("fused", "fp32", 0.258), kernels=2, hlo_mbytes=1.4e-05, frac_of_peak=0.076)
    step = dict(row("fused", "fp32", 8.4, group="train step", kind="step"), kernels=434,
                hlo_mbytes=1628.6, frac_of_peak=None)
    step_ref = dict(row("reference", "fp32", 8.6, group="train step", kind="step"), kernels=686,
                    hlo_mbytes=4349.2, frac_of_peak=None)
    said = dict(zip([t.name for t in report.TARGETS], report.target_evidence([ref, fused, step, step_ref])))
    assert said[FP32_2X] == ("fused: 2 kernels, 7.6% of peak; "
                             "reference: 13 kernels, 180.5 MB by XLA, 13.3% of peak")
    assert said["train step --fused faster than the reference step (fp32)"] == (
        "fused: 434 kernels, 1628.6 MB by XLA around our kernels; reference: 686 kernels, 4349.2 MB by XLA")
    assert said[CUDNN] == "-"  # no dpa-cudnn row
    assert said["fused add+LN fwd+bwd >= 1.5x faster than reference (fp32)"] == "-"
    meta = {"date": "d", "started": "s", "seed": 1, "info": {k: "x" for k in (
        "device", "python", "jax", "jaxlib", "triton", "jax_triton")}, "targets": report.evaluate_targets([ref, fused]),
        "target_evidence": report.target_evidence([ref, fused]), "method": []}
    md = report.markdown([], meta)  # the targets table only (no result rows to lay out)
    assert "| target | measured | verdict | rows say |" in md
    assert "reference: 13 kernels, 180.5 MB by XLA, 13.3% of peak |" in md
