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
