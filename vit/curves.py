"""curves.png of a run: how training went, epoch by epoch, from its metrics history (the records
of metrics.jsonl), redrawn by vit/training.py (Run.draw_curves: after an epoch once
training.CURVES_SECONDS have passed since the last drawing, and when training stops).

Several runs side by side (say one fine-tuned with --init-from and one from scratch):

    python -m vit.curves runs/a runs/b --out compare.png

draws their validation top-1 and loss on shared axes, one colour per run (the training loss
dashed), and prints each run's best validation top-1 and the epoch it came at (best.npz's epoch:
of equal top-1, the lower val loss).
"""

from __future__ import annotations

import argparse
import json
import sys
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


def read_history(run_dir) -> list[dict]:
    """RUN_DIR/metrics.jsonl's records; a ValueError naming the file (and line) that is not one."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (is it a run directory of train.py, "
                         "with an epoch done?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            if not all(k in record for k in ("epoch", "val_top1", "val_loss", "train_loss")):
                raise ValueError("it lacks epoch, val_top1, val_loss or train_loss")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}, line {number}: not an epoch's record ({err})") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path} is empty: the run has finished no epoch")
    return records


def plot_runs(histories: dict[str, list[dict]], path: Path):
    """Validation top-1, and validation (solid) and training (dashed) loss, of every run
    (histories: {label: records}) on shared axes, written atomically."""
    plt = pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, history) in enumerate(histories.items()):
        colour, epochs = f"C{i}", [h["epoch"] for h in history]
        ax_acc.plot(epochs, [100 * h["val_top1"] for h in history], "o-", color=colour,
                    label=label)
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", color=colour,
                     label=f"{label} (val)")
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "--", color=colour,
                     label=f"{label} (train)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation top-1")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415  (pyplot() set the backend)

    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit.curves",
                                description="Draw several runs' validation top-1 and loss on "
                                            "shared axes, from their metrics.jsonl.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of train.py")
    p.add_argument("--out", default="runs.png", help="the PNG to write (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        histories = {str(run): read_history(run) for run in args.runs}
    except ValueError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    plot_runs(histories, Path(args.out))
    for run, history in histories.items():
        best = max(history, key=lambda h: (h["val_top1"], -h["val_loss"]))  # best.npz's rule
        print(f"{run}: best val top-1 {100 * best['val_top1']:.2f}% at epoch {best['epoch']} of "
              f"{history[-1]['epoch']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
