"""Median time of the jitted float32 training step at the product config, hand-written backward
vs the same step with the gradient from jax.value_and_grad (the autodiff baseline), interleaved
so that load changes hit both alike.

    python bench/step_time.py [post|pre] [--batch 64] [--steps 8]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import vit
from cmdline import positive_int
from oracle import autodiff_grad_fn
from vit.step import TrainHParams, make_train_step

parser = argparse.ArgumentParser(prog="python bench/step_time.py", description=__doc__.split("\n\n")[0])
parser.add_argument("norm", nargs="?", default="post", choices=["post", "pre"],
                    help="the block layout (default: %(default)s)")
parser.add_argument("--batch", type=positive_int, default=64, help="images per step (default: %(default)s)")
parser.add_argument("--steps", type=positive_int, default=8,
                    help="timed steps of each, interleaved (default: %(default)s)")
args = parser.parse_args()

cfg = vit.ViTConfig(norm=args.norm)
params = vit.init_params(jax.random.PRNGKey(0), cfg)
state = vit.adamw_init(params)
images = jax.random.randint(jax.random.PRNGKey(1), (args.batch, 64, 64, 3), 0, 256).astype(jnp.uint8)
labels = jax.random.randint(jax.random.PRNGKey(2), (args.batch,), 0, 200)
steps = {"hand-written": make_train_step(cfg, TrainHParams(), donate=False),
         "autodiff": make_train_step(cfg, TrainHParams(), grad_fn=autodiff_grad_fn(cfg),
                                     donate=False)}
for step in steps.values():  # compile
    jax.block_until_ready(step(params, state, images, labels, jax.random.PRNGKey(0)))
times = {name: [] for name in steps}
for i in range(args.steps):
    for name, step in steps.items():
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, state, images, labels, jax.random.PRNGKey(i)))
        times[name].append(time.perf_counter() - t0)
for name, ts in times.items():
    med = float(np.median(ts))
    print(f"{args.norm}-norm {name:13s} median {med:.3f} s (min {min(ts):.3f}, max {max(ts):.3f})"
          f" -> {args.batch / med:.1f} images/s")
