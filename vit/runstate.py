"""The state of a training run between two steps: what a checkpoint holds and a resume restores.

    state = RunState.fresh(params, opt_state, mean, std)          # a new run
    state = RunState.from_checkpoint(*checkpoint.load(path, ...))  # --resume
    trees, meta = state.to_checkpoint(host_params, host_opt, steps_per_epoch, config=..., ...)

One shape for both directions, so a field saved is a field restored: params and AdamW state (as
arrays), the data position (epoch, step in the epoch), the running sums of the epoch in progress
(train loss, accuracy, gradient norm), the metrics history, the best validation top-1 so far, and
the normalisation statistics of the training set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# the meta keys a resumable checkpoint must hold (checkpoint.load(..., meta_keys=RESUME_META))
RESUME_META = ("epoch", "step_in_epoch", "global_step", "history", "running", "best_top1",
               "mean", "std")
RESUME_TREES = ("params", "opt")


def position_in_words(epoch: int, step_in_epoch: int) -> str:
    """A data position (epochs completed, steps of the next one) as train.py's messages name it:
    "epoch 2, step 4" (4 steps into epoch 2) or, between epochs, "the end of epoch 1"."""
    return f"epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"


def _no_running() -> dict:
    """The epoch's running sums: loss and correct over its images (seen), the gradient norm
    (before clipping) over its steps, and the largest norm."""
    return {"loss": 0.0, "correct": 0.0, "seen": 0, "grad_norm": 0.0, "grad_norm_max": 0.0,
            "steps": 0}


@dataclass
class RunState:
    params: Any
    opt_state: Any
    mean: np.ndarray  # per-channel normalisation of the training set
    std: np.ndarray
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of epoch `epoch` (0-based) completed
    running: dict = field(default_factory=_no_running)  # that epoch's sums (_no_running)
    history: list = field(default_factory=list)  # one metrics record per completed epoch
    best_top1: float = -1.0
    best_val_loss: float | None = None  # of the best epoch: a tie in top-1 goes to the lower loss

    @classmethod
    def fresh(cls, params, opt_state, mean, std) -> "RunState":
        return cls(params, opt_state, np.asarray(mean, np.float32), np.asarray(std, np.float32))

    @classmethod
    def from_checkpoint(cls, trees: dict, meta: dict) -> "RunState":
        return cls(params=trees["params"], opt_state=trees["opt"],
                   mean=np.asarray(meta["mean"], np.float32),
                   std=np.asarray(meta["std"], np.float32), epoch=meta["epoch"],
                   step_in_epoch=meta["step_in_epoch"],
                   running={**_no_running(), **meta["running"]},  # older ones: no norm sums
                   history=list(meta["history"]), best_top1=meta["best_top1"],
                   best_val_loss=meta.get("best_val_loss", _first_best_loss(meta)))

    def to_checkpoint(self, host_params, host_opt, steps_per_epoch: int, **extra) -> tuple[dict, dict]:
        """(trees, meta) for vit.checkpoint.save; host_*: numpy copies of params and opt_state
        (parallel.gather_to_host); extra: more JSON-able meta (config, seed, class names)."""
        meta = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.epoch * steps_per_epoch + self.step_in_epoch,
                "history": self.history, "running": self.running, "best_top1": self.best_top1,
                "best_val_loss": self.best_val_loss,
                "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        return {"params": host_params, "opt": host_opt}, meta

    def account(self, loss: float, accuracy: float, grad_norm: float, n_images: int) -> None:
        """Add one step's loss and accuracy over n_images, and its gradient norm, to the epoch's
        running sums; a non-finite loss raises FloatingPointError (training must stop)."""
        if not math.isfinite(loss):
            raise FloatingPointError(loss)
        r = self.running
        r["loss"] += loss * n_images
        r["correct"] += accuracy * n_images
        r["seen"] += n_images
        r["grad_norm"] += grad_norm
        r["grad_norm_max"] = max(r["grad_norm_max"], grad_norm)
        r["steps"] += 1

    def train_means(self) -> tuple[float, float]:
        seen = max(self.running["seen"], 1)
        return self.running["loss"] / seen, self.running["correct"] / seen

    def grad_norms(self) -> tuple[float | None, float | None]:
        """(mean, max) of the epoch's gradient norms so far, before clipping; (None, None) before
        its first step is counted (or when a checkpoint older than these sums holds them all)."""
        r = self.running
        if not r["steps"]:
            return None, None
        return r["grad_norm"] / r["steps"], r["grad_norm_max"]

    def finish_epoch(self, record: dict) -> bool:
        """Close the epoch with its metrics record; -> whether it is the best yet: the highest val
        top-1, and of equal top-1 the lowest val loss (on a small validation set ties are many)."""
        self.history.append(record)
        self.epoch, self.step_in_epoch, self.running = self.epoch + 1, 0, _no_running()
        top1, loss = record["val_top1"], record.get("val_loss")
        best = top1 > self.best_top1 or (top1 == self.best_top1 and None not in (
            loss, self.best_val_loss) and loss < self.best_val_loss)
        if best:
            self.best_top1, self.best_val_loss = top1, loss
        return best


def _first_best_loss(meta: dict) -> float | None:
    """The val loss of the first epoch at the checkpoint's best top-1 (the one best.npz holds):
    for a checkpoint saved before best_val_loss was."""
    return next((h.get("val_loss") for h in meta["history"] if h["val_top1"] == meta["best_top1"]),
                None)
