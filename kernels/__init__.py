"""Fused Triton kernels for vitfuse: attention and residual-add LayerNorm, forward and backward.

``fused_ops(interpret=False, dot_precision="ieee")`` returns a ``vit.ops.Ops``: the drop-in
replacement for ``vit.ops.REFERENCE`` (same four functions, same signatures, same results).

interpret: False compiles the kernels through jax-triton, which needs JAX's GPU backend (a clear
error elsewhere); True runs the same kernels through Triton's interpreter on the CPU (slow: tests,
checks). dot_precision: tl.dot input precision for float32 operands, "ieee" (exact) or
"tf32"/"tf32x3" (GPU).

Files: launch.py (the one launcher), interpreter.py (Triton's interpreter as a launcher),
layernorm.py and attention.py (kernels + wrappers, each naming the reference functions it must
equal as ``REFERENCE``), compile_check.py (``python -m kernels.compile_check``). The checks that
compare the kernels with the reference live outside the product, in oracle/.
"""

from __future__ import annotations

from kernels import attention, layernorm
from kernels.launch import check_dot_precision, check_gpu
from vit.ops import Ops

__all__ = ["fused_ops"]


def fused_ops(interpret: bool = False, dot_precision: str = "ieee") -> Ops:
    """The fused ops, bound to one launcher (compiled or interpreted) and one dot precision."""
    if not interpret:
        check_gpu()
    dot_precision = check_dot_precision(dot_precision)
    launch = {"interpret": bool(interpret)}

    def attention_forward(qkv, heads, keep_scale=None):
        return attention.attention_forward(qkv, heads, keep_scale, dot_precision=dot_precision,
                                           **launch)

    def attention_backward(cache, do):
        return attention.attention_backward(cache, do, dot_precision=dot_precision, **launch)

    def add_layernorm_forward(params, x, r, eps):
        return layernorm.add_layernorm_forward(params, x, r, eps, **launch)

    def add_layernorm_backward(params, cache, dy):
        return layernorm.add_layernorm_backward(params, cache, dy, **launch)

    mode = "Triton's interpreter" if interpret else "jax-triton"
    return Ops(
        name="fused",
        attention_forward=attention_forward,
        attention_backward=attention_backward,
        add_layernorm_forward=add_layernorm_forward,
        add_layernorm_backward=add_layernorm_backward,
        description=f"fused Triton kernels ({mode}, dot precision {dot_precision})",
        partitionable=False,
    )
