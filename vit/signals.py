"""How a training run stops on a signal: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to
stop at the next step boundary, with last.npz saved (Interrupted, raised by the loop); a second
leaves at once without saving (InterruptedTwice, raised by the handler).

    with StopOnSignal(standalone) as stop:
        ...
        if stop.requested:
            raise Interrupted

And a Ctrl-C in a command that only checks and prints: exit_code_of_a_check(main, prog).
"""

from __future__ import annotations

import os
import signal
import sys


class Interrupted(Exception):
    """A signal asked the run to stop: raised at a step boundary, where the state is whole."""


class InterruptedTwice(Exception):
    """A second signal while stopping: leave at once."""


class StopOnSignal:
    """Ctrl-C / SIGTERM while training: the first asks the loop to stop at the next step boundary
    (``requested``), a second raises InterruptedTwice at once. On exit the old handlers are back,
    and, when train.py was called from Python (not standalone), a signal that stopped the run is
    passed on to them (see train.py's docstring)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, standalone: bool):
        self.standalone, self.signum, self.old = standalone, None, {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum, _frame):
        if self.signum is not None:  # a second Ctrl-C: the user insists
            raise InterruptedTwice
        self.signum = signum
        # said now (the first step compiles: long); os.write, as print here can raise "reentrant call"
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {name}"
        os.write(2, f"\ntrain.py: {name}: finishing the current step, then saving last.npz "
                    f"({again} leaves at once, without saving)\n".encode())

    def __enter__(self):
        self.old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        if self.signum is not None and not self.standalone:
            # called from Python: with last.npz saved, the caller's own handler gets the signal
            # it would have got without train.py (KeyboardInterrupt, termination, ...)
            signal.raise_signal(self.signum)
        return False


def exit_code_of_a_check(main, prog: str) -> int:
    """main()'s exit code for a command that only checks and prints (python -m oracle.gradcheck,
    oracle.kernel_gradcheck, kernels.compile_check, vit.flops): a Ctrl-C is one line and exit
    code 130, as train.py's is, instead of a traceback from wherever the check was; output to a
    reader that went away (`... | head`) ends it quietly, with the shell's code for SIGPIPE, 141."""
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit, where a closed pipe is an "Exception ignored"
        return code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; it writes nothing: run it again to check", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return after_broken_pipe()


def after_broken_pipe() -> int:
    """Exit code 141 (the shell's for SIGPIPE) for a command whose stdout's reader went away,
    with stdout sent to /dev/null, so that what is left in its buffer is not a second error."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE
