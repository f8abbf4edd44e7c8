#!/usr/bin/env python
"""The dense-matmul floor of one training step at the product shape: only the GEMMs of the
forward (x W) and backward (dy W^T, x^T dy) of every dense layer and the attention matmuls, in one jit."""
import time, jax, jax.numpy as jnp, numpy as np
B, L, D, F, H, Dh = 64, 65, 256, 1024, 8, 32
k = jax.random.split(jax.random.PRNGKey(0), 16)
x = jax.random.normal(k[0], (B, L, D)); h = jax.random.normal(k[1], (B, L, F))
Ws = {"qkv": jax.random.normal(k[2], (D, 3*D)), "out": jax.random.normal(k[3], (D, D)), "fc1": jax.random.normal(k[4], (D, F)), "fc2": jax.random.normal(k[5], (F, D))}
q = jax.random.normal(k[6], (B, H, L, Dh)); pm = jax.random.normal(k[7], (B, H, L, L))
def step(x, h, Ws, q, pm):
    outs = []
    for layer in range(8):
        for name, inp in (("qkv", x), ("out", x), ("fc1", x), ("fc2", h)):
            W = Ws[name]
            y = inp @ W
            dy = y * 1e-3
            outs += [jnp.sum(y), jnp.sum(dy @ W.T), jnp.sum(jnp.einsum("bli,blj->ij", inp, dy))]
        s = q @ jnp.swapaxes(q, -1, -2); o = pm @ q          # fwd: QK^T, PV
        outs += [jnp.sum(s), jnp.sum(o), jnp.sum(pm @ q), jnp.sum(jnp.swapaxes(pm, -1, -2) @ q),  # bwd: dS K, dS^T Q
                 jnp.sum(jnp.swapaxes(pm, -1, -2) @ q), jnp.sum(q @ jnp.swapaxes(q, -1, -2))]   # dV = P^T dO, dP = dO V^T
        x = x + 1e-3; h = h + 1e-3
    return sum(outs)
f = jax.jit(step); f(x, h, Ws, q, pm).block_until_ready()
ts = []
for _ in range(8):
    t = time.perf_counter(); f(x, h, Ws, q, pm).block_until_ready(); ts.append(time.perf_counter() - t)
flops = 8 * 3 * 2 * B * L * (D*3*D + D*D + D*F + F*D) + 8 * 6 * 2 * B * H * L * L * Dh
print(f"matmul floor: median {np.median(ts):.3f} s for {flops/1e9:.0f} GFLOP -> {flops/np.median(ts)/1e9:.0f} GFLOP/s")
