"""What train.py and evaluate.py share on the command line: the op-set flags and the
multi-process start-up flags, each turned into the value the library takes (an ``Ops``, the
three settings of ``vit.parallel.init_distributed``), with errors that name the flag at fault;
and a Ctrl-C that is not lost while they start.

    ops = build_ops(args)          # --fused [--interpret] [--dot-precision ieee|tf32|tf32x3] -> Ops
    start_processes(args)          # --coordinator / --num-processes / --process-id (or JAX_* env)
    with InterruptWhileStarting() as interrupt: ...   # a Ctrl-C that JAX's gc callback swallows,
                                                      # given by interrupt.check() or at the end

Errors are ``UsageError``s; the commands print them as "<prog>: error: ..." and exit 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


class UsageError(ValueError):
    """A bad flag, environment variable or combination of them; the message names it."""


# ----------------------------------------------------------------------------------------------
# the op set


# kernels.launch.DOT_PRECISIONS, written out so that --help imports no jax (tests/test_cmdline.py
# keeps the two equal)
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def add_ops_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fused", action="store_true",
                        help="use the fused Triton kernels for attention and residual+LayerNorm")
    parser.add_argument("--interpret", action="store_true",
                        help="with --fused on a machine without a GPU: run the kernels in "
                             "Triton's (slow) CPU interpreter")
    parser.add_argument("--dot-precision", choices=DOT_PRECISIONS, default=None,
                        help="with --fused: tl.dot precision of float32 operands in the kernels "
                             "(default ieee: exact; tf32 is faster on a GPU; tf32x3 splits each "
                             "operand into two tf32 parts and takes three tensor-core dots, for "
                             "about float32's accuracy)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_ops(args: argparse.Namespace):
    """The op set the flags ask for: vit.ops.REFERENCE, or kernels.fused_ops(...)."""
    from vit.ops import REFERENCE  # noqa: PLC0415  (keeps --help fast)

    if not args.fused:
        for flag, value in (("--interpret", args.interpret), ("--dot-precision", args.dot_precision)):
            if value:
                raise UsageError(f"{flag} only makes sense with --fused")
        return REFERENCE
    import jax  # noqa: PLC0415

    if jax.default_backend() != "gpu" and not args.interpret:
        raise UsageError(
            "--fused needs a GPU for compiled Triton kernels, and this machine has none (JAX "
            f"backend: {jax.default_backend()}). Add --interpret to run the same kernels in "
            "Triton's CPU interpreter: correct but very slow, for tiny runs.")
    try:
        from kernels import COMPILED, INTERPRETED, fused_ops  # noqa: PLC0415
    except ImportError as err:
        raise UsageError(f"--fused needs triton ({err}); install it with pip install -e "
                         "'.[kernels]'") from None
    if not args.interpret:  # compiled: launched through jax-triton, imported at the first launch
        from kernels.launch import import_jax_triton  # noqa: PLC0415
        try:
            import_jax_triton()
        except ImportError as err:
            raise UsageError(f"--fused on a GPU launches the kernels through jax-triton, which "
                             f"does not import ({err}); install it with pip install -e '.[gpu]' "
                             "(jax-triton 0.3.1 and absl-py), or add --interpret") from None
    return fused_ops(INTERPRETED if args.interpret else COMPILED, args.dot_precision or "ieee")


def check_ops_run(ops, model) -> None:
    """A UsageError naming --fused when the op set cannot run the model (a ViTConfig), before
    any data is loaded or step compiled: the fused attention kernels take head dims that are
    powers of two from 16 to 128 only, and that failed as a traceback inside the first step."""
    try:
        ops.check_model(model)
    except ValueError as err:
        raise UsageError(f"--fused: {err}") from None


# ----------------------------------------------------------------------------------------------
# Ctrl-C


class InterruptWhileStarting:
    """Ctrl-C while a command starts (or, for evaluate.py, works): the handler that was there
    (Python's raises KeyboardInterrupt), and the signal remembered (``raised``), since it can be
    lost two ways: raised inside a garbage-collector callback (JAX registers one), which goes on
    (printing "Exception ignored ... KeyboardInterrupt", here kept quiet), and raised inside an
    extension module's import (numpy's, under jax's), which turns it into an ImportError
    traceback or aborts the process. So during an import it is held, and given by check(),
    which the command calls between its stages; one lost in a callback is given there too, or
    as the block ends."""

    def __enter__(self):
        self.raised, self.old_hook = False, sys.unraisablehook
        self.old = signal.signal(signal.SIGINT, self._on_signal)
        sys.unraisablehook = self._on_unraisable
        return self

    def _on_unraisable(self, unraisable):
        if not (self.raised and unraisable.exc_type is KeyboardInterrupt):
            self.old_hook(unraisable)

    def _on_signal(self, signum, frame):
        if self.old is signal.SIG_IGN:  # started with SIGINT ignored (nohup, &): so it stays
            return
        self.raised = True
        if not _importing(frame):
            self._deliver(frame)

    def _deliver(self, frame):
        if callable(self.old):
            self.old(signal.SIGINT, frame)  # Python's own raises KeyboardInterrupt
        raise KeyboardInterrupt

    def check(self):
        """Give a Ctrl-C that came and was held or swallowed (between the stages of a long
        command, so that it stops there rather than at its end)."""
        if self.raised:
            self._deliver(None)

    def __exit__(self, kind, error, traceback):
        signal.signal(signal.SIGINT, self.old)
        sys.unraisablehook = self.old_hook
        if self.raised and kind is None:  # came, and was swallowed after the last check()
            self._deliver(None)
        return False


def _importing(frame) -> bool:
    """Whether the code at `frame` runs inside an import (importlib's frames are below it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# ----------------------------------------------------------------------------------------------
# several processes (jax.distributed)

# flag, and the environment variable that stands in for it
DISTRIBUTED = {
    "coordinator": ("--coordinator", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("--num-processes", "JAX_NUM_PROCESSES"),
    "process_id": ("--process-id", "JAX_PROCESS_ID"),
}


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=None,
                        help="multi-host: address host:port of process 0 (or "
                             "JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="multi-host: process count (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-host: this process's id (or JAX_PROCESS_ID)")


def _env_int(name: str, flag: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag}: environment variable {name}={value!r} is not an integer") from None


def distributed_settings(coordinator: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) for a multi-process run, or None for a single
    process. Each flag falls back to its environment variable; a multi-process run needs all
    three."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES", "--num-processes")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID", "--process-id")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}

    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num-processes must be a positive integer, got {num_processes!r}")
    if process_id is not None and process_id < 0:
        raise UsageError(f"--process-id must be a non-negative integer, got {process_id!r}")
    if num_processes == 1 or all(v is None for v in given.values()):
        if process_id not in (None, 0):
            raise UsageError(f"--process-id {process_id} given for a single-process run "
                             f"(--num-processes 1): the only process is 0")
        return None

    missing = [name for name, value in given.items() if value is None]
    if missing:
        have = ", ".join(f"{DISTRIBUTED[n][0]} {given[n]}" for n in given if given[n] is not None)
        need = ", ".join(f"{DISTRIBUTED[n][0]} (or {DISTRIBUTED[n][1]})" for n in missing)
        raise UsageError(
            f"a multi-process run needs --coordinator host:port, --num-processes N and "
            f"--process-id I on every process; got {have} but no {need}")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be in 0..{num_processes - 1} for --num-processes "
                         f"{num_processes}, got {process_id}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator must be host:port (process 0's address and a free port), "
                         f"got {coordinator!r}")
    return coordinator, num_processes, process_id


def start_processes(args: argparse.Namespace) -> None:
    """Join the multi-process run the flags (or JAX_* variables) describe; nothing for one
    process. Call it before any other JAX call."""
    settings = distributed_settings(args.coordinator, args.num_processes, args.process_id)
    if settings is not None:
        from vit import parallel  # noqa: PLC0415

        coordinator, processes, pid = settings
        # JAX waits in silence for every process (then aborts after 5 minutes): say what for
        print(f"process {pid} of {processes}: waiting for all {processes} processes to join at "
              f"{coordinator} (process 0's address; JAX gives up after 5 minutes, Ctrl-C stops "
              "the wait)", file=sys.stderr, flush=True)
        # JAX waits in C++, where no Python handler runs: a Ctrl-C did nothing. The system's
        # default ends the process at once (nothing is written yet); SIGINT ignored stays so
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            parallel.init_distributed(*settings)
        finally:
            signal.signal(signal.SIGINT, previous)
