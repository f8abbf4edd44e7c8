"""The benchmark timer. After one warm-up call each *sample* is ``n`` back-to-back calls
(asynchronous dispatch) followed by one ``jax.block_until_ready`` on all their results, divided by
``n``; ``n`` is calibrated so a sample lasts ~``target_sample_s``. Median, 20th and 80th
percentile over the samples. Small ops are timed in chains of k fresh input sets (``chain``,
``rotation_count``): nothing runs from a warm cache, and one dispatch covers k ops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import numpy as np

# fresh random input sets per timed call, until this many bytes (more than any L2 holds)
ROTATE_BYTES = 128 << 20
MAX_ROTATE_SETS = 16


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    calls_per_sample: int


@dataclass(frozen=True)
class TimerSettings:
    target_sample_s: float
    min_samples: int
    min_total_s: float
    max_total_s: float  # stop once past this with at least 3 samples
    max_inflight_bytes: int = 1 << 30  # results held until a sample's block_until_ready


def timer_settings(backend: str) -> TimerSettings:
    if backend == "cpu":
        return TimerSettings(target_sample_s=0.2, min_samples=5, min_total_s=1.0, max_total_s=20.0)
    return TimerSettings(target_sample_s=0.02, min_samples=15, min_total_s=0.5, max_total_s=10.0)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def time_calls(run, settings: TimerSettings, *, chained: bool = False) -> Timing:
    """run(i) -> arrays: the i-th call of a compiled, already-checked function. One warm-up call,
    then samples of n calls each (see the module doc). chained: each call consumes (donates) the
    previous call's result, so only the last result is waited on (it depends on all the others)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(0))
    first = time.perf_counter() - t0
    n = max(1, min(1000, math.ceil(settings.target_sample_s / max(first, 1e-6))))
    n = max(1, min(n, settings.max_inflight_bytes // max(1, nbytes(out))))
    del out
    samples: list[float] = []
    i = 1
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        outs = [run(i + j) for j in range(n)]
        jax.block_until_ready(outs[-1] if chained else outs)
        samples.append((time.perf_counter() - t0) / n)
        del outs
        i += n
        elapsed = time.perf_counter() - start
        if len(samples) >= settings.min_samples and elapsed >= settings.min_total_s:
            break
        if elapsed >= settings.max_total_s and len(samples) >= 3:
            break
    med, p20, p80 = np.percentile(np.asarray(samples) * 1e3, [50, 20, 80])
    return Timing(float(med), float(p20), float(p80), len(samples), n)


def rotation_count(set_bytes: int) -> int:
    """How many distinct input sets the timed calls cycle through."""
    return max(1, min(MAX_ROTATE_SETS, math.ceil(ROTATE_BYTES / max(1, set_bytes))))


def chain(fn, k: int):
    """One executable applying fn to k input sets in sequence: sets[i+1] passes through an
    optimization barrier together with fn(sets[i]), so XLA can neither fuse nor reorder the k
    applications (no horizontal fusion, no CSE: the sets differ) and adds no work. One dispatch
    per k ops, so small ops are timed on the device rather than at the host's dispatch rate."""
    def chained(*sets):
        outs = []
        for i, args in enumerate(sets):
            if i:
                _, args = jax.lax.optimization_barrier((outs[-1], args))
            outs.append(fn(*args))
        return outs
    assert k >= 1
    return chained
