"""The one place that chooses between the reference jnp ops and the fused Triton kernels.

Both sides provide the same four functions, so the model code never knows which one runs:

    attention_forward(qkv (B, L, 3D), heads, keep_scale=None) -> (o (B, L, D), cache)
    attention_backward(cache, do (B, L, D)) -> dqkv (B, L, 3D)
    add_layernorm_forward(params {gamma, beta}, x, r or None, eps) -> (y, cache)     # y = LN(x + r)
    add_layernorm_backward(params, cache, dy) -> (ds, {gamma, beta})                   # ds: for x and r
"""

from __future__ import annotations

from types import SimpleNamespace

from vit import layers

REFERENCE = SimpleNamespace(
    name="reference",
    attention_forward=layers.attention_forward,
    attention_backward=layers.attention_backward,
    add_layernorm_forward=layers.add_layernorm_forward,
    add_layernorm_backward=layers.add_layernorm_backward,
)


def get_ops(fused: bool = False, interpret: bool | None = None):
    """Reference ops, or the fused kernels (compiled on a GPU, Triton's interpreter when
    interpret=True). Imported lazily: the reference path needs neither triton nor jax-triton."""
    if not fused:
        return REFERENCE
    from kernels import fused_ops  # noqa: PLC0415  (lazy on purpose)

    return fused_ops(interpret=interpret)
