#!/usr/bin/env python
"""The dense-matmul floor of one training step at the product shape: only the GEMMs of the
forward (x W) and backward (dy W^T, x^T dy) of every dense layer and the attention matmuls, in one
jit, timed as the median of --repeats calls after one compiling call.

    python bench/matmul_floor.py [--batch 64] [--repeats 8]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmdline import positive_int

L, D, F, H, Dh, LAYERS = 65, 256, 1024, 8, 32, 8  # the product ViT: tokens, width, FFN, heads


def step(x, h, ws, q, pm):
    """Every block's matmuls, forward and backward, each summed so that none is left out."""
    outs = []
    for _ in range(LAYERS):
        for name, inp in (("qkv", x), ("out", x), ("fc1", x), ("fc2", h)):
            w = ws[name]
            y = inp @ w
            dy = y * 1e-3
            outs += [jnp.sum(y), jnp.sum(dy @ w.T), jnp.sum(jnp.einsum("bli,blj->ij", inp, dy))]
        t = jnp.swapaxes
        outs += [jnp.sum(q @ t(q, -1, -2)), jnp.sum(pm @ q),           # fwd: QK^T, PV
                 jnp.sum(pm @ q), jnp.sum(t(pm, -1, -2) @ q),          # bwd: dS K, dS^T Q
                 jnp.sum(t(pm, -1, -2) @ q), jnp.sum(q @ t(q, -1, -2))]  # dV = P^T dO, dP = dO V^T
        x, h = x + 1e-3, h + 1e-3
    return sum(outs)


def flops(b: int) -> int:
    return LAYERS * 3 * 2 * b * L * (D * 3 * D + D * D + D * F + F * D) \
        + LAYERS * 6 * 2 * b * H * L * L * Dh


def main(argv=None):
    p = argparse.ArgumentParser(prog="python bench/matmul_floor.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--repeats", type=positive_int, default=8, help="timed calls (default 8)")
    args = p.parse_args(argv)
    b = args.batch
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    x, h = jax.random.normal(k[0], (b, L, D)), jax.random.normal(k[1], (b, L, F))
    ws = {"qkv": jax.random.normal(k[2], (D, 3 * D)), "out": jax.random.normal(k[3], (D, D)),
          "fc1": jax.random.normal(k[4], (D, F)), "fc2": jax.random.normal(k[5], (F, D))}
    q, pm = jax.random.normal(k[6], (b, H, L, Dh)), jax.random.normal(k[7], (b, H, L, L))
    f = jax.jit(step)
    f(x, h, ws, q, pm).block_until_ready()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        f(x, h, ws, q, pm).block_until_ready()
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    print(f"matmul floor: median {median:.3f} s for {flops(b) / 1e9:.0f} GFLOP -> "
          f"{flops(b) / median / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
