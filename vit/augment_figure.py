"""What a run trains on, as a picture: the first images of its first batch as they are stored,
beside the same images as its first step augmented them (the run's crop, flip, RandAugment,
random erasing, mixup/cutmix), each titled with the soft target its loss was taken against.
`python evaluate.py RUN --augment N` writes RUN_DIR/augment.png and augment.npz (the arrays it
draws).

    rows, images, labels = first_batch(run, train_set)     # global step 0's batch, as the run read it
    x, targets = first_step_inputs(run, images, labels)    # what step 0 trained on

Both are the training's own code, not a copy: the order is vit.data.loader.epoch_order (the
Batcher's), the key train_epoch gives global step 0 (vit.step.step_keys(seed)(0), whose first
split the step augments with), and the augmentation vit.step.training_inputs (the step's).
The whole batch is augmented, since mixup and cutmix take their partners from all of it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vit.explain import Run, finish_pairs, pair_axes, show_image, write_npz

SHOWN_CLASSES = 2  # a target's largest weights named in its title (mixup/cutmix: two images)


def first_batch(run: Run, train_set) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, uint8 images, int32 labels) of the run's first batch (epoch 1, step 1), in order."""
    from vit.data.loader import epoch_order  # noqa: PLC0415

    t = run.config.train
    order = epoch_order(len(train_set.labels), t.seed, 0, repeats=t.repeat_augment)
    rows = order[: t.batch_size]
    return rows, np.asarray(train_set.images[rows]), np.asarray(train_set.labels[rows], np.int32)


def first_step_inputs(run: Run, images, labels) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (B, S, S, C) normalised, targets float32 (B, K)): what the run's first step
    trained on, given its first batch."""
    from vit.step import step_keys, training_inputs  # noqa: PLC0415

    hp = run.config.hparams(steps_per_epoch=1)  # the schedule's lengths do not augment
    k_aug, _ = jax.random.split(step_keys(run.config.train.seed)(0))  # as the step splits it
    augment = jax.jit(lambda x, y, key: training_inputs(run.model, hp, x, y, key, run.mean, run.std))
    x, targets = augment(jnp.asarray(images), jnp.asarray(labels), k_aug)
    return np.asarray(x, np.float32), np.asarray(targets, np.float32)


def shown_pixels(x, mean, std) -> np.ndarray:
    """Normalised images back in 0..1 (x * std + mean; erasing's noise clipped to the range)."""
    return np.clip(np.asarray(x) * np.asarray(std) + np.asarray(mean), 0.0, 1.0)


def target_title(target, names) -> str:
    """The target's largest weights, e.g. "0.62 tabby\\n0.38 goldfish" (a smoothed one-hot: one
    line; a weight a smoothed 0 has, left out)."""
    top = np.argsort(-target, kind="stable")[:SHOWN_CLASSES]
    floor = float(np.min(target))  # what label smoothing gives every class
    lines = [f"{target[k]:.2f} {names[k][:18]}" for k in top if target[k] > floor + 1e-6]
    return "\n".join(lines or [f"{target[top[0]]:.2f} {names[top[0]][:18]}"])


def plot_augmented(stored_u8, trained, labels, targets, names, path, title) -> Path:
    """Grid of (stored image, image trained on) pairs (vit.explain.pair_axes)."""
    fig, pairs = pair_axes(len(stored_u8))
    for i, (ax_stored, ax_trained) in enumerate(pairs):
        show_image(ax_stored, stored_u8[i])
        show_image(ax_trained, trained[i], vmax=1)
        ax_stored.set_title(f"stored\n{names[labels[i]][:22]}", fontsize=7)
        ax_trained.set_title(target_title(targets[i], names), fontsize=7, color="navy")
    return finish_pairs(fig, title, path)


def write_augmented(run: Run, train_set, n: int, out_dir) -> dict:
    """augment.png and augment.npz in out_dir: the first n images of the run's first batch (all
    of it if smaller), stored and as trained on. -> the arrays and paths."""
    rows, images, labels = first_batch(run, train_set)
    x, targets = first_step_inputs(run, images, labels)
    n = min(n, len(rows))
    names = list(run.class_names or train_set.class_names)
    trained = shown_pixels(x[:n], run.mean, run.std)
    t = run.config.train
    png = plot_augmented(images[:n], trained, labels[:n], targets[:n], names, Path(out_dir) / "augment.png",
                         f"the first {n} of the {len(rows)} images of the run's first batch (seed {t.seed}): "
                         f"as stored, and as its first step trained on them\n(titles: the soft "
                         f"target of the loss; pixels shown clipped to 0..1)")
    arrays = {"rows": rows[:n], "images": images[:n], "labels": labels[:n], "x": x[:n],
              "targets": targets[:n]}
    return {**arrays, "png": png, "npz": write_npz(Path(out_dir) / "augment.npz", arrays)}
