"""Fused Triton kernels for vitfuse: attention and residual-add LayerNorm, forward and backward.

``fused_ops(launcher=COMPILED, dot_precision="ieee", attention_kernel="auto")`` returns a
``vit.ops.Ops``: the drop-in replacement for ``vit.ops.REFERENCE`` (same four functions, same
signatures, same results).

launcher: ``COMPILED`` compiles the kernels through jax-triton, which needs JAX's GPU backend (a
clear error elsewhere); ``INTERPRETED`` runs the same kernels through Triton's interpreter on the
CPU (slow: tests, checks). Both are ``kernels.launch.Launcher`` values. dot_precision: tl.dot input
precision for float32 operands, "ieee" (exact) or "tf32"/"tf32x3" (GPU). attention_kernel: "auto"
lets kernels/dispatch.py pick the attention kernel and its blocks per shape; "one-tile" or
"key-blocked" forces one (checks, benchmarks).

Files: launch.py (the two launchers), interpreter.py (Triton's interpreter, which ``INTERPRETED``
launches through), layernorm.py, attention.py (the one-tile attention), flash_attention.py (the
key-blocked attention), dispatch.py (which attention runs), each kernel file naming the reference
functions it must equal as ``REFERENCE``; compile_check.py and lowering_check.py (``python -m
kernels.compile_check`` / ``kernels.lowering_check``). The checks that compare the kernels with the
reference live outside the product, in oracle/.
"""

from __future__ import annotations

from kernels import dispatch, layernorm
from kernels.launch import COMPILED, INTERPRETED, Launcher, check_dot_precision, check_launcher
from vit.ops import Ops

__all__ = ["COMPILED", "INTERPRETED", "Launcher", "fused_ops"]


def fused_ops(launcher: Launcher = COMPILED, dot_precision: str = "ieee",
              attention_kernel: str = "auto") -> Ops:
    """The fused ops, bound to one launcher (COMPILED or INTERPRETED), one dot precision and one
    attention kernel choice."""
    check_launcher(launcher, "fused_ops: launcher").check_available()
    dot_precision = check_dot_precision(dot_precision)
    kernel = dispatch.check_kernel(attention_kernel)
    launch = {"launcher": launcher}

    def attention_forward(qkv, heads, keep_scale=None):
        return dispatch.attention_forward(qkv, heads, keep_scale, dot_precision=dot_precision,
                                          kernel=kernel, **launch)

    def attention_backward(cache, do):
        return dispatch.attention_backward(cache, do, dot_precision=dot_precision, kernel=kernel,
                                           **launch)

    def add_layernorm_forward(params, x, r, eps):
        return layernorm.add_layernorm_forward(params, x, r, eps, **launch)

    def add_layernorm_backward(params, cache, dy):
        return layernorm.add_layernorm_backward(params, cache, dy, **launch)

    return Ops(
        name="fused",
        attention_forward=attention_forward,
        attention_backward=attention_backward,
        add_layernorm_forward=add_layernorm_forward,
        add_layernorm_backward=add_layernorm_backward,
        description=f"fused Triton kernels ({launcher.name}, dot precision {dot_precision}, attention "
                    f"{kernel})",
        partitionable=False,
    )
