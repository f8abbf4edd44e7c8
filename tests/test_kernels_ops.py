"""The fused-ops entry point and the launchers: COMPILED and INTERPRETED, vit.ops wiring, NaN poisoning
of outputs, the interpreter leaving triton.language as it found it, and a real GPU compile (no GPU
needed: ptxas ships in the triton wheel) of the product-shape kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from kernels import COMPILED, INTERPRETED, fused_ops
from kernels import launch as launch_module
from kernels.interpreter import run_interpreted, run_on_host
from kernels.launch import poisoned_outputs
from oracle.compare import CHECK_MATMUL_PRECISION, TOLERANCE, assert_close, compare, kernel_tolerance
from oracle.kernel_gradcheck import attention_inputs, layernorm_inputs, run_attention, run_layernorm
from vit import ops as vit_ops

from kernel_checks import INTERPRET


def test_compiled_ops_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # as in CI, whatever runs this
    with pytest.raises(RuntimeError, match=r"no GPU backend.*kernels\.INTERPRETED"):
        fused_ops()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    ops = fused_ops()  # compiled: nothing is imported or compiled until the first launch
    assert isinstance(ops, vit_ops.Ops) and "jax-triton" in ops.description
    assert not ops.partitionable  # custom calls: vit.parallel runs them under shard_map


def test_bad_dot_precision_is_rejected():
    with pytest.raises(ValueError, match="dot_precision must be one of"):
        fused_ops(launcher=INTERPRETED, dot_precision="fp8")


def test_fused_ops_interpreted_are_a_working_op_set():
    ops = fused_ops(launcher=INTERPRETED)
    assert isinstance(ops, vit_ops.Ops) and ops.name == "fused"
    for fn in vit_ops.FUNCTIONS:
        assert callable(getattr(ops, fn))
    ref = vit_ops.REFERENCE
    a = attention_inputs(jax.random.PRNGKey(0), 2, 5, 2, 16, True, jnp.float32)
    ln = layernorm_inputs(jax.random.PRNGKey(1), 10, 32, True, jnp.float32)
    rows = compare(run_attention(ops, a), run_attention(ref, a), 1e-5)
    rows += compare(run_layernorm(ops, ln), run_layernorm(ref, ln), 1e-5)
    assert all(ok for *_, ok in rows), rows


@triton.jit
def _write_first_half(X, Y, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    # x + x, not x * 2.0: triton 3.6's interpreter (the GPU image's) has no bf16 scalar constants
    tl.store(Y + offs, x + x, mask=offs < N // 2)


def test_interpreter_without_jax_cpu_platform_says_what_to_set(monkeypatch):
    """JAX_PLATFORMS=cuda alone gave the interpreter's pure_callback no CPU device on an H200."""
    from kernels import interpreter  # noqa: PLC0415
    real_devices = jax.devices
    monkeypatch.setattr(jax, "devices", lambda backend=None: real_devices(backend) if backend != "cpu"
                        else (_ for _ in ()).throw(RuntimeError("Unknown backend cpu")))
    interpreter.host_platform_present.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"JAX_PLATFORMS=cuda,cpu"):
            INTERPRETED.launch(_write_first_half, grid=(1,), inputs=[jnp.zeros(8)],
                               outputs=[jax.ShapeDtypeStruct((8,), jnp.float32)], name="half", N=8, BLOCK=8)
    finally:
        interpreter.host_platform_present.cache_clear()


def test_outputs_start_as_nan_so_unwritten_elements_show():
    x = np.arange(8, dtype=np.float32)
    (y,) = run_interpreted(_write_first_half, (1,), [jax.ShapeDtypeStruct((8,), jnp.float32)],
                           {"N": 8, "BLOCK": 8}, x)
    np.testing.assert_array_equal(y[:4], 2 * x[:4])
    assert np.isnan(y[4:]).all()
    # the same through launch + jax.jit (pure_callback)
    f = jax.jit(lambda x: INTERPRETED.launch(_write_first_half, grid=(1,), inputs=[x],
                                             outputs=[jax.ShapeDtypeStruct((8,), jnp.float32)],
                                             name="half", N=8, BLOCK=8)[0])
    y = np.asarray(f(jnp.asarray(x)))
    assert np.isnan(y[4:]).all() and not np.isnan(y[:4]).any()


def test_poisoned_wrapper_runs_the_kernel_and_never_reads_the_poison():
    """The compiled path's wrapper(*inputs, *poison, *outputs, **constexprs) calls the kernel with
    the poison pointers dropped; run here by the interpreter, with poison pointing at zeros."""
    wrapper = launch_module._poisoned_wrapper(_write_first_half, 1, 1)
    assert wrapper.arg_names == ["X", "poison_Y", "Y", "N", "BLOCK"]
    assert launch_module._poisoned_wrapper(_write_first_half, 1, 1) is wrapper  # cached
    x = np.arange(8, dtype=np.float32)
    (y,) = run_interpreted(wrapper, (1,), [jax.ShapeDtypeStruct((8,), jnp.float32)],
                           {"N": 8, "BLOCK": 8}, x, np.zeros(8, np.float32))
    np.testing.assert_array_equal(y[:4], 2 * x[:4])
    assert np.isnan(y[4:]).all()


def test_poisoned_wrapper_compiles_for_sm90_with_one_pointer_per_array():
    """The wrapper around the product-shape LN forward through the real compiler: its PTX takes
    the inputs, one poison pointer per output and the outputs (jax-triton 0.3.1 passes an
    aliased output both as an input and as an output)."""
    import re
    import dataclasses

    from kernels import compile_check

    spec = compile_check._layernorm_launches(64 * 65, 256, jnp.float32, True)[0]
    wrapped = dataclasses.replace(
        spec, kernel=launch_module._poisoned_wrapper(spec.kernel, len(spec.inputs), len(spec.outputs)),
        inputs=spec.inputs + spec.outputs)
    ptx = compile_check.compile_spec(wrapped, 90).asm["ptx"]
    params = re.search(r"\.entry\s+\w+\((.*?)\)", ptx, re.S).group(1)
    pointers = len(spec.inputs) + 2 * len(spec.outputs)
    assert params.count(".u64") >= pointers  # + triton's scratch pointers


def test_importing_jax_triton_leaves_triton_cache_dir_alone(tmp_path, monkeypatch):
    """jax-triton 0.3.1 sets TRITON_CACHE_DIR="" on import, which breaks every later
    triton.compile in the process; kernels.launch undoes it (a stand-in module here)."""
    import os
    import sys

    (tmp_path / "jax_triton.py").write_text('import os\nos.environ["TRITON_CACHE_DIR"] = ""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    real = sys.modules.pop("jax_triton", None)  # on a GPU machine an earlier test imported it
    try:
        assert launch_module.import_jax_triton().__file__ == str(tmp_path / "jax_triton.py")
        assert "TRITON_CACHE_DIR" not in os.environ
        del sys.modules["jax_triton"]
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
        launch_module.import_jax_triton()
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cache")
    finally:
        sys.modules.pop("jax_triton", None)
        if real is not None:
            sys.modules["jax_triton"] = real


@pytest.mark.skipif(INTERPRET, reason="needs a GPU: poisoning of compiled launches (the interpreter's "
                    "is tested above)")
def test_compiled_outputs_start_as_nan_inside_poisoned_outputs():
    f = lambda x: COMPILED.launch(_write_first_half, grid=(1,), inputs=[x],  # noqa: E731
                         outputs=[jax.ShapeDtypeStruct((8,), jnp.float32)],
                         name="half", N=8, BLOCK=8)[0]
    x = jnp.arange(8, dtype=jnp.float32)
    with poisoned_outputs():
        y = np.asarray(jax.jit(f)(x))
    np.testing.assert_array_equal(y[:4], 2 * np.arange(4))
    assert np.isnan(y[4:]).all()


class FakeJaxTriton:
    """jax-triton 0.3.1's calling convention, executed by Triton's interpreter, to run the compiled
    launcher (kernels.launch._launch_compiled) on a CPU: the kernel gets (*inputs, *outputs,
    **constexprs); an output aliased to an input keeps its own pointer parameter and starts with
    that input's values (XLA's buffer aliasing); other outputs start as zeros."""

    def __init__(self):
        self.calls = []

    def triton_call(self, *inputs, kernel, out_shape, grid, num_warps, num_stages, name,
                    input_output_aliases=None, **constexprs):
        aliases = dict(input_output_aliases or {})
        self.calls.append((name, getattr(kernel, "__name__", ""), len(inputs), aliases))

        def host(*arrays):
            outs = [np.zeros(o.shape, o.dtype) for o in out_shape]
            for i, j in aliases.items():
                outs[j] = np.array(arrays[i], copy=True)
            run_on_host(kernel, grid, [np.ascontiguousarray(a) for a in arrays] + outs, constexprs)
            return tuple(outs)

        return jax.pure_callback(host, list(out_shape), *inputs, vmap_method="sequential")


@pytest.fixture
def fake_jax_triton(monkeypatch):
    fake = FakeJaxTriton()
    monkeypatch.setattr(launch_module, "import_jax_triton", lambda: fake)
    return fake


def test_compiled_launcher_poisons_through_aliased_inputs(fake_jax_triton):
    """The compiled path's own code (wrapper kernel, NaN inputs, input_output_aliases) under
    jax-triton's convention: unwritten elements are NaN inside poisoned_outputs only."""
    f = lambda x: COMPILED.launch(_write_first_half, grid=(1,), inputs=[x],  # noqa: E731
                         outputs=[jax.ShapeDtypeStruct((8,), jnp.float32)],
                         name="half", N=8, BLOCK=8)[0]
    x = jnp.arange(8, dtype=jnp.float32)
    plain = np.asarray(jax.jit(f)(x))
    with poisoned_outputs():
        poisoned = np.asarray(jax.jit(lambda x: f(x))(x))
    np.testing.assert_array_equal(plain, [0, 2, 4, 6, 0, 0, 0, 0])
    np.testing.assert_array_equal(poisoned[:4], [0, 2, 4, 6])
    assert np.isnan(poisoned[4:]).all()
    assert fake_jax_triton.calls[0] == ("half", "_write_first_half", 1, {})
    assert fake_jax_triton.calls[1] == ("half", "_write_first_half_poisoned", 2, {1: 0})


def test_compiled_launcher_runs_both_kernels_correctly(fake_jax_triton, monkeypatch):
    """fused_ops(launcher=COMPILED) end to end through the compiled launcher (poisoned): attention
    with dropout and add+LN, outputs and gradients vs the reference."""
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")  # fused_ops checks for a GPU
        ops = fused_ops(launcher=COMPILED)
    a = attention_inputs(jax.random.PRNGKey(5), 2, 17, 2, 16, True, jnp.float32)
    ln = layernorm_inputs(jax.random.PRNGKey(6), 19, 48, True, jnp.float32)
    with poisoned_outputs():
        rows = compare(run_attention(ops, a), run_attention(vit_ops.REFERENCE, a), 1e-5)
        rows += compare(run_layernorm(ops, ln), run_layernorm(vit_ops.REFERENCE, ln), 1e-5)
    assert all(ok for *_, ok in rows), rows
    kernels = {c[1] for c in fake_jax_triton.calls}
    assert kernels == {"_attn_fwd_poisoned", "_attn_bwd_poisoned", "_ln_fwd_poisoned",
                       "_ln_bwd_poisoned", "_ln_bwd_reduce_poisoned"}


def _triton_language_state():
    """Every attribute of what the interpreter patches (tl, tl.core, tl.math, the tensor classes)
    and of what kernels/interpreter.py patches around a launch."""
    import inspect

    from triton.runtime import interpreter as interp
    owners = {"tl": tl, "tl.core": tl.core, "tl.math": tl.math, "tensor": tl.core.tensor,
              "tensor_descriptor_base": tl.core.tensor_descriptor_base,
              "JITFunction": triton.runtime.jit.JITFunction,
              "InterpreterBuilder": interp.InterpreterBuilder}
    # Looked up (statically: no fresh bound methods), not read from vars(): Triton's own restore
    # can leave a copy of an inherited attribute on the class (tensor.__repr__ = object.__repr__),
    # which changes nothing.
    # (__annotations__ is left out: reading it creates an empty one on a class that has none.)
    return {(owner, name): inspect.getattr_static(obj, name)
            for owner, obj in owners.items() for name in dir(obj) if name != "__annotations__"}


@pytest.mark.parametrize("attention_kernel", ["one-tile", "key-blocked"])
def test_interpreter_restores_triton_language(attention_kernel):
    """After interpreted launches (attention, whose kernels call library functions such as tl.max,
    and add+LN), triton.language is exactly as before, and a library function called outside a
    kernel is refused again."""
    before = _triton_language_state()
    ops = fused_ops(launcher=INTERPRETED, attention_kernel=attention_kernel)
    run_attention(ops, attention_inputs(jax.random.PRNGKey(2), 1, 5, 1, 16, False, jnp.float32))
    run_layernorm(ops, layernorm_inputs(jax.random.PRNGKey(3), 4, 8, True, jnp.float32))
    after = _triton_language_state()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) is not after.get(k))
    assert not changed, changed
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        tl.max(1, 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_product_kernels_compile_for_sm90(dtype):
    """The real Triton compiler (frontend, GPU passes, ptxas) on the launches the product shape
    makes (B=64 L=65 H=8 Dh=32 with dropout; LN 4160 x 256 with residual), within shared memory.
    ``python -m kernels.compile_check`` does the full set for sm_80 and sm_90."""
    from kernels import compile_check

    specs = compile_check._attention_launches(64, 65, 8, 32, dtype, True, "ieee")
    specs += compile_check._layernorm_launches(64 * 65, 256, dtype, True)
    assert [s.name for s in specs] == ["vitfuse_attn_fwd", "vitfuse_attn_bwd", "vitfuse_ln_fwd",
                                       "vitfuse_ln_bwd", "vitfuse_ln_bwd_reduce"]
    for spec in specs:
        kernel = compile_check.compile_spec(spec, 90)
        assert 0 <= kernel.metadata.shared <= compile_check.SHARED_LIMIT[90], spec.name
        assert "ld.global" in kernel.asm["ptx"], spec.name


@triton.jit
def _to_bf16(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))


def test_interpreter_rounds_float32_to_bfloat16_to_nearest_even():
    """As the GPU and XLA do; Triton's interpreter alone would truncate (kernels/interpreter.py)."""
    x = np.random.RandomState(0).randn(4096).astype(np.float32) * 3
    (y,) = run_interpreted(_to_bf16, (1,), [jax.ShapeDtypeStruct((4096,), jnp.bfloat16)], {"N": 4096}, x)
    expected = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    np.testing.assert_array_equal(y.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_poison_covers_every_float_dtype(dtype):
    (y,) = run_interpreted(_write_first_half, (1,), [jax.ShapeDtypeStruct((8,), dtype)],
                           {"N": 0, "BLOCK": 8}, np.zeros(8, dtype))
    assert np.isnan(np.asarray(y, np.float32)).all()


def test_compiled_poison_is_nan_for_floats_and_minus_one_for_ints():
    # poisoned_outputs(): "outputs start as NaN (ints as -1)"; a 0 would pass for a written value
    for dtype, check in ((jnp.float32, np.isnan), (jnp.bfloat16, lambda a: np.isnan(a.astype(np.float32))),
                         (jnp.int32, lambda a: a == -1)):
        filled = np.asarray(launch_module._poison_fill(jax.ShapeDtypeStruct((2, 3), dtype)))
        assert filled.shape == (2, 3) and filled.dtype == jnp.dtype(dtype) and check(filled).all(), dtype


def test_tile_arithmetic():
    for n in range(0, 70):
        want = 1
        while want < n:
            want *= 2
        assert launch_module.next_power_of_2(n) == want, n
        assert launch_module.cdiv(n, 8) == -(-n // 8) == (n + 7) // 8


def test_record_launches_goes_to_the_innermost_recording():
    def one_launch():
        return INTERPRETED.launch(_write_first_half, grid=(1,), inputs=[jnp.zeros(8)],
                                  outputs=[jax.ShapeDtypeStruct((8,), jnp.float32)],
                                  name="half", N=8, BLOCK=8)

    with launch_module.record_launches() as outer:
        one_launch()
        with launch_module.record_launches() as inner:
            (y,) = one_launch()
            one_launch()
        one_launch()
    assert len(outer) == 2 and len(inner) == 2
    assert inner[0].name == "half" and inner[0].grid == (1,) and inner[0].constexprs == {"N": 8, "BLOCK": 8}
    np.testing.assert_array_equal(y, np.zeros(8))  # recorded, not run


def test_gradcheck_compare_flags_errors_and_nan():
    ref = {"a": jnp.array([1.0, -2.0, 4.0]), "b": jnp.array([1.0, 2.0])}
    good = {"a": ref["a"] * (1 + 1e-7), "b": ref["b"]}
    assert all(row[-1] for row in compare(good, ref, 1e-5))
    off = {"a": ref["a"].at[1].add(1e-3), "b": ref["b"]}  # rel 2.5e-4
    (name, _, max_abs, rel, nonfinite, ok), _ = compare(off, ref, 1e-5)
    assert (name, ok, nonfinite) == ("a", False, 0) and abs(rel - 2.5e-4) < 1e-6
    nan = {"a": ref["a"], "b": ref["b"].at[0].set(jnp.nan)}
    _, (name, _, _, _, nonfinite, ok) = compare(nan, ref, 1e-5)
    assert (name, nonfinite, ok) == ("b", 1, False)
    inf = {"a": ref["a"].at[0].set(jnp.inf).at[2].set(-jnp.inf), "b": ref["b"].at[1].set(jnp.nan)}
    (_, _, _, _, nonfinite_a, ok_a), (_, _, _, _, nonfinite_b, ok_b) = compare(inf, ref, 1e-5)
    assert (nonfinite_a, ok_a, nonfinite_b, ok_b) == (2, False, 1, False)  # +-inf count as NaN does


def test_compare_fails_a_tensor_of_another_shape():
    ref = {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}
    rows = compare({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, ref, 1e-5)
    assert [(r.name, r.shape, r.ok) for r in rows] == [("a", (2, 3), False), ("b", (4,), True)]
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_close({"a": jnp.ones((6,)), "b": jnp.ones((4,))}, ref, 1.0)  # no tolerance excuses it


def test_kernel_tolerance_follows_the_table():
    """kernel_tolerance picks TOLERANCE's row for the dtype and dot precision, and the looser
    "long sums" row only when asked (the benchmarks' sizes): the checks at test sizes keep the
    tight one."""
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    assert kernel_tolerance(f32) == TOLERANCE["float32"] == 1e-5
    assert kernel_tolerance(f32, long_sums=True) == TOLERANCE["float32 long sums"]
    assert kernel_tolerance(f32, "tf32") == kernel_tolerance(f32, "tf32", long_sums=True) == TOLERANCE["tf32"]
    assert kernel_tolerance(f32, "tf32x3") == TOLERANCE["tf32x3"]
    assert kernel_tolerance(bf16) == TOLERANCE["bfloat16"]
    assert kernel_tolerance(bf16, long_sums=True) == TOLERANCE["bfloat16 long sums"]
    assert kernel_tolerance(f16) == kernel_tolerance(f16, long_sums=True) == TOLERANCE["float16"]
    # a dot precision concerns float32 operands only: half inputs keep their own row
    assert kernel_tolerance(bf16, "tf32") == kernel_tolerance(bf16, "tf32x3") == TOLERANCE["bfloat16"]
    assert kernel_tolerance(f16, "tf32", long_sums=True) == TOLERANCE["float16"]
    assert TOLERANCE["float32"] < TOLERANCE["float32 long sums"]
    assert TOLERANCE["bfloat16"] < TOLERANCE["bfloat16 long sums"]


def test_gradcheck_command_runs_and_exits_zero(capsys):
    from oracle import kernel_gradcheck as gradcheck

    assert gradcheck.main(["--interpret", "--seed", "0", "--shapes", "attn:1x5x1x16:keep", "ln:3x10:r"]) == 0
    out = capsys.readouterr().out
    assert "all tensors within tolerance" in out
    for tensor in ("o", "dq", "dk", "dv", "y", "ds", "dgamma", "dbeta"):
        assert f" {tensor} " in out


def test_gradcheck_command_fails_when_a_kernel_is_wrong(monkeypatch, capsys):
    """A fused forward 1e-3 off (its cache, and so every gradient, still right): the one bad
    tensor among the case's four fails the run, exit status 1, however the rows after it fare."""
    from oracle import kernel_gradcheck as gradcheck

    real = gradcheck.fused_ops

    def off_by_1e3(**kwargs):
        ops = real(**kwargs)

        def forward(qkv, heads, keep_scale=None):
            o, cache = ops.attention_forward(qkv, heads, keep_scale)
            return o * 1.001, cache
        return ops._replace(attention_forward=forward)

    monkeypatch.setattr(gradcheck, "fused_ops", off_by_1e3)
    assert gradcheck.main(["--interpret", "--seed", "0", "--kernel", "key-blocked",
                           "--shapes", "attn:1x5x1x16"]) == 1
    out = capsys.readouterr().out
    assert "1 tensor(s) over tolerance or non-finite" in out
    assert [line.split()[-1] for line in out.splitlines() if " dq " in line or " o " in line] == ["FAIL", "ok"]


def test_gradcheck_runs_the_kernel_it_names(monkeypatch):
    """--kernel key-blocked / one-tile check that kernel, not the dispatcher's choice (the
    one-tile kernel at L=5, Dh=16)."""
    from kernels import attention, flash_attention
    from oracle import kernel_gradcheck as gradcheck

    ran = []
    for module, name in ((attention, "one-tile"), (flash_attention, "key-blocked")):
        real = module.attention_forward
        monkeypatch.setattr(module, "attention_forward",
                            lambda *a, real=real, name=name, **k: ran.append(name) or real(*a, **k))
    for kernel in ("key-blocked", "one-tile"):
        ran.clear()
        assert gradcheck.main(["--interpret", "--seed", "0", "--kernel", kernel,
                               "--shapes", "attn:1x5x1x16"]) == 0
        assert set(ran) == {kernel}, (kernel, ran)


def test_checks_compute_xla_float32_dots_exactly(monkeypatch):
    """On a GPU, JAX's default float32 dots are TF32 (~1e-3 relative error): a reference computed
    so would fail the 1e-5 checks of correct ieee kernels. The tests (tests/conftest.py) and
    `python -m oracle.kernel_gradcheck`, whatever its caller set, run with full-precision dots.
    On the CPU both give the same numbers, so the setting itself is what is checked here."""
    from oracle import kernel_gradcheck as gradcheck

    assert jax.config.jax_default_matmul_precision == CHECK_MATMUL_PRECISION == "highest"
    seen, real_check = [], gradcheck.check

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(gradcheck, "check", spy)
    with jax.default_matmul_precision("bfloat16"):
        assert gradcheck.main(["--interpret", "--seed", "0", "--shapes", "ln:3x10"]) == 0
    assert seen == ["highest"]


def test_compare_names_nested_tensors_by_path():
    """oracle.compare on a nested pytree (the bench's train-step check: loss and every gradient)."""
    want = {"loss": jnp.array(1.0), "grads": {"w": jnp.ones((2, 2)), "b": [jnp.zeros(3)]}}
    got = jax.tree_util.tree_map(lambda a: a + 1e-3, want)
    rows = compare(got, want, 1e-2)
    assert [r.name for r in rows] == ["['grads']['b'][0]", "['grads']['w']", "['loss']"]
    assert all(r.ok for r in rows)
    got["grads"]["w"] = got["grads"]["w"].at[0, 1].add(0.5)
    assert [r.ok for r in compare(got, want, 1e-2)] == [True, False, True]
