"""bench/tune_layernorm.py: each variant's geometry reaches the launches of its direction only, the
plan is kernels/layernorm.py's own geometry, on the CPU it checks every variant in Triton's
interpreter (nothing timed) and exits 0, a variant that computes wrong numbers is reported and
makes it exit 1 (so does a plan that fails to run), and without a GPU or --interpret it refuses to
run. Timing itself needs a GPU: here a test gives made-up times to check what the tune computes from
them (GB/s, speed vs the plan) and where its tables put them."""

import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from bench import harness, tune_layernorm
from bench.test_bench_layernorm import make_inputs
from kernels import COMPILED, INTERPRETED, layernorm
from kernels.launch import record_launches

PRODUCT_ROWS = 64 * 65


def launches(mode, args, launcher=COMPILED):
    """{kernel name: LaunchSpec} of the bench's fused function of `mode`, traced, not run."""
    with record_launches() as specs:
        jax.eval_shape(tune_layernorm.function(mode, launcher), *args)
    return {s.name: s for s in specs}


def product_args():
    return jax.eval_shape(lambda: make_inputs("product", jnp.float32, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("launcher", [COMPILED, INTERPRETED], ids=lambda x: x.name)
@pytest.mark.parametrize("mode", tune_layernorm.MODES)
def test_the_plan_is_the_products_geometry(launcher, mode):
    """Every setting starts from the plan: the geometry layernorm.geometry gives today."""
    for m, n in ((PRODUCT_ROWS, 256), (33280, 256), (130, 768), (7, 100)):
        setting = tune_layernorm.plan_setting(m, n, mode, launcher)
        g = layernorm.geometry(m, n, launcher, "fwd" if mode == "fwd" else "bwd")
        if mode == "fwd":
            assert setting == (g.block_m, g.num_warps)
        else:
            assert layernorm.make_geometry(m, n, *setting) == g


def test_a_forward_variant_reaches_the_forward_only():
    args = product_args()
    plan = launches("fwd+bwd", args)
    with tune_layernorm._traced("fwd", (4, 2)):
        got = launches("fwd+bwd", args)
    fwd = got["vitfuse_ln_fwd"]
    assert (fwd.constexprs["BLOCK_M"], fwd.num_warps, fwd.grid) == (4, 2, (PRODUCT_ROWS // 4,))
    for name in ("vitfuse_ln_bwd", "vitfuse_ln_bwd_reduce"):
        assert (got[name].grid, got[name].num_warps, got[name].constexprs) == \
            (plan[name].grid, plan[name].num_warps, plan[name].constexprs)
    restored = launches("fwd+bwd", args)["vitfuse_ln_fwd"]
    assert restored.constexprs == plan["vitfuse_ln_fwd"].constexprs


def test_a_backward_variant_sets_both_backward_kernels_and_keeps_the_forward():
    """(BLOCK_M 8, 4 warps, at most 128 programs, 32 reduction columns) at 4160 rows: 520 row tiles,
    5 a program, 104 programs; 8 reduction programs of 32 columns, summing 128 rows a step."""
    args = product_args()
    plan = launches("fwd+bwd", args)
    with tune_layernorm._traced("fwd+bwd", (8, 4, 128, 32)):
        got = launches("fwd+bwd", args)
    bwd, red = got["vitfuse_ln_bwd"], got["vitfuse_ln_bwd_reduce"]
    assert (bwd.constexprs["BLOCK_M"], bwd.constexprs["TILES"], bwd.num_warps, bwd.grid) == (8, 5, 4, (104,))
    assert (red.grid, red.constexprs["G"], red.constexprs["BLOCK_N"], red.constexprs["BLOCK_G"]) == \
        ((8,), 104, 32, 128)
    assert got["vitfuse_ln_fwd"].constexprs == plan["vitfuse_ln_fwd"].constexprs


def test_an_override_is_undone_when_its_trace_raises():
    """A variant that fails to trace or compile (reported, not fatal) leaves the plan in place for
    the variants, and the plan row, that follow it."""
    default = layernorm.geometry
    for mode, setting in (("fwd", (4, 2)), ("fwd+bwd", (8, 4, 128, 32))):
        with pytest.raises(RuntimeError), tune_layernorm._traced(mode, setting):
            raise RuntimeError("a variant that does not compile")
        assert layernorm.geometry is default, mode


def test_variants_start_with_the_plan_and_leave_out_repeats():
    for mode in tune_layernorm.MODES:
        for m in (PRODUCT_ROWS, 130, 7):  # at 7 rows the plan's BLOCK_M is 8, M rounded up
            settings = tune_layernorm.variants(m, 256, mode, "quick", COMPILED)
            assert settings[0] == tune_layernorm.plan_setting(m, 256, mode, COMPILED)
            if mode == "fwd":
                assert len(settings) == len(set(settings))
            else:
                geometries = [layernorm.make_geometry(m, 256, *s) for s in settings]
                assert len(geometries) == len(set(geometries))
    # at 130 rows 128 programs take every tile already: 256 and 512 add nothing
    small = tune_layernorm.variants(130, 256, "fwd+bwd", "quick", COMPILED)
    assert all(s[2] != 512 for s in small[1:])
    assert len(tune_layernorm.variants(PRODUCT_ROWS, 256, "fwd+bwd", "quick", COMPILED)) > len(small)
    # at 4160 rows every (BLOCK_M, warps) of the forward's grid is its own launch (the plan among them)
    forward = tune_layernorm.variants(PRODUCT_ROWS, 256, "fwd", "quick", COMPILED)
    assert sorted(forward) == sorted(itertools.product(*tune_layernorm.GRIDS["quick"]["fwd"]))


def test_interpreted_run_checks_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((2, 8), (4,)),
                                                        "fwd+bwd": ((4,), (4,), (8, 64), (32, 256))})
    out = tmp_path / "tune.md"
    assert tune_layernorm.main(["--interpret", "--shape", "quick", "--dtype", "fp32", "bf16",
                                "--out", str(out)]) == 0
    text = out.read_text()
    for dtype in ("fp32", "bf16"):
        assert f"## {harness.shape_label('layernorm', 'quick')}, {dtype}" in text
    # per dtype: the plan and 2 forward variants; the plan and 4 backward variants
    assert text.count("| fwd | ") == 2 * 3 and text.count("| fwd+bwd | ") == 2 * 5
    assert text.count("| planned |") == 2 * 2
    assert "Partial" not in text and "wrong" not in capsys.readouterr().out
    assert text.count("not timed") == 2 * 8


def too_few_programs(monkeypatch):
    """Backward programs that take one row tile each, as many as before: ds rows and dgamma terms
    are left out (the interpreter's NaN outputs show the rows never written)."""
    make = layernorm.make_geometry

    def planted(m, n, *setting):
        g = make(m, n, *setting)
        return g._replace(tiles=1) if setting[:3] == (4, 4, 8) else g
    monkeypatch.setattr(layernorm, "make_geometry", planted)
    return "non-finite"


def dgamma_off_by_1e3(monkeypatch):
    """Every value written, one of them wrong: finite numbers over the tolerance."""
    backward = layernorm.add_layernorm_backward

    def planted(params, cache, dy, *, launcher):
        ds, grads = backward(params, cache, dy, launcher=launcher)
        if layernorm.geometry(130, 256, launcher, "bwd").block_m == 4:
            grads = {**grads, "gamma": grads["gamma"] * 1.001}
        return ds, grads
    monkeypatch.setattr(layernorm, "add_layernorm_backward", planted)
    return "rel 1.0e-03, 0 non-finite"


@pytest.mark.parametrize("plant", [too_few_programs, dgamma_off_by_1e3], ids=lambda f: f.__name__)
def test_a_wrong_variant_is_reported_and_fails_the_run(plant, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((8,), (4,)),
                                                        "fwd+bwd": ((4,), (4,), (8,), (256,))})
    says = plant(monkeypatch)
    assert tune_layernorm.main(["--interpret", "--shape", "quick", "--out", str(tmp_path / "t.md")]) == 1
    printed = capsys.readouterr().out
    wrong = [line for line in printed.splitlines() if line.startswith("fp32") and "wrong" in line]
    assert len(wrong) == 1 and "BLOCK_M=4 warps=4 G<=8" in wrong[0] and says in wrong[0], printed
    assert "1 variant(s) gave wrong results" in printed


def test_a_plan_that_does_not_run_fails_the_run(tmp_path, capsys, monkeypatch):
    """Variants that fail to compile are reported, not fatal; but when the plan itself raises (on a
    GPU, say, without jax-triton) nothing was checked or timed, and the run must not pass."""
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((8,), (4,)),
                                                        "fwd+bwd": ((4,), (4,), (8,), (256,))})

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'jax_triton'")
    monkeypatch.setattr(layernorm, "add_layernorm_forward", broken)
    assert tune_layernorm.main(["--interpret", "--shape", "quick", "--out", str(tmp_path / "t.md")]) == 1
    printed = capsys.readouterr().out
    assert "2 plan(s) failed to run" in printed and "wrong results" not in printed, printed


def test_a_wrong_variant_in_an_earlier_pair_still_fails_the_run(tmp_path, capsys, monkeypatch):
    """dgamma off by 1e-3 is wrong at fp32's tolerance and within bf16's: the fp32 pair's failure
    counts although the bf16 pair after it passes."""
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((8,), (4,)),
                                                        "fwd+bwd": ((4,), (4,), (8,), (256,))})
    dgamma_off_by_1e3(monkeypatch)
    assert tune_layernorm.main(["--interpret", "--shape", "quick", "--dtype", "fp32", "bf16",
                                "--out", str(tmp_path / "t.md")]) == 1
    printed = capsys.readouterr().out
    assert "1 variant(s) gave wrong results" in printed, printed


def test_times_become_bandwidth_and_speed_against_the_plan(monkeypatch):
    """The arithmetic on timed rows and their Markdown, with made-up times (nothing here times a
    kernel, which needs a GPU): GB/s = harness.layernorm_bytes of the row's mode / seconds; speed
    vs the plan = the plan's median / the row's, within the row's mode (2.00x: twice as fast)."""
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((2,), (4,)),
                                                        "fwd+bwd": ((4,), (4,), (8,), (256,))})
    plan_ms = {"fwd": 0.004, "fwd+bwd": 0.010}

    def made_up(row, mode, setting, sets, want, tol, launcher, settings):
        ms = plan_ms[mode] if row["planned"] else plan_ms[mode] / 2
        row.update(rel_err=0.0, median_ms=ms, p20_ms=ms * 0.75, p80_ms=ms * 1.25)
    monkeypatch.setattr(tune_layernorm, "_check_and_time", made_up)
    rows = tune_layernorm.tune("quick", "fp32", INTERPRETED, None)
    assert [(r["mode"], r["planned"]) for r in rows] == \
        [("fwd", True), ("fwd", False), ("fwd+bwd", True), ("fwd+bwd", False)]
    b, l, d = harness.LN_SHAPES["quick"]
    for r in rows:
        moved = harness.layernorm_bytes(b * l, d, 4, r["mode"])
        assert r["gb_s"] == pytest.approx(moved / (r["median_ms"] / 1e3) / 1e9), r
        assert r["vs_plan"] == pytest.approx(1.0 if r["planned"] else 2.0), r
    lines = tune_layernorm.markdown(rows, "t").splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[4:]]
    for r, cells in zip(rows, table, strict=True):
        assert cells["mode"] == r["mode"] and cells["variant"] == r["variant"]
        assert cells["median ms"] == f"{r['median_ms']:.4f}"
        assert cells["p20-p80"] == f"{r['median_ms'] * 0.75:.4f}-{r['median_ms'] * 1.25:.4f}"
        assert cells["GB/s"] == f"{r['gb_s']:.0f}"
        assert cells["speed vs the plan"] == ("1.00x" if r["planned"] else "2.00x")


@pytest.mark.parametrize("mode, kernel", [("fwd", "vitfuse_ln_fwd"), ("fwd+bwd", "vitfuse_ln_bwd")])
def test_resources_compile_the_tuned_directions_main_kernel(mode, kernel, monkeypatch):
    """--resources: the sm_90 compile (no GPU needed) of the kernel the mode tunes, at the variant."""
    from kernels import compile_check

    compile_spec, compiled = compile_check.compile_spec, []

    def spy(spec, cc):
        compiled.append((spec.name, spec.constexprs["BLOCK_M"], spec.num_warps, cc))
        return compile_spec(spec, cc)
    monkeypatch.setattr(compile_check, "compile_spec", spy)
    setting = (2, 2) if mode == "fwd" else (2, 2, 8, 32)
    assert re.fullmatch(r"\d+/\d+", tune_layernorm.resources(mode, setting, product_args(), COMPILED))
    assert compiled == [(kernel, 2, 2, 90)]


def test_a_run_cut_short_keeps_the_tables_it_finished(tmp_path, monkeypatch):
    """--out is rewritten after every shape and dtype: when the second pair dies (here tune
    raises; on a GPU, a timeout), the first pair's table is on disk, marked partial."""
    real_tune = tune_layernorm.tune

    def tune(shape, dtype, *args):
        if dtype == "bf16":
            raise RuntimeError("cut short")
        return real_tune(shape, dtype, *args)
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((8,), (4,)),
                                                        "fwd+bwd": ((8,), (4,), (8,), (256,))})
    monkeypatch.setattr(tune_layernorm, "tune", tune)
    out = tmp_path / "tune.md"
    with pytest.raises(RuntimeError, match="cut short"):
        tune_layernorm.main(["--interpret", "--shape", "quick", "--dtype", "fp32", "bf16", "--out", str(out)])
    text = out.read_text()
    assert "**Partial: 1 of 2 shape/dtype pairs so far" in text
    assert f"{harness.shape_label('layernorm', 'quick')}, fp32" in text and "bf16" not in text


def test_without_out_the_tables_end_the_output(capsys, monkeypatch):
    monkeypatch.setitem(tune_layernorm.GRIDS, "quick", {"fwd": ((8,), (4,)),
                                                        "fwd+bwd": ((8,), (4,), (8,), (256,))})
    assert tune_layernorm.main(["--interpret", "--shape", "quick"]) == 0
    printed = capsys.readouterr().out
    tables = printed[printed.index("## "):]
    assert tables.count("| fwd | ") == 2 and tables.count("| fwd+bwd | ") == 2 and "| planned |" in tables


def test_without_a_gpu_it_asks_for_interpret(capsys, monkeypatch):
    # the backend is set, not assumed: gpu.sh's bench part runs bench/ on a GPU, where a plain
    # main([]) would tune (and time) every product-shape variant
    monkeypatch.setattr(tune_layernorm.jax, "default_backend", lambda: "cpu")
    assert tune_layernorm.main([]) == 2
    assert "no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_layernorm.main(["--shape", "vit-l"])
