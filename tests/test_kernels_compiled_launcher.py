"""The compiled launcher's own path for the key-blocked attention, on the CPU: fused_ops(COMPILED)
through kernels.launch._launch_compiled (jax-triton's calling convention, the poisoned wrapper
kernel, COMPILED's facts: on_gpu, no DOT_F32), with jax-triton replaced by a stand-in that runs
the kernel in Triton's interpreter (tests/test_kernels_ops.py's FakeJaxTriton). The test there
runs the product shape, which the dispatcher gives the one-tile kernel; a setting of the
key-blocked kernel that only the compiled launcher gets would otherwise first run on a GPU."""

import jax
import jax.numpy as jnp
import pytest

import test_kernels_ops
from kernels import COMPILED, fused_ops
from kernels import launch as launch_module
from kernels.launch import poisoned_outputs
from oracle.compare import compare
from oracle.kernel_gradcheck import attention_inputs, run_attention
from vit.ops import REFERENCE

from kernel_checks import assert_all_close


@pytest.fixture
def fake_jax_triton(monkeypatch):
    fake = test_kernels_ops.FakeJaxTriton()
    monkeypatch.setattr(launch_module, "import_jax_triton", lambda: fake)
    return fake


def test_compiled_launcher_runs_the_key_blocked_kernel_correctly(fake_jax_triton, monkeypatch):
    """L = 70 with dropout: three key blocks of the forward (64 x 32 blocks at Dh 16) and a tail
    in each direction, outputs and gradients vs the reference, outputs NaN-poisoned."""
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")  # fused_ops checks for a GPU
        ops = fused_ops(launcher=COMPILED, attention_kernel="key-blocked")
    inp = attention_inputs(jax.random.PRNGKey(5), 1, 70, 2, 16, True, jnp.float32)
    with poisoned_outputs():
        assert_all_close(compare(run_attention(ops, inp), run_attention(REFERENCE, inp), 1e-5), 1e-5)
    assert {c[1] for c in fake_jax_triton.calls} == {
        "_flash_fwd_poisoned", "_flash_bwd_delta_poisoned", "_flash_bwd_poisoned"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_key_blocked_kernels_compile_for_sm90(dtype, tmp_path, monkeypatch):
    """The real Triton compiler (frontend, GPU passes, ptxas; no GPU needed) on the key-blocked
    launches of ViT-B/16 at 224 px (L = 197, Dh = 64, dropout) with their default blocks: a
    kernel the interpreter runs but the compiler refuses (a loop-carried accumulator that changes
    dtype, a half-precision dot with a float32 operand: the interpreter upcasts half operands)
    fails here instead of on a GPU. tests/test_kernels_ops.py compiles the product shape, which
    runs the one-tile kernel; tests/test_kernels_spills.py only float32 with tf32x3 dots."""
    from kernels import compile_check

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile here, not from a cache
    specs = compile_check._attention_launches(2, 197, 2, 64, dtype, True, "ieee", "key-blocked")
    assert [s.name for s in specs] == ["vitfuse_flash_fwd", "vitfuse_flash_bwd_delta", "vitfuse_flash_bwd"]
    for spec in specs:
        kernel = compile_check.compile_spec(spec, 90)
        assert 0 <= kernel.metadata.shared <= compile_check.SHARED_LIMIT[90], spec.name
