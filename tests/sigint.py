"""A Ctrl-C as JAX's garbage-collector callback meets it, for the tests of the commands'
Ctrl-C handling (test_start_interrupts, test_evaluate_command)."""

import gc
import signal


def ctrl_c_swallowed_by_a_gc_callback():
    """A real SIGINT raised inside a garbage-collector callback, which swallows the
    KeyboardInterrupt the handler raises there (as JAX's does); returns as if nothing happened."""
    def callback(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGINT)
    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)


def sigint_blocked_here(path) -> "np.ndarray":
    """A decode function for vit.data.cache.decode_all that reports, as a 1x1 image, whether
    SIGINT is blocked in the process decoding `path` (1) or not (0)."""
    import numpy as np

    return np.full((1, 1, 1), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), np.uint8)
