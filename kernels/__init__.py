"""Fused Triton kernels for vitfuse: attention and residual-add LayerNorm, forward and backward.

``fused_ops(interpret=None, precision="ieee", attention_kernel="auto")`` returns the drop-in
replacement for the reference ops of ``vit.ops.REFERENCE`` (same four functions, same
signatures, same results):

    attention_forward(qkv (B, L, 3D), heads, keep_scale=None) -> (o (B, L, D), cache)
    attention_backward(cache, do (B, L, D)) -> dqkv (B, L, 3D)
    add_layernorm_forward(params {gamma, beta}, x, r or None, eps) -> (y, cache)     # y = LN(x + r)
    add_layernorm_backward(params, cache, dy) -> (ds, {gamma, beta})                   # ds: for x and r

interpret: None compiles the kernels through jax-triton on a GPU and raises on a machine without
one; True runs the same kernels through Triton's interpreter on the CPU (slow: tests, checks).
precision: tl.dot input precision for float32 operands, "ieee" (exact) or "tf32"/"tf32x3" (GPU).
attention_kernel: "auto" lets kernels/dispatch.py pick the attention kernel and its blocks per
shape; "one-tile" or "key-blocked" forces one (checks, benchmarks).

Files: launch.py (the one launcher), layernorm.py, attention.py (the one-tile attention),
flash_attention.py (the key-blocked attention), dispatch.py (which attention runs), and
gradcheck.py (``python -m kernels.gradcheck``: every output and gradient vs vit.layers).
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels import dispatch, layernorm
from kernels.launch import check_precision, resolve_interpret

__all__ = ["fused_ops"]


def fused_ops(interpret: bool | None = None, precision: str = "ieee",
              attention_kernel: str = "auto") -> SimpleNamespace:
    """The fused ops, bound to one launcher (compiled or interpreted), one dot precision and one
    attention kernel choice."""
    interpret = resolve_interpret(interpret)
    precision = check_precision(precision)
    kernel = dispatch.check_kernel(attention_kernel)

    def attention_forward(qkv, heads, keep_scale=None):
        return dispatch.attention_forward(
            qkv, heads, keep_scale, interpret=interpret, precision=precision, kernel=kernel
        )

    def attention_backward(cache, do):
        return dispatch.attention_backward(cache, do, interpret=interpret, precision=precision,
                                           kernel=kernel)

    def add_layernorm_forward(params, x, r, eps):
        return layernorm.add_layernorm_forward(params, x, r, eps, interpret=interpret)

    def add_layernorm_backward(params, cache, dy):
        return layernorm.add_layernorm_backward(params, cache, dy, interpret=interpret)

    mode = "interpreter" if interpret else "jax-triton"
    return SimpleNamespace(
        name="fused",
        description=f"fused Triton kernels ({mode}, dot precision {precision}, attention {kernel})",
        interpret=interpret,
        precision=precision,
        attention_kernel=kernel,
        attention_forward=attention_forward,
        attention_backward=attention_backward,
        add_layernorm_forward=add_layernorm_forward,
        add_layernorm_backward=add_layernorm_backward,
    )
