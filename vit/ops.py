"""The op set: the four functions the model calls for attention and residual+LayerNorm.

    attention_forward(qkv (B, L, 3D), heads, keep_scale=None) -> (o (B, L, D), cache)
    attention_backward(cache, do (B, L, D)) -> dqkv (B, L, 3D)
    add_layernorm_forward(params {gamma, beta}, x, r or None, eps) -> (y, cache)     # y = LN(x + r)
    add_layernorm_backward(params, cache, dy) -> (ds, {gamma, beta})                   # ds: for x and r

Two op sets exist: ``REFERENCE`` here (the jnp layers of vit/layers.py) and the fused Triton
kernels, ``kernels.fused_ops(...)``. An entry point (train.py, evaluate.py, a benchmark, a test)
builds one and passes it down as ``ops=``; the model code never knows which runs, and this package
never imports the kernels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from vit import layers


def any_model(model) -> None:
    """The reference layers run every ViTConfig."""


class Ops(NamedTuple):
    """One op set. ``partitionable``: XLA's SPMD partitioner can split these ops over a batch
    sharded across devices (plain jnp code can; custom calls such as Triton kernels cannot, so
    vit.parallel runs those per device under shard_map). ``check_model(model)``: a ValueError,
    naming the model's keys, for a ViTConfig these ops cannot run (a command asks before any
    work; the ops themselves would fail only inside the first jitted step)."""

    name: str
    attention_forward: Callable
    attention_backward: Callable
    add_layernorm_forward: Callable
    add_layernorm_backward: Callable
    description: str = ""
    partitionable: bool = False
    check_model: Callable = any_model


REFERENCE = Ops(
    name="reference",
    attention_forward=layers.attention_forward,
    attention_backward=layers.attention_backward,
    add_layernorm_forward=layers.add_layernorm_forward,
    add_layernorm_backward=layers.add_layernorm_backward,
    description="reference jnp layers (vit/layers.py)",
    partitionable=True,
)

# the names of the functions (every field but the four that describe the set), for code that
# swaps or wraps them one at a time
FUNCTIONS = tuple(f for f in Ops._fields if f not in ("name", "description", "partitionable",
                                                      "check_model"))
