"""What a trained model does, in pictures: saliency grids, attention maps, confusion matrices (the
top classes of image files are vit/predict.py's).

Used by `python evaluate.py RUN --saliency N | --attention N | --per-class`; every
function also works on its own. All of it runs the float32 reference ops (vit/ops.py), whatever the run
trained with.

Saliency: for validation image i with true label y_i, the map is |d loss_i / d pixel| with loss_i the
cross-entropy of image i alone and pixels in [0, 1] units, the largest over the colour channels. It comes
from the model's hand-written backward (vit.image_gradient): the model sees x = (pixel - mean) / std, so
d loss_i / d pixel = (d loss_i / d x) / std, and d loss_i / d x = B * d mean-loss / d x for a batch of B.

Attention map (attention rollout, Abnar & Zuidema 2020): block i's attention weights P_i (B, H, L, L),
the softmax the forward computes, averaged over the heads and mixed with the residual path as
A_i = (mean_h P_i + I) / 2 (rows still sum to 1); R = A_n ... A_2 A_1 says how much each token's output
of the last block draws on each input token. The map is R's CLS row over the patches, on the patch grid.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vit import checkpoint, runconfig
from vit.config import ViTConfig
from vit.data.loader import normalize
from vit.figures import pyplot, save_png
from vit.model import forward, image_gradient, model_forward

# ----------------------------------------------------------------------------------------------
# a run


@dataclass
class Run:
    """A checkpoint of train.py, with what is needed to feed it images."""

    path: Path
    params: dict
    mean: np.ndarray
    std: np.ndarray
    config: runconfig.RunConfig  # the run's resolved config (config.json)
    meta: dict

    @property
    def model(self) -> ViTConfig:
        return self.config.model

    @property
    def class_names(self) -> list[str] | None:
        """The class names saved with the checkpoint (runs since the image-folder support), else None."""
        return self.meta.get("class_names")


RUN_META = ("config", "mean", "std", "epoch")  # what a checkpoint of train.py holds beside params


def load_run(run_dir, checkpoint_name: str = "best", way_out=None) -> Run:
    """RUN_DIR/<checkpoint_name>.npz of train.py: the one loader of evaluate.py and of the
    pictures. A missing file is a FileNotFoundError; a damaged one, or an .npz without what a run
    saves (RUN_META), a CheckpointError naming it (way_out: see checkpoint.load_from_run); a
    saved config that no longer reads, a ConfigError naming the file."""
    run_dir = Path(run_dir)
    path = run_dir / f"{checkpoint_name}.npz"
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir} does not exist")
    if run_dir.is_file():
        raise FileNotFoundError(f"{run_dir} is a file, not a run directory (one that train.py wrote)")
    if not path.is_file():
        other = run_dir / ("last.npz" if checkpoint_name == "best" else "best.npz")
        if other.is_file():  # best.npz comes at an epoch's end: a run stopped in its first has none
            raise FileNotFoundError(f"{path} does not exist, but the run's {other.name} does: "
                                    f"evaluate that one with --checkpoint {other.stem}")
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory of "
                                "train.py that finished at least one epoch?)")
    trees, meta = checkpoint.load_from_run(run_dir, checkpoint_name, meta_keys=RUN_META,
                                           trees=("params",), way_out=way_out)
    cfg = runconfig.from_dict(meta["config"], f"{path} (its config)")
    return Run(path, trees["params"], np.asarray(meta["mean"], np.float32),
               np.asarray(meta["std"], np.float32), cfg, meta)


def run_data(run: Run):
    """The run's [data]: its checkpoint's, with the folders of RUN_DIR/config.json, which a
    --resume with a moved --data-dir rewrites (a best.npz saved before still names the old)."""
    data = run.config.data
    try:
        saved = json.loads((run.path.parent / "config.json").read_text(encoding="utf-8"))["data"]
        if saved["dataset"] != data.dataset:
            return data
        return dataclasses.replace(data, data_dir=saved.get("data_dir", data.data_dir),
                                   cache_dir=saved.get("cache_dir", data.cache_dir))
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: the checkpoint's
        return data


def load_split(run: Run, data_dir=None, progress: bool = True, split: str = "val"):
    """One split of the run's data ("val", or "train" for evaluate.py --augment), at the model's
    image size; a DatasetError if its classes are not the ones the run was trained on (data_dir:
    another folder than the run's)."""
    from vit.data import BUNDLED_DATASETS, DatasetError, check_run_data_dir, load_dataset  # noqa: PLC0415
    from vit.data.common import check_same_classes  # noqa: PLC0415

    data = run_data(run)
    if data_dir is None:
        check_run_data_dir(data.dataset, data.data_dir, str(run.path.parent))
    elif data.dataset in BUNDLED_DATASETS:  # load_dataset would ignore it: say so instead
        raise DatasetError(f"--data-dir {data_dir}: {run.path.parent} was trained on {data.dataset}; "
                           f"{BUNDLED_DATASETS[data.dataset]} (leave --data-dir out)")
    elif not Path(data_dir).is_dir():
        raise DatasetError(f"--data-dir {data_dir}: no such folder")
    found = load_dataset(data.dataset, data_dir or data.data_dir, split, workers=data.workers,
                         progress=progress, image_size=run.model.image_size, layout=data.layout,
                         cache_dir=data.cache_dir)
    check_same_classes(run.class_names, found.class_names, data_dir or data.data_dir, run.path.parent)
    return found


def model_input(images_u8, mean, std, dtype=jnp.float32):
    """uint8 (N, S, S, C) -> what the model sees, as the train and eval steps normalise it."""
    return normalize(images_u8, mean, std, dtype)


# ----------------------------------------------------------------------------------------------
# saliency


def pick_indices(total: int, n: int) -> np.ndarray:
    """n indices spread evenly over 0..total-1 (so the picks cover the classes of a sorted set)."""
    n = max(0, min(n, total))
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64)) if n else np.zeros(0, np.int64)


_image_gradient = jax.jit(image_gradient, static_argnums=3)
jitted_forward = jax.jit(forward, static_argnums=2)  # (params, x, model) -> logits


def saliency(params, model: ViTConfig, images_u8, labels, mean, std, chunk: int = 64):
    """-> (maps (N, S, S) >= 0, pixel gradients (N, S, S, C), logits (N, K)).

    pixel gradients: d loss_i / d pixel (pixels in [0, 1]) of each image's own cross-entropy loss,
    by the hand-written backward; maps: their absolute value, the largest over the channels.
    Runs in the dtype of params (float64 under jax.enable_x64, for checks)."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    std_ = jnp.asarray(std, dtype)
    grads, logits = [], []
    for s in range(0, len(labels), chunk):
        x = model_input(images_u8[s:s + chunk], mean, std, dtype)
        y = jnp.asarray(np.asarray(labels[s:s + chunk]), jnp.int32)
        dx = _image_gradient(params, x, y, model)  # d mean-loss / d x
        grads.append(np.asarray(dx * x.shape[0] / std_))  # d loss_i / d pixel
        logits.append(np.asarray(jitted_forward(params, x, model)))
    grads = np.concatenate(grads)
    return np.abs(grads).max(axis=-1), grads, np.concatenate(logits)


SALIENCY_PAIRS_PER_ROW = 4
SALIENCY_CELL_INCHES = (1.8, 2.2)  # one image or map, with its title
SALIENCY_HEADER_INCHES = 0.6  # the figure's title
DPI = 100


def saliency_figure_size(n: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid for n images."""
    cols = 2 * min(n, SALIENCY_PAIRS_PER_ROW)
    rows = -(-n // SALIENCY_PAIRS_PER_ROW)
    return (round(max(cols * SALIENCY_CELL_INCHES[0], 6.0) * DPI),
            round((rows * SALIENCY_CELL_INCHES[1] + SALIENCY_HEADER_INCHES) * DPI))


def pair_axes(n: int):
    """A figure for n (left, right) pairs of panels, SALIENCY_PAIRS_PER_ROW pairs per row, every
    axis off: -> (figure, [(left axes, right axes)] * n). finish_pairs titles and writes it."""
    plt = pyplot()
    if n == 0:
        raise ValueError("no images to plot")
    width, height = saliency_figure_size(n)
    cols, rows = 2 * min(n, SALIENCY_PAIRS_PER_ROW), -(-n // SALIENCY_PAIRS_PER_ROW)
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    at = [divmod(i, SALIENCY_PAIRS_PER_ROW) for i in range(n)]
    return fig, [(axes[r, 2 * c], axes[r, 2 * c + 1]) for r, c in at]


def finish_pairs(fig, title: str, path) -> Path:
    """The figure's title on top, room for two-line panel titles, written to path (a PNG)."""
    height = fig.get_figheight()
    fig.suptitle(title, fontsize=8, y=1 - 0.08 / height, va="top")
    title_room = SALIENCY_HEADER_INCHES + 0.35  # the header and the first row's titles
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - title_room / height,
                        wspace=0.08, hspace=0.35)
    path = Path(path)
    save_png(fig, path, DPI)
    return path


def show_image(ax, image, vmax=255):
    """An image (H, W, C) on its axes: grey (C = 1) on 0..vmax, else as RGB; pixels as squares."""
    image = np.asarray(image)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")


def plot_pairs(images_u8, maps, true_names, pred_names, path, map_title, title) -> Path:
    """Grid of (image, map) pairs (pair_axes): each image titled with its true and predicted
    class, each map with map_title(i) and drawn to its own max; title on top."""
    fig, pairs = pair_axes(len(maps))
    for i, (ax_img, ax_map) in enumerate(pairs):
        show_image(ax_img, images_u8[i])
        ok = true_names[i] == pred_names[i]
        ax_img.set_title(f"true: {true_names[i][:22]}\npred: {pred_names[i][:22]}", fontsize=7,
                         color="darkgreen" if ok else "firebrick")
        ax_map.imshow(maps[i], cmap="inferno", vmin=0, vmax=max(float(maps[i].max()), 1e-30),
                      interpolation="nearest")
        ax_map.set_title(map_title(i), fontsize=7)
    return finish_pairs(fig, title, path)


def plot_saliency(images_u8, maps, true_names, pred_names, path) -> Path:
    """The saliency grid: each validation image beside |d loss / d pixel|."""
    return plot_pairs(images_u8, maps, true_names, pred_names, path,
                      lambda i: f"|d loss / d pixel|\nmax {float(maps[i].max()):.2g}",
                      "validation images beside |d loss / d pixel| from the hand-written backward\n"
                      "(largest over the channels; each map scaled to its own max)")


def write_npz(path: Path, arrays: dict) -> Path:
    """np.savez, atomically."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def picked_validation(val, n: int):
    """(indices, images, labels) of n validation images spread evenly over the set."""
    idx = pick_indices(len(val.labels), n)
    return idx, np.asarray(val.images[idx]), np.asarray(val.labels[idx], np.int32)


def write_pairs(out_dir, stem: str, plot, val, picked, maps, logits, **extra) -> dict:
    """<stem>.png, drawn by plot(images, maps, true names, predicted names, path), and <stem>.npz
    (the arrays it draws, and extra) in out_dir, for the picked validation images (indices,
    images, labels) and their maps and logits. -> the arrays and paths."""
    idx, images, labels = picked
    pred = logits.argmax(-1)
    names = list(val.class_names)
    png = plot(images, maps, [names[k] for k in labels], [names[k] for k in pred],
               Path(out_dir) / f"{stem}.png")
    arrays = {"indices": idx, "images": images, "labels": labels, "predictions": pred.astype(np.int32),
              "maps": maps.astype(np.float32), **{k: v.astype(np.float32) for k, v in extra.items()}}
    npz = write_npz(Path(out_dir) / f"{stem}.npz", arrays)
    return {**arrays, "png": png, "npz": npz}


def write_saliency(run: Run, val, n: int, out_dir, name: str = "best") -> dict:
    """saliency-<name>.png (the grid) and saliency-<name>.npz (the arrays it draws) in out_dir for n
    validation images spread over the set. -> the arrays and paths."""
    picked = picked_validation(val, n)
    _, images, labels = picked
    maps, grads, logits = saliency(run.params, run.model, images, labels, run.mean, run.std)
    return write_pairs(out_dir, f"saliency-{name}", plot_saliency, val, picked, maps, logits,
                       grads=grads)


# ----------------------------------------------------------------------------------------------
# attention maps


def _forward_with_attention(params, x, model):
    """(logits, every block's P stacked) of the reference forward (no dropout)."""
    logits, (_, blocks, _) = model_forward(params, x, model)
    return logits, jnp.stack([block.mha[1].p for block in blocks])  # each block's SdpaCache.p


_forward_with_attention_jit = jax.jit(_forward_with_attention, static_argnums=2)


def attention_probs(params, model: ViTConfig, images_u8, mean, std, chunk: int = 64):
    """-> (P (blocks, N, H, L, L), logits (N, K)): every block's softmax attention weights (rows:
    queries, columns: keys, token 0 the CLS) as the model's forward computes them, read from its
    cache, and the logits of the same forward."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    logits, probs = [], []
    for s in range(0, len(images_u8), chunk):
        x = model_input(images_u8[s:s + chunk], mean, std, dtype)
        out = _forward_with_attention_jit(params, x, model)
        logits.append(np.asarray(out[0]))
        probs.append(np.asarray(out[1]))
    return np.concatenate(probs, axis=1), np.concatenate(logits)


def attention_rollout(probs: np.ndarray) -> np.ndarray:
    """probs (blocks, N, H, L, L) -> (N, L - 1): the CLS row of R = A_n ... A_1 with
    A_i = (mean over heads of P_i + I) / 2, over the patch tokens (see the module docstring).
    Each row of R sums to 1; the CLS's share of itself is left out."""
    probs = np.asarray(probs, np.float64)
    blocks, n, _, l, _ = probs.shape
    rollout = np.broadcast_to(np.eye(l), (n, l, l))
    for p in probs:
        rollout = ((p.mean(axis=1) + np.eye(l)) / 2) @ rollout
    return rollout[:, 0, 1:]


def plot_attention(images_u8, maps, true_names, pred_names, path, patch: int, blocks: int) -> Path:
    """The attention grid: each validation image beside its rollout map on the patch grid."""
    return plot_pairs(images_u8, maps, true_names, pred_names, path,
                      lambda i: f"CLS attention rollout\nmax {float(maps[i].max()):.2g}",
                      f"validation images beside the share of the CLS token's last output drawn from "
                      f"each {patch}x{patch} patch\n(attention rollout over {blocks} blocks, heads "
                      f"averaged; each map scaled to its own max)")


def write_attention(run: Run, val, n: int, out_dir, name: str = "best") -> dict:
    """attention-<name>.png (each image beside its rollout map on the patch grid) and
    attention-<name>.npz (the arrays, every block's weights among them) in out_dir, for n
    validation images spread over the set (the saliency grid's). -> the arrays and paths."""
    picked = picked_validation(val, n)
    probs, logits = attention_probs(run.params, run.model, picked[1], run.mean, run.std)
    grid = run.model.image_size // run.model.patch_size
    maps = attention_rollout(probs).reshape(len(picked[0]), grid, grid)
    plot = partial(plot_attention, patch=run.model.patch_size, blocks=len(probs))
    return write_pairs(out_dir, f"attention-{name}", plot, val, picked, maps, logits,
                       attention=probs)


# ----------------------------------------------------------------------------------------------
# confusion matrix

CONFUSION_MAX_CLASSES = 30


def confusion_classes(matrix: np.ndarray, max_classes: int = CONFUSION_MAX_CLASSES) -> np.ndarray:
    """The classes to show, in an order that puts confusions side by side.

    Up to max_classes: every class. Beyond: the classes with the lowest accuracy, each followed by the
    class it is most often mistaken for, until max_classes are chosen. Order: start from the class with
    the most confusions; then repeatedly the not yet placed class most confused (both ways) with the
    last one placed (none: the one with the most confusions left), so pairs and groups that are mixed
    up sit next to each other along the diagonal."""
    m = np.asarray(matrix, np.int64)
    k = len(m)
    total = m.sum(axis=1)
    accuracy = np.where(total > 0, np.diag(m) / np.maximum(total, 1), np.inf)  # unseen classes last
    off = m - np.diag(np.diag(m))
    mixed = off + off.T
    if k <= max_classes:
        chosen = list(range(k))
    else:
        chosen = []
        for c in np.argsort(accuracy, kind="stable"):
            for cls in (int(c), int(np.argmax(off[c])) if off[c].any() else None):
                if cls is not None and cls not in chosen and len(chosen) < max_classes:
                    chosen.append(cls)
            if len(chosen) >= max_classes:
                break
    left = set(chosen)
    mass = mixed.sum(axis=1)
    order = []
    while left:
        candidates = sorted(left)
        if order and mixed[order[-1], candidates].max() > 0:
            nxt = candidates[int(np.argmax(mixed[order[-1], candidates]))]
        else:
            nxt = candidates[int(np.argmax(mass[candidates]))]
        order.append(nxt)
        left.remove(nxt)
    return np.asarray(order, np.int64)


def confusion_figure_size(shown: int) -> tuple[int, int]:
    side = 4.0 + 0.3 * shown
    return round((side + 1.0) * DPI), round((side + 0.4) * DPI)


def plot_confusion(matrix, class_names, path, max_classes: int = CONFUSION_MAX_CLASSES) -> np.ndarray:
    """Confusion matrix PNG (rows: true class, columns: predicted; colour: share of the row, counts
    written in). -> the indices of the classes shown, in the order shown."""
    from matplotlib.colors import PowerNorm  # noqa: PLC0415

    plt = pyplot()
    m = np.asarray(matrix, np.int64)
    shown = confusion_classes(m, max_classes)
    sub = m[np.ix_(shown, shown)]
    rates = sub / np.maximum(m[shown].sum(axis=1, keepdims=True), 1)
    width, height = confusion_figure_size(len(shown))
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI))
    im = ax.imshow(rates, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    for r in range(len(shown)):
        for c in range(len(shown)):
            if sub[r, c]:
                ax.text(c, r, str(sub[r, c]), ha="center", va="center", fontsize=7,
                        color=(("#ffb3b3" if r != c else "white") if rates[r, c] > 0.5  # mistakes:
                               else ("firebrick" if r != c else "black")))     # red on any cell
    labels = [class_names[i][:24] for i in shown]
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    which = (f"all {len(m)} classes" if len(shown) == len(m) else
             f"{len(shown)} of {len(m)} classes:\nthe least accurate, and what they are taken for")
    ax.set_title(f"confusion on {int(m.sum())} validation images, {which}\n"
                 "colour: share of the true class (sqrt scale)\nnumbers: counts (red: mistakes)",
                 fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    save_png(fig, path, DPI)
    return shown


def write_confusion(matrix, class_names, out_dir, name: str = "best") -> dict:
    """confusion-<name>.png and confusion-<name>.npz (the full matrix and the classes shown)."""
    out_dir = Path(out_dir)
    png = out_dir / f"confusion-{name}.png"
    shown = plot_confusion(matrix, class_names, png)
    npz = out_dir / f"confusion-{name}.npz"
    tmp = npz.with_name(npz.stem + ".tmp.npz")
    np.savez(tmp, matrix=np.asarray(matrix, np.int64), shown=shown, class_names=np.asarray(class_names))
    os.replace(tmp, npz)
    return {"png": png, "npz": npz, "shown": shown}
