"""curves.png of a run: how training went, epoch by epoch, from its metrics history (the records
of metrics.jsonl), redrawn by vit/training.py (Run.draw_curves: after an epoch once
training.CURVES_SECONDS have passed since the last drawing, and when training stops)."""

from __future__ import annotations

from pathlib import Path

from vit.figures import pyplot, save_png


def plot_curves(history: list[dict], path: Path, clip_norm: float | None = None,
                top_k: int = 5):
    """Train vs val accuracy and loss per epoch, and the training gradient's norm (the epoch's
    mean and largest, before clipping, beside the clipping threshold clip_norm when there is
    one), written atomically. top_k: what val_top5 measured, min(5, classes), for its label."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss, ax_norm) = plt.subplots(1, 3, figsize=(15, 4))
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["val_top1"] for h in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * h["val_top5"] for h in history], "--", label=f"val top-{top_k}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    # records written before the norms were (a resumed older run) have none: left out
    normed = [h for h in history if h.get("grad_norm") is not None]
    ax_norm.plot([h["epoch"] for h in normed], [h["grad_norm"] for h in normed], "o-",
                 label="mean over the epoch's steps")
    ax_norm.plot([h["epoch"] for h in normed], [h["grad_norm_max"] for h in normed], "--",
                 label="largest")
    if clip_norm:
        ax_norm.axhline(clip_norm, color="gray", linestyle=":", label=f"clip_norm {clip_norm:g}")
    positive = any(h["grad_norm_max"] > 0 for h in normed)  # a log scale needs a value above 0
    ax_norm.set(xlabel="epoch", ylabel="global L2 norm", title="training gradient norm",
                yscale="log" if positive else "linear")
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (pyplot() set the backend)

    for ax in (ax_acc, ax_loss, ax_norm):  # epochs: whole numbers (no tick at 1.25)
        if len(epochs) <= 10:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)
