"""The K columns of a QKV bias: the one set of parameters that two correct runs differing only in
float32 summation order (more devices, micro-batches, fused kernels) do not end up agreeing on.

The key bias b_k adds q_i . b_k to every score of query row i, which the softmax ignores, so its
exact gradient is zero. In float32 it is ~1e-11 noise that depends on the summation order, and
AdamW normalises that noise into updates of up to about lr per step. Tests that compare two runs'
parameters compare those D columns against adamw_noise_bound and every other number tightly; tests/test_parallel.py checks that the gradient there is noise indeed.
"""

from __future__ import annotations

import numpy as np


def qkv_bias_columns(name: str, d_model: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For a QKV bias (a name ending in "qkv/b", width 3 * d_model): (its Q and V columns, its K
    columns); None for any other tensor."""
    if not name.endswith("qkv/b"):
        return None
    return np.r_[0:d_model, 2 * d_model:3 * d_model], np.arange(d_model, 2 * d_model)


def adamw_noise_bound(lr_sum: float) -> float:
    """The most a key-bias element may differ between two runs after AdamW steps whose learning
    rates add up to lr_sum: each step moves it by at most about lr, either way, in each run."""
    return 2.0 * lr_sum
