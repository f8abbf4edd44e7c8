"""bench/tune_attention.py: its one-tile geometry override reaches the launches, on the CPU it
checks every variant of both kernels in Triton's interpreter (nothing timed) and exits 0, and the
dispatcher's table it writes from timed rows is one kernels/dispatch.py reads back, also when a
run is cut short; its launcher follows --interpret, and the compiled one's variants and --resources
figures are the GPU's launches."""

import jax
import jax.numpy as jnp
import pytest

from bench import tune_attention
from kernels import COMPILED, INTERPRETED, attention, dispatch, flash_attention
from kernels.flash_attention import Blocks
from kernels.launch import record_launches


def launched_geometry(direction):
    qkv = jax.ShapeDtypeStruct((2, 65, 3 * 64), jnp.float32)

    def run(qkv):
        o, cache = attention.attention_forward(qkv, 2, launcher=COMPILED)
        return attention.attention_backward(cache, o, launcher=COMPILED)

    with record_launches() as specs:
        jax.eval_shape(run, qkv)
    spec = specs[direction == "bwd"]
    return spec.constexprs["BLOCK_M"], spec.num_warps


def test_geometry_override_reaches_only_its_direction():
    default = {d: launched_geometry(d) for d in ("fwd", "bwd")}
    assert default["bwd"] == tune_attention.default_geometry(65, 2, 32, jnp.float32, "ieee", "bwd")
    with tune_attention.geometry("bwd", 64, 4):
        assert launched_geometry("bwd") == (64, 4)
        assert launched_geometry("fwd") == default["fwd"]
    assert launched_geometry("bwd") == default["bwd"]  # restored


def test_interpreted_run_checks_every_variant_of_both_kernels(tmp_path, capsys):
    out = tmp_path / "tune.md"
    assert tune_attention.main(["--interpret", "--shape", "1x5x1x16", "--dtype", "float32/ieee",
                                "--grid", "quick", "--out", str(out)]) == 0
    text = out.read_text()
    one_tile = text.count("| one-tile |")
    key_blocked = text.count("| key-blocked |")
    assert one_tile == 2 * 2  # BLOCK_M 16 x warps 4, 8, in both directions
    assert key_blocked >= 2  # at L=5 every block fits to 16x16: the grid collapses
    assert "wrong" not in capsys.readouterr().out and "not timed" in text


def timed_rows(shape):
    """What tune returns for one shape on a GPU: one timed key-blocked row per direction."""
    return [{"shape": "x".join(map(str, shape)), "dtype": "bfloat16", "direction": direction,
             "kernel": "key-blocked", "variant": "64x32", "setting": Blocks(64, 32, 4, 2),
             "default": True, "planned": True, "median_ms": 0.5, "p20_ms": 0.4, "p80_ms": 0.6}
            for direction in ("fwd", "bwd")]


def test_a_run_cut_short_keeps_the_tables_of_the_shapes_it_finished(tmp_path, monkeypatch):
    """--out and --table are written after every shape and dtype: when the second shape dies
    (here tune raises; on a GPU, a timeout), the first one's table and winners are on disk."""
    def fake_tune(shape, dtype, dot_precision, launcher, settings, grid, with_resources):
        if shape[1] != 197:
            raise RuntimeError("cut short")
        return timed_rows(shape)
    monkeypatch.setattr(tune_attention, "tune", fake_tune)
    monkeypatch.setattr(tune_attention.jax, "default_backend", lambda: "gpu")
    out, table = tmp_path / "tune.md", tmp_path / "table.json"
    with pytest.raises(RuntimeError, match="cut short"):
        tune_attention.main(["--shape", "64x197x12x64", "64x577x12x64", "--dtype", "bfloat16",
                             "--out", str(out), "--table", str(table)])
    text = out.read_text()
    assert "B,L,H,Dh = (64, 197, 12, 64)" in text and "577" not in text
    assert "Partial: 1 of 2 shape/dtype pairs" in text
    rows = dispatch.load_table(table)
    assert sorted((r["direction"], r["max_len"]) for r in rows) == [("bwd", 197), ("fwd", 197)]


def test_table_rows_pick_the_fastest_and_round_trip(tmp_path):
    def row(kernel, setting, ms, default=False, direction="fwd"):
        return {"shape": "64x197x12x64", "dtype": "bfloat16", "direction": direction,
                "kernel": kernel, "variant": str(setting), "setting": setting,
                "default": default, "planned": False, "median_ms": ms}
    rows = [row("one-tile", (16, 8), 0.9, default=True), row("one-tile", (32, 4), 0.1),  # not default
            row("key-blocked", Blocks(64, 32, 8, 2), 0.5), row("key-blocked", Blocks(128, 64, 8, 2), 0.4),
            row("one-tile", (16, 8), 0.2, default=True, direction="bwd"),
            row("key-blocked", Blocks(64, 32, 8, 2), 0.3, direction="bwd")]
    table = tune_attention.table_rows(rows, "NVIDIA H200")
    assert [(r["direction"], r["kernel"], r["block_m"], r["block_n"]) for r in table] == [
        ("fwd", "key-blocked", 128, 64), ("bwd", "one-tile", 16, 16)]
    path = tmp_path / "table.json"
    tune_attention.write_table(path, table)
    loaded = dispatch.load_table(path)
    assert len(loaded) == 2 and {r["max_len"] for r in loaded} == {197}
    tune_attention.write_table(path, table[:1])  # same key: replaced, not duplicated
    assert len(dispatch.load_table(path)) == 2
    # another GPU's rows for the same dtype, head dim, direction and length sit beside them
    tune_attention.write_table(path, [dict(r, device="NVIDIA A100-SXM4-80GB") for r in table])
    loaded = dispatch.load_table(path)
    assert sorted(r["device"] for r in loaded) == ["NVIDIA A100-SXM4-80GB"] * 2 + ["NVIDIA H200"] * 2


def test_a_finished_run_is_not_marked_partial_and_a_wrong_variant_fails_it(tmp_path, monkeypatch, capsys):
    """The last write of --out drops the 'Partial' line; a variant that gave wrong results makes
    the run exit 1 (gpu.sh's tune part fails on it), one that does not compile (too many blocks
    for shared memory) is reported but is no failure."""
    def fake_tune(shape, dtype, dot_precision, launcher, settings, grid, with_resources):
        rows = timed_rows(shape)
        error = "wrong: rel 3.0e-01, 0 non-finite" if shape[1] == 577 else "OutOfResources: shared memory"
        rows.append({k: v for k, v in rows[0].items() if k not in ("median_ms", "p20_ms", "p80_ms")})
        rows[-1].update(variant="128x64", setting=Blocks(128, 64, 8, 2), default=False, planned=False,
                        error=error)
        return rows
    monkeypatch.setattr(tune_attention, "tune", fake_tune)
    monkeypatch.setattr(tune_attention.jax, "default_backend", lambda: "gpu")
    out = tmp_path / "tune.md"
    assert tune_attention.main(["--shape", "64x197x12x64", "64x577x12x64", "--dtype", "bfloat16",
                                "--out", str(out)]) == 1
    text = out.read_text()
    assert "B,L,H,Dh = (64, 197, 12, 64)" in text and "B,L,H,Dh = (64, 577, 12, 64)" in text
    assert "Partial" not in text, text
    assert "1 variant(s) gave wrong results" in capsys.readouterr().out


def test_tune_marks_the_plan_and_the_defaults_and_times_each_variant_against_the_plan(monkeypatch):
    """Per direction: exactly one row is the dispatcher's plan (its kernel at its setting), one
    one-tile row is attention.geometry's default and one key-blocked row default_blocks'; each
    row's vs_plan is the planned median over its own (here with made-up timings)."""
    medians = iter(1.0 + 0.25 * i for i in range(1000))

    def fake_check_and_time(row, *args):
        m = next(medians)
        row.update(median_ms=m, p20_ms=m, p80_ms=m)
    monkeypatch.setattr(tune_attention, "_check_and_time", fake_check_and_time)
    b, l, heads, dh, f32 = 1, 5, 1, 16, jnp.float32
    rows = tune_attention.tune((b, l, heads, dh), f32, "ieee", INTERPRETED, None, grid="quick")
    for direction in ("fwd", "bwd"):
        mine = [r for r in rows if r["direction"] == direction]
        plan = dispatch.plan(l, dh, f32, "ieee", direction, INTERPRETED)
        one_tile_default = tune_attention.default_geometry(l, heads, dh, f32, "ieee", direction)
        (planned,) = [r for r in mine if r["planned"]]
        assert planned["kernel"] == plan.kernel == "one-tile" and planned["setting"] == one_tile_default
        defaults = {r["kernel"]: r["setting"] for r in mine if r["default"]}
        assert len([r for r in mine if r["default"]]) == 2 and defaults == {
            "one-tile": one_tile_default,
            "key-blocked": flash_attention.default_blocks(l, dh, f32, "ieee", direction)}
        assert len({r["kernel"] for r in mine}) == 2 and len(mine) > 2
        for r in mine:
            assert r["vs_plan"] == pytest.approx(planned["median_ms"] / r["median_ms"]), r


def test_the_launcher_follows_interpret_not_the_backend(monkeypatch):
    """On a GPU a plain run tunes the compiled kernels, and --interpret still means Triton's
    interpreter (every variant checked, none timed)."""
    seen = []

    def fake_tune(shape, dtype, dot_precision, launcher, settings, grid, with_resources):
        seen.append(launcher)
        return []
    monkeypatch.setattr(tune_attention, "tune", fake_tune)
    monkeypatch.setattr(tune_attention.jax, "default_backend", lambda: "gpu")
    for argv, launcher in (([], COMPILED), (["--interpret"], INTERPRETED)):
        seen.clear()
        assert tune_attention.main([*argv, "--shape", "1x5x1x16", "--dtype", "bfloat16"]) == 0
        assert seen == [launcher], argv


def test_compiled_variants_are_what_the_gpu_can_launch_and_their_resources_its_kernels(monkeypatch):
    """fp32 L=197 Dh=64: no one-tile variant under COMPILED (its K/V tile overflows shared
    memory; each would only fail), all of them in the interpreter; with tf32x3 dots none at
    L=100 Dh=64 either. --resources compiles the launch the GPU makes: a bf16 variant's dots
    stay bf16 (no DOT_F32 upcast, which is the interpreter's), so its registers are the GPU
    kernel's."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    for launcher, one_tile in ((COMPILED, False), (INTERPRETED, True)):
        kernels = {k for k, _, _ in tune_attention.variants(197, 64, f32, "ieee", "fwd", "quick", launcher)}
        assert ("one-tile" in kernels) is one_tile and "key-blocked" in kernels, launcher.name
    # fp32 L=100 Dh=64, a 32 KiB K/V tile: within tf32 dots' budget, over tf32x3's (16 KiB)
    for precision, one_tile in (("tf32", True), ("tf32x3", False)):
        kernels = {k for k, _, _ in tune_attention.variants(100, 64, f32, precision, "fwd", "quick", COMPILED)}
        assert ("one-tile" in kernels) is one_tile, precision
    from kernels import compile_check  # noqa: PLC0415

    compiled = []
    monkeypatch.setattr(compile_check, "compile_spec", lambda spec, arch: compiled.append(spec))
    monkeypatch.setattr(compile_check, "resource_usage", lambda kernel: {"regs": 96, "stack": 0})
    for kernel, setting, name in (("key-blocked", Blocks(32, 16, 4, 2), "_flash_bwd"),
                                  ("one-tile", (16, 4), "_attn_bwd")):
        compiled.clear()
        assert tune_attention.resources(kernel, setting, "bwd", 1, 17, 2, 16, bf16, "ieee") == "96/0"
        (spec,) = compiled
        assert spec.kernel.__name__ == name and spec.constexprs["DOT_F32"] is False
        assert spec.constexprs["BLOCK_M"] == (32 if kernel == "key-blocked" else 16)


@pytest.mark.parametrize("flags, why", [
    (["--shape", "1x17x2x8"], "--shape 1x17x2x8: attention_forward: head dim Dh = 3D / (3 * heads) = 8"),
    (["--shape", "1x0x2x16"], "--shape 1x0x2x16: attention_forward: qkv must be non-empty"),
    (["--dtype", "float64"], "--dtype float64: pick from float32/ieee, float32/tf32"),
    (["--dtype", "bfloat16/tf32"], "--dtype bfloat16/tf32: pick from")])
def test_a_shape_or_dtype_no_kernel_takes_is_a_usage_error_before_any_variant_runs(flags, why,
                                                                                   capsys):
    """These were tracebacks (a KeyError, or the kernel's ValueError from the first variant)."""
    with pytest.raises(SystemExit) as e:
        tune_attention.main(["--interpret", *flags])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and why in err, err
    assert out == ""


def test_every_listed_dtype_reaches_the_tuner_and_plain_float32_means_ieee(monkeypatch):
    """Each spec --help lists (float32/tf32x3 among them) is taken, as the dtype and dot precision
    tune gets; 'float32' is float32/ieee. (tune itself is a stand-in here: nothing runs.)"""
    tuned = []
    monkeypatch.setattr(tune_attention, "tune", lambda shape, dtype, dot_precision, *rest:
                        tuned.append((shape, jnp.dtype(dtype).name, dot_precision)) or [])
    assert tune_attention.main(["--interpret", "--shape", "1x5x1x16", "--dtype", "float32",
                                *tune_attention.DTYPE_SPECS]) == 0
    assert [t[1:] for t in tuned] == [("float32", "ieee"), ("float32", "ieee"), ("float32", "tf32"),
                                      ("float32", "tf32x3"), ("bfloat16", "ieee"), ("float16", "ieee")]
    assert {t[0] for t in tuned} == {(1, 5, 1, 16)}
    assert "float32/tf32x3" in tune_attention.DTYPE_SPECS


def test_a_plan_that_does_not_run_fails_the_run(tmp_path, capsys, monkeypatch):
    """Variants that fail to compile are reported, not fatal; but when the dispatcher's plan
    itself raises (on a GPU, say, without jax-triton) nothing was checked or timed, and the run
    must not pass. Here every launch raises: the plan of each direction fails."""
    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'jax_triton'")
    monkeypatch.setattr(attention, "attention_forward", broken)
    monkeypatch.setattr(flash_attention, "attention_forward", broken)
    assert tune_attention.main(["--interpret", "--shape", "1x5x1x16", "--dtype", "float32/ieee",
                                "--grid", "quick", "--out", str(tmp_path / "t.md")]) == 1
    printed = capsys.readouterr().out
    assert "2 plan(s) failed to run" in printed and "wrong results" not in printed, printed
