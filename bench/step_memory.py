"""What one compiled training step holds in memory, by gradient-accumulation steps: will a batch
fit, and how many micro-batches (`train.py --accum-steps N`) make it fit?

    python -m bench.step_memory                                   # the product ViT, batch 256
    python -m bench.step_memory configs/vit-b16.toml --batch 1024 --accum 1 4 8 --compute-dtype bf16

XLA's own accounting of the compiled step (`.lower(...).compile().memory_analysis()`) on the
backend this runs on: arguments (params, AdamW state, the uint8 batch) and temporary buffers
(activations, the forward's cache, gradients). Nothing runs and nothing of the model's size is
allocated (the shapes are abstract), so it answers for a GPU's batch from a CPU too; XLA fuses
differently per backend, so run it on the GPU for that GPU's figure.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import vit
from cmdline import positive_int
from vit import runconfig
from vit.step import make_train_step

MIB = 2 ** 20


def step_memory(config: vit.ViTConfig, hp: vit.TrainHParams, batch: int,
                compute_dtype: str = "fp32") -> dict:
    """{"arguments", "temporary", "output"}: bytes of the compiled step at this batch."""
    params = jax.eval_shape(lambda: vit.init_params(jax.random.PRNGKey(0), config))
    opt = jax.eval_shape(vit.adamw_init, params)
    images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, config.channels),
                                  jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = make_train_step(config, hp, compute_dtype=compute_dtype)
    compiled = step.lower(params, opt, images, labels, jax.random.PRNGKey(0)).compile()
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(f"XLA gives no memory analysis on {jax.default_backend()}")
    return {"arguments": m.argument_size_in_bytes, "temporary": m.temp_size_in_bytes,
            "output": m.output_size_in_bytes}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default=None,
                   help="a run config (configs/*.toml; default: the product ViT with the default "
                        "training settings, no augmentation)")
    p.add_argument("--batch", type=positive_int, default=256, help="global batch (default 256)")
    p.add_argument("--accum", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="accumulation steps to compare (default 1 2 4 8)")
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help="default: the config's (fp32 without a config)")
    args = p.parse_args(argv)
    try:
        cfg = runconfig.from_dict(runconfig.load_toml(args.config, args.config), args.config) \
            if args.config else runconfig.RunConfig()
    except runconfig.ConfigError as err:
        p.error(str(err))  # exit status 2, the message naming the file
    dtype = args.compute_dtype or cfg.train.compute_dtype
    hp = cfg.hparams(steps_per_epoch=1)
    print(f"{args.config or 'the product ViT'}: batch {args.batch}, {dtype}, "
          f"{jax.default_backend()} (XLA memory_analysis of the compiled step)")
    print(f"{'accum':>5}  {'micro-batch':>11}  {'arguments':>10}  {'temporary':>10}")
    for steps in args.accum:
        if args.batch % steps:
            print(f"{steps:>5}  batch {args.batch} does not split into {steps} micro-batches")
            continue
        m = step_memory(cfg.model, hp.replace(accum_steps=steps), args.batch, dtype)
        print(f"{steps:>5}  {args.batch // steps:>11}  {m['arguments'] / MIB:>6.0f} MiB  "
              f"{m['temporary'] / MIB:>6.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
