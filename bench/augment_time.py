"""Median time of the training augmentation (vit.data.augment.train_augment, jitted, on a uint8
batch on the device), stage by stage: crop + flip + normalise + mixup/cutmix (the recipe's),
then with random erasing (0.25), then with RandAugment (2 ops, m9, std 0.5) too, interleaved
so that load changes hit all three alike.

    python bench/augment_time.py [--size 64] [--batch 64] [--reps 15]
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmdline import positive_int
from vit.data.augment import train_augment

parser = argparse.ArgumentParser(prog="python bench/augment_time.py", description=__doc__.split("\n\n")[0])
parser.add_argument("--size", type=positive_int, default=64,
                    help="image side in pixels; the crop pads by size // 16 (default: %(default)s)")
parser.add_argument("--batch", type=positive_int, default=64, help="images per batch (default: %(default)s)")
parser.add_argument("--reps", type=positive_int, default=15,
                    help="timed batches of each, interleaved (default: %(default)s)")
args = parser.parse_args()

recipe = dict(num_classes=200, crop_pad=max(1, args.size // 16), flip=True, smoothing=0.1,
              mixup_alpha=0.8, cutmix_alpha=1.0)
stages = {"crop+flip+mix": recipe,
          "+ erasing": {**recipe, "erase_prob": 0.25},
          "+ erasing + RandAugment": {**recipe, "erase_prob": 0.25, "rand_augment_ops": 2}}
augment = {name: jax.jit(functools.partial(train_augment, **kw)) for name, kw in stages.items()}
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                                       dtype=np.uint8))
labels = jnp.arange(args.batch) % 200
mean, std = jnp.array([0.48, 0.45, 0.40]), jnp.array([0.27, 0.26, 0.28])
for fn in augment.values():  # compile
    jax.block_until_ready(fn(jax.random.PRNGKey(0), images, labels, mean, std))
times = {name: [] for name in augment}
for i in range(args.reps):
    for name, fn in augment.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.PRNGKey(i), images, labels, mean, std))
        times[name].append(time.perf_counter() - t0)
print(f"{args.batch} images of {args.size}x{args.size}x3 on {jax.devices()[0].platform}:")
for name, ts in times.items():
    med = float(np.median(ts))
    print(f"  {name:24s} median {1e3 * med:8.1f} ms -> {args.batch / med:>9,.0f} images/s")
