"""What the parallel tests and their subprocess worker share: one small model with every source of
randomness on, a fixed stream of global batches and step keys, and npz dumps of the results.

Imported by tests/test_parallel.py (by path) and by worker.py (same directory). Importing it does not
touch JAX's devices, so a worker can still set up its devices / jax.distributed after importing it.
"""

from __future__ import annotations

import numpy as np

GLOBAL_BATCH = 8
STEPS = 4            # steps of the equivalence run
CKPT_STEP = 2        # the 4-device run writes a checkpoint after this many steps
MP_STEPS = 3         # steps of the two-process run
SHARDED_STEPS = 2    # steps of the 4-device run with the ops under shard_map (the fused kernels)
ACCUM_STEPS = 2      # micro-batches of the runs with gradient accumulation (SHARDED_STEPS steps)


def config():
    from vit.config import ViTConfig  # noqa: PLC0415

    # pre-norm so the head's final LayerNorm on (B, D) rows goes through the ops too; every
    # dropout kind on, so the random masks of the global batch are part of the comparison;
    # head dim 16, the smallest the fused attention kernel takes (L = 17 is not a power of two)
    return ViTConfig(image_size=16, patch_size=4, channels=3, d_model=32, heads=2, layers=2,
                     mlp_dim=64, num_classes=10, norm="pre", dropout=0.1, attn_dropout=0.1,
                     ffn_dropout=0.1, drop_path=0.1)


def hparams(accum_steps: int = 1):
    from vit.config import TrainHParams  # noqa: PLC0415

    # crop + flip + mixup (a permutation of the whole global batch: rows pair across devices),
    # label smoothing, global-norm clipping and warmup: everything the step does per batch;
    # accum_steps = ACCUM_STEPS: 2 micro-batches of 4 rows, one row per device of 4
    return TrainHParams(lr=1e-3, weight_decay=0.05, warmup_steps=2, total_steps=10,
                        schedule="cosine", clip_norm=1.0, label_smoothing=0.1, crop_pad=2,
                        flip=True, mixup_alpha=0.4, accum_steps=accum_steps)


MEAN = (0.45, 0.5, 0.55)
STD = (0.25, 0.2, 0.3)


def batch(step: int, size: int = GLOBAL_BATCH):
    """Global batch number `step`: uint8 images (size, 16, 16, 3), int32 labels (size,)."""
    rng = np.random.default_rng([1234, step])
    images = rng.integers(0, 256, (size, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (size,), dtype=np.int32)
    return images, labels


def eval_batch():
    """A padded eval batch: 8 rows, the last 3 marked invalid."""
    images, labels = batch(999)
    valid = np.arange(GLOBAL_BATCH) < GLOBAL_BATCH - 3
    return images, labels, valid


def augmented(images, labels, key) -> dict:
    """The training augmentation with every draw it has on (crop, flip, RandAugment, random
    erasing, mixup or cutmix: one per batch) of a batch as given: the worker gives it the batch sharded over
    its 4 devices, the test the same batch on one device."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from vit.data.augment import train_augment  # noqa: PLC0415

    augment = jax.jit(functools.partial(
        train_augment, num_classes=10, crop_pad=2, flip=True, smoothing=0.1, erase_prob=0.5,
        mixup_alpha=0.4, cutmix_alpha=1.0, rand_augment_ops=2))
    x, targets = augment(key, images, labels, np.asarray(MEAN), np.asarray(STD))
    return {"x": np.asarray(x), "targets": np.asarray(targets)}


def step_key(step: int):
    import jax  # noqa: PLC0415

    return jax.random.PRNGKey(1000 + step)


def init_state():
    import jax  # noqa: PLC0415

    from vit.model import init_params  # noqa: PLC0415
    from vit.optim import adamw_init  # noqa: PLC0415

    params = init_params(jax.random.PRNGKey(0), config())
    return params, adamw_init(params)


def flat(tree, prefix: str) -> dict:
    from vit.checkpoint import flatten  # noqa: PLC0415

    return flatten(tree, prefix)


def save_npz(path, **arrays):
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
