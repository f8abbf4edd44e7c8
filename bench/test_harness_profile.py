"""bench.hlo.count_kernels / executable_profile: the kernels and XLA bytes beside each time."""

import jax
import jax.numpy as jnp

from bench import hlo

GPU_LIKE_HLO = """\
HloModule jit_f, is_scheduled=true

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add = f32[8]{0} add(%p0, %p1)
}

%command_buffer (p: f32[8], q: f32[8]) -> (f32[8], f32[8]) {
  %p = f32[8]{0} parameter(0)
  %q = f32[8]{0} parameter(1)
  %fusion.1 = f32[8]{0} fusion(%p, %q), kind=kLoop, calls=%fused_add
  %fusion.2 = f32[8]{0} fusion(%fusion.1, %q), kind=kLoop, calls=%fused_add
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%fusion.1, %fusion.2)
}

ENTRY %main.9 (x: f32[8], y: f32[8]) -> (f32[8], f32[8], f32[8]) {
  %x = f32[8]{0} parameter(0)
  %y = f32[8]{0} parameter(1)
  %c = f32[] constant(0)
  %gemm = (f32[8]{0}, s8[0]{0}) custom-call(%x, %y), custom_call_target="__cublas$gemm"
  %gte = f32[8]{0} get-tuple-element(%gemm), index=0
  %cb = (f32[8]{0}, f32[8]{0}) call(%gte, %y), to_apply=%command_buffer
  %start = ((f32[8]{0}), f32[8]{0}) async-start(%x), calls=%fused_add
  %done = f32[8]{0} async-done(%start)
  %copy = f32[8]{0} copy(%done)
  ROOT %out = (f32[8]{0}, f32[8]{0}, f32[8]{0}) tuple(%copy, %gte, %done)
}
"""


def test_count_kernels_on_gpu_shaped_hlo():
    # custom call 1 + command buffer's 2 fusions + async-start 1 + copy 1 (done, gte, tuple,
    # parameters and the constant are not kernels)
    assert hlo.count_kernels(GPU_LIKE_HLO) == 5


def test_executable_profile_of_a_compiled_function():
    x = jnp.ones((64, 64))
    one = jax.jit(lambda a: a * 2.0).lower(x).compile()
    two = jax.jit(lambda a: jnp.sum(a * 2.0, axis=0) + jnp.sum(jnp.exp(a), axis=1)).lower(x).compile()
    p1, p2 = hlo.executable_profile(one), hlo.executable_profile(two)
    assert p1["kernels"] >= 1 and p2["kernels"] >= p1["kernels"]
    assert p1["hlo_mbytes"] is None or p1["hlo_mbytes"] >= 2 * 64 * 64 * 4 / 1e6 * 0.99
