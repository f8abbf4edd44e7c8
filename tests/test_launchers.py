"""kernels.launch's two Launcher values, COMPILED and INTERPRETED: what each one makes the kernel
files choose (read from the launches they record, no GPU needed), what the compiled one hands
jax-triton, the launcher the checks use (kernels.compile_check; oracle.kernel_gradcheck on a faked
GPU backend), a clear error for anything else passed as a launcher, and the check commands'
usage errors for what they cannot check (a shape no kernel takes, an --only matching nothing)."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import COMPILED, INTERPRETED, dispatch, fused_ops, layernorm
from kernels.launch import Launcher, record_launches


def attention_launches(launcher, kernel, dtype, l=17, heads=2, dh=16):
    """{kernel name: constexprs} of one forward and backward through the dispatcher."""
    qkv = jax.ShapeDtypeStruct((1, l, 3 * heads * dh), dtype)

    def run(qkv):
        o, cache = dispatch.attention_forward(qkv, heads, launcher=launcher, kernel=kernel)
        return dispatch.attention_backward(cache, o, launcher=launcher, kernel=kernel)

    with record_launches() as specs:
        jax.eval_shape(run, qkv)
    return {s.kernel.__name__: s for s in specs}


def layernorm_launches(launcher, m, n):
    x = jax.ShapeDtypeStruct((m, n), jnp.float32)
    params = {"gamma": jax.ShapeDtypeStruct((n,), jnp.float32),
              "beta": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def run(params, x):
        y, cache = layernorm.add_layernorm_forward(params, x, x, 1e-6, launcher=launcher)
        return layernorm.add_layernorm_backward(params, cache, y, launcher=launcher)

    with record_launches() as specs:
        jax.eval_shape(run, params, x)
    return {s.kernel.__name__: s for s in specs}


@pytest.mark.parametrize("kernel", ["one-tile", "key-blocked"])
def test_only_the_interpreter_upcasts_half_precision_dots(kernel):
    """DOT_F32 (kernels/interpreter.py: the interpreter's bf16 arithmetic is unusable) is set for
    half-precision inputs under INTERPRETED only; compiled bf16 dots stay bf16 MMAs."""
    for launcher, dtype, want in ((INTERPRETED, jnp.bfloat16, True), (COMPILED, jnp.bfloat16, False),
                                  (INTERPRETED, jnp.float32, False), (COMPILED, jnp.float32, False)):
        specs = attention_launches(launcher, kernel, dtype)
        assert specs, (launcher.name, kernel)
        for name, spec in specs.items():
            if "DOT_F32" in spec.constexprs:
                assert spec.constexprs["DOT_F32"] is want, (launcher.name, kernel, dtype, name)


def test_layernorm_tiles_follow_the_launcher():
    """Compiled tiles stay near the register budget (<= 4096 elements, <= 16 rows) and the split
    reduction fills a GPU (up to 256 programs); the interpreter takes few, large tiles."""
    m, n = 64 * 65, 128  # the product's 4160 LayerNorm rows (at width 128, not its 256)
    compiled, interpreted = layernorm_launches(COMPILED, m, n), layernorm_launches(INTERPRETED, m, n)
    for specs, launcher in ((compiled, COMPILED), (interpreted, INTERPRETED)):
        for name in ("_ln_fwd", "_ln_bwd"):
            c = specs[name].constexprs
            assert c["BLOCK_M"] * c["BLOCK_N"] <= launcher.tile_elements, (launcher.name, name)
            assert c["BLOCK_M"] <= launcher.tile_rows, (launcher.name, name)
        assert specs["_ln_bwd"].grid[0] <= launcher.reduce_programs
    assert compiled["_ln_fwd"].constexprs["BLOCK_M"] == 16
    assert interpreted["_ln_fwd"].constexprs["BLOCK_M"] == 64
    assert compiled["_ln_bwd"].grid[0] > interpreted["_ln_bwd"].grid[0] == 8


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_layernorm_geometry_is_its_documented_rule(direction):
    """layernorm.geometry, pinned on a few shapes (the rule _tiles/_bwd_groups had, the same
    launches): a tile of at most tile_elements and tile_rows and no more rows than M rounds up to,
    8 warps over 2048 elements (else 4), at most reduce_programs backward programs, reductions of
    256 columns (BLOCK_N if narrower) that sum at most 4096 elements a step. Both directions alike."""
    geometry = layernorm.Geometry
    want = {
        (COMPILED, 64 * 65, 256): geometry(block_m=16, block_n=256, num_warps=8, groups=130, tiles=2,
                                           reduce_n=256, reduce_g=16),
        # 16 x 128 = 2048 elements: still 4 warps; a 128-wide row takes a 128-column reduction
        (COMPILED, 64 * 65, 128): geometry(16, 128, 4, 130, 2, 128, 32),
        (COMPILED, 7, 100): geometry(8, 128, 4, 1, 1, 128, 1),  # 8 rows: M=7 rounded up
        (COMPILED, 64 * 197, 768): geometry(4, 1024, 8, 243, 13, 256, 16),  # ViT-B/16's, padded to 1024
        (INTERPRETED, 64 * 65, 256): geometry(64, 256, 8, 8, 9, 256, 8),
    }
    for (launcher, m, n), g in want.items():
        assert layernorm.geometry(m, n, launcher, direction) == g, (launcher.name, m, n)


def test_shared_memory_and_the_tuned_table_bind_the_compiled_launcher_only():
    """fp32 L=197 Dh=64: the one-tile kernel's K/V tile exceeds shared memory on a GPU, not in the
    interpreter; a tuned table row (measured on a GPU) steers COMPILED only."""
    f32 = np.float32
    assert dispatch.one_tile_runs(197, 64, f32, INTERPRETED, "ieee")
    assert not dispatch.one_tile_runs(197, 64, f32, COMPILED, "ieee")
    device = jax.devices()[0].device_kind
    rows = [{"device": device, "dtype": "float32/ieee", "dh": 32, "direction": "fwd", "max_len": 128,
             "kernel": "key-blocked", "block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2}]
    assert dispatch.plan(65, 32, f32, "ieee", "fwd", COMPILED, rows=rows).source == f"table {device}"
    assert dispatch.plan(65, 32, f32, "ieee", "fwd", INTERPRETED, rows=rows).source == "rule"


@pytest.mark.parametrize("wrong", [True, False, "interpret", None])
def test_anything_but_a_launcher_is_refused_by_name(wrong):
    """fused_ops(True), as the old interpret=True read, is a TypeError naming both launchers."""
    with pytest.raises(TypeError, match=r"kernels\.COMPILED .*kernels\.INTERPRETED"):
        fused_ops(wrong)


def test_the_two_launchers():
    assert isinstance(COMPILED, Launcher) and isinstance(INTERPRETED, Launcher)
    assert COMPILED.on_gpu and not INTERPRETED.on_gpu
    assert fused_ops(INTERPRETED).description.startswith("fused Triton kernels (Triton's interpreter,")


@pytest.mark.parametrize("launcher", [COMPILED, INTERPRETED], ids=["compiled", "interpreted"])
def test_one_tile_runs_exactly_where_the_one_tile_kernel_accepts_the_shape(launcher):
    """dispatch.one_tile_runs (what the dispatcher, the gradcheck's SKIP and the tune's variants
    rely on) and the one-tile kernel's own refusal (attention.check_one_tile) agree for each
    launcher and dot precision: at the length limit, and where only a GPU's shared memory
    refuses (fp32 L=197 Dh=64, which the interpreter runs; with tf32x3 dots, whose K/V tile
    budget is half, fp32 L=100 Dh=64 and L=197 Dh=32 too, while the product shape L=65 Dh=32
    still runs). The backward refuses as the forward does, on a cache from the key-blocked
    forward (which takes any length)."""
    from kernels import attention, flash_attention

    def one_tile(direction, qkv, precision):
        if direction == "fwd":
            return attention.attention_forward(qkv, 1, launcher=launcher, dot_precision=precision)
        _, cache = flash_attention.attention_forward(qkv, 1, launcher=launcher, dot_precision=precision)
        return attention.attention_backward(cache, qkv[..., :dh], launcher=launcher, dot_precision=precision)

    cases = [(1024, 16, jnp.bfloat16, "ieee"), (1025, 16, jnp.bfloat16, "ieee"),
             (197, 64, jnp.float32, "ieee"), (197, 64, jnp.bfloat16, "ieee"),
             (65, 32, jnp.float32, "ieee"), (65, 32, jnp.float32, "tf32x3"),
             (100, 64, jnp.float32, "tf32"), (100, 64, jnp.float32, "tf32x3"),
             (197, 32, jnp.float32, "tf32x3")]
    for (l, dh, dtype, precision), direction in itertools.product(cases, ("fwd", "bwd")):
        qkv = jax.ShapeDtypeStruct((1, l, 3 * dh), dtype)
        try:
            with record_launches():
                jax.eval_shape(lambda q: one_tile(direction, q, precision), qkv)
            accepted = True
        except ValueError:
            accepted = False
        assert dispatch.one_tile_runs(l, dh, dtype, launcher, precision) is accepted, (
            launcher.name, l, dh, dtype, precision, direction)
    assert dispatch.one_tile_runs(197, 64, jnp.float32, launcher, "ieee") is not launcher.on_gpu
    assert dispatch.one_tile_runs(100, 64, jnp.float32, launcher, "tf32")
    assert dispatch.one_tile_runs(100, 64, jnp.float32, launcher, "tf32x3") is not launcher.on_gpu
    assert dispatch.one_tile_runs(65, 32, jnp.float32, launcher, "tf32x3")


def test_a_tuned_one_tile_row_serves_only_lengths_its_dot_precision_fits():
    """A one-tile table row serves every L up to its max_len, so the dispatcher still asks
    whether the compiled kernel holds L with the row's dot precision: fp32 L=197 Dh=32 (a
    256 x 32 K/V tile, 32 KiB) fits tf32's budget, not tf32x3's 16 KiB; L=100 fits both."""
    device, f32 = jax.devices()[0].device_kind, jnp.float32
    rows = [dict(device=device, dtype=dispatch.dtype_key(f32, precision), dh=32, direction="fwd",
                 max_len=256, kernel="one-tile", block_m=16, block_n=16, num_warps=4, num_stages=2)
            for precision in ("tf32", "tf32x3")]
    table = dispatch.Plan("one-tile", None, f"table {device}")
    assert dispatch.plan(197, 32, f32, "tf32", "fwd", COMPILED, rows=rows) == table
    assert dispatch.plan(197, 32, f32, "tf32x3", "fwd", COMPILED, rows=rows).kernel == "key-blocked"
    assert dispatch.plan(100, 32, f32, "tf32x3", "fwd", COMPILED, rows=rows) == table


@pytest.mark.parametrize("kernel", ["one-tile", "key-blocked"])
def test_the_dot_precision_reaches_every_attention_launch(kernel):
    """fused_ops(..., "tf32") launches tf32 dots (tl.dot input_precision) in every attention
    kernel; the interpreter computes them exactly whatever the setting, so only the recorded
    constexprs can show a precision lost on the way (a GPU would silently run ieee dots)."""
    ops = fused_ops(INTERPRETED, "tf32", attention_kernel=kernel)
    qkv = jax.ShapeDtypeStruct((1, 17, 3 * 32), jnp.float32)

    def run(qkv):
        o, cache = ops.attention_forward(qkv, 2)
        return ops.attention_backward(cache, o)

    with record_launches() as specs:
        jax.eval_shape(run, qkv)
    precisions = {s.kernel.__name__: s.constexprs.get("DOT_PRECISION") for s in specs
                  if "DOT_F32" in s.constexprs}  # the kernels with dots
    assert len(precisions) == 2, precisions  # the forward and the backward kernel
    assert set(precisions.values()) == {"tf32"}, precisions


def test_the_compiled_launcher_hands_jax_triton_the_launch_settings(monkeypatch):
    """A key-blocked launch with tuned blocks (4 warps, 3 pipeline stages) reaches
    jax_triton.triton_call with those warps and stages (a stand-in records the call): a tuned
    table row's num_stages would otherwise be measured on the GPU and then dropped."""
    from kernels import flash_attention, launch
    from kernels.flash_attention import Blocks

    calls = []

    class FakeJaxTriton:
        @staticmethod
        def triton_call(*inputs, kernel, out_shape, grid, num_warps, num_stages, name, **constexprs):
            calls.append((kernel.__name__, num_warps, num_stages))
            return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

    monkeypatch.setattr(launch, "import_jax_triton", lambda: FakeJaxTriton)
    qkv = jax.ShapeDtypeStruct((1, 40, 3 * 32), jnp.float32)
    jax.eval_shape(lambda q: flash_attention.attention_forward(q, 2, launcher=COMPILED,
                                                               blocks=Blocks(32, 16, 4, 3)), qkv)
    assert calls == [("_flash_fwd", 4, 3)]


@pytest.mark.parametrize("kernel", ["one-tile", "key-blocked"])
def test_compile_check_records_what_the_compiled_launcher_launches(kernel):
    """kernels.compile_check reports registers, stack and shared memory for the launches the GPU
    will make: its recorded bf16 attention and LayerNorm launches are COMPILED's (no DOT_F32
    upcast, register-sized LayerNorm tiles), not the interpreter's."""
    from kernels import compile_check

    l, heads, dh = 17, 2, 16
    got = {s.kernel.__name__: s.constexprs for s in compile_check._attention_launches(
        1, l, heads, dh, jnp.bfloat16, False, "ieee", kernel)}
    want = {name: s.constexprs for name, s in attention_launches(COMPILED, kernel, jnp.bfloat16,
                                                                 l, heads, dh).items()}
    assert got == want and not any(c.get("DOT_F32") for c in got.values())
    got = {s.kernel.__name__: (s.grid, s.constexprs)
           for s in compile_check._layernorm_launches(64 * 65, 128, jnp.float32, True)}
    want = {name: (s.grid, s.constexprs) for name, s in layernorm_launches(COMPILED, 64 * 65, 128).items()}
    assert got == want


def test_gradcheck_on_a_gpu_checks_the_compiled_kernels(monkeypatch, capsys):
    """`python -m oracle.kernel_gradcheck` on a GPU backend (faked; the checks themselves stubbed
    out) checks the compiled kernels: COMPILED ops, the GPU named in the header, the product
    shapes added to the defaults, and the one-tile kernel skipped where its compiled K/V tile
    would overflow shared memory (fp32 L=197 Dh=64). --interpret still means the interpreter."""
    from oracle import kernel_gradcheck as gradcheck

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    checked = []
    monkeypatch.setattr(gradcheck, "check",
                        lambda spec, ops, *rest: checked.append((spec, ops.description)) or [])
    assert gradcheck.main(["--seed", "0"]) == 0
    assert f"gradcheck: {jax.devices()[0].device_kind}, triton" in capsys.readouterr().out
    assert set(gradcheck.FULL_SHAPES) <= {spec for spec, _ in checked}
    assert all(d.startswith(f"fused Triton kernels ({COMPILED.name},") for _, d in checked), checked
    for argv, launcher, kernels in (([], COMPILED, ["key-blocked"]),
                                    (["--interpret"], INTERPRETED, ["one-tile", "key-blocked"])):
        checked.clear()
        assert gradcheck.main([*argv, "--seed", "0", "--shapes", "attn:1x197x1x64"]) == 0
        assert [d for _, d in checked] == [
            f"fused Triton kernels ({launcher.name}, dot precision ieee, attention {k})" for k in kernels]
        assert ("SKIP" in capsys.readouterr().out) is launcher.on_gpu
    # fp32 L=100 Dh=64 (a 32 KiB K/V tile): compiled, the one-tile kernel runs it with tf32 dots,
    # not with tf32x3's (a 16 KiB budget)
    for precision, skipped in (("tf32", False), ("tf32x3", True)):
        checked.clear()
        assert gradcheck.main(["--seed", "0", "--dot-precision", precision, "--shapes", "attn:1x100x1x64"]) == 0
        assert len(checked) == 2 - skipped and ("SKIP" in capsys.readouterr().out) is skipped, precision


@pytest.mark.parametrize("spec, why", [
    ("attn:2x5x2x8", "head dim Dh = 8; the kernels take Dh = 16, 32, 64, 128"),
    ("attn:0x5x2x16", "every size must be 1 or more"), ("ln:4x0", "every size must be 1 or more"),
    ("attn:2x5", "use attn:BxLxHxDh[:keep] or ln:MxN[:r]")])
def test_kernel_gradcheck_refuses_a_shape_the_kernels_do_not_take_before_checking_any(spec, why,
                                                                                     capsys):
    """A shape no kernel takes was a traceback from inside the first check; now it is a usage
    error naming the shape, in the kernel's own words, before anything runs."""
    from oracle import kernel_gradcheck

    with pytest.raises(SystemExit) as e:
        kernel_gradcheck.main(["--interpret", "--shapes", "ln:3x10", spec])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and f"bad shape {spec!r}" in err and why in err, err
    assert "ln:3x10" not in out  # nothing was checked


def test_kernel_gradcheck_says_what_a_dot_precision_changes_where_it_runs(monkeypatch, capsys):
    """In Triton's interpreter every dot is an exact float32 matmul (tf32 is held to its tolerance,
    not emulated), and no precision touches bfloat16 dots: each said, not left to be guessed. A
    bad shape is refused before anything is printed."""
    from oracle import kernel_gradcheck

    monkeypatch.setattr(kernel_gradcheck, "check", lambda *args: [])
    assert kernel_gradcheck.main(["--seed", "0", "--interpret", "--dot-precision", "tf32",
                                  "--shapes", "ln:3x10"]) == 0
    assert "note: Triton's interpreter computes every dot in float32 whatever its precision: tf32 " \
           "is not emulated here" in capsys.readouterr().out
    assert kernel_gradcheck.main(["--seed", "0", "--dtype", "bfloat16", "--dot-precision", "tf32",
                                  "--shapes", "ln:3x10"]) == 0
    assert "note: --dot-precision tf32 applies to float32 operands: with bfloat16 it changes " \
           "nothing" in capsys.readouterr().out
    assert kernel_gradcheck.main(["--seed", "0", "--interpret", "--shapes", "ln:3x10"]) == 0
    assert "note:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        kernel_gradcheck.main(["--shapes", "attn:2x5"])
    assert capsys.readouterr().out == ""


def test_compile_check_cases_are_what_each_dot_precision_launches():
    """kernels.compile_check's cases (their launches recorded, none refused): the key-blocked
    kernel at every shape in fp32 with ieee, tf32 and tf32x3 dots and in bf16; the one-tile
    kernel in each of those where its compiled K/V tile fits the budget of those dots
    (attention.compiled_fits), so tf32x3 at the product shape but not at L=197 Dh=32."""
    from kernels import attention, compile_check

    names = {}
    for label, specs in compile_check.cases(quick=False):
        assert specs, label
        if not label.startswith("ln "):
            kind, l, dh, name = re.fullmatch(r"(\w+) B=\d+ L=(\d+) H=\d+ Dh=(\d+) (\S+)(?: keep)?", label).groups()
            names.setdefault((kind, int(l), int(dh)), set()).add(name)
    every = {"float32/ieee": (jnp.float32, "ieee"), "float32/tf32": (jnp.float32, "tf32"),
             "float32/tf32x3": (jnp.float32, "tf32x3"), "bfloat16": (jnp.bfloat16, "ieee")}
    for (kind, l, dh), got in names.items():
        want = set(every) if kind == "flash" else {
            name for name, (dtype, precision) in every.items() if attention.compiled_fits(l, dh, dtype, precision)}
        assert got == want, (kind, l, dh)
    assert "float32/tf32x3" in names[("attn", 65, 32)] and "float32/tf32x3" not in names[("attn", 197, 32)]


def test_compile_check_that_compiles_nothing_does_not_say_all_kernels_compile(capsys):
    from kernels import compile_check

    with pytest.raises(SystemExit) as e:
        compile_check.main(["--quick", "--only", "no such case"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "--only 'no such case' matches no case" in err
    assert "all kernels compile" not in out
