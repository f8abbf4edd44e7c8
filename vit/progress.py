"""Progress bars that suit where they are shown: on a terminal, tqdm redrawing in place; written to
a file or a pipe (`python train.py > train.log 2>&1`), one plain line every LOG_SECONDS and the
last one, instead of hundreds of frames joined by carriage returns.

    for images in progress_bar(chunks, total=n, desc="decoding", unit="img", disable=not progress):
        ...

progress_bar takes tqdm's arguments and returns a tqdm (update, set_postfix, write, close work
as ever); the bar goes to stderr unless `file` says otherwise.
"""

from __future__ import annotations

import sys
import time

LOG_SECONDS = 30.0  # in a log: at most one line per this many seconds (and the last one)


class LogLines:
    """A file for tqdm that turns its frames ("\\r" + the bar, redrawn) into lines: the newest
    frame is written when LOG_SECONDS have passed since the last line (or the start), and when
    the bar ends."""

    def __init__(self, stream, every: float = LOG_SECONDS, clock=None):
        self.stream, self.every, self.clock = stream, every, clock or time.monotonic
        # the newest frame not written; when a line was (or the bar began: a bar that ends
        # within LOG_SECONDS is its last line alone, not a 0% line too)
        self.pending, self.last = None, self.clock()

    def write(self, text: str):
        if "\n" in text:  # the bar ends (tqdm's close): its last frame, if not written yet
            self._line()
            return
        frame = text.replace("\r", "").rstrip()
        if frame:  # (a bar cleared for tqdm.write is spaces only)
            self.pending = frame
            if self.clock() - self.last >= self.every:
                self._line()

    def _line(self):
        if self.pending is not None:
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.last = None, self.clock()

    def flush(self):
        self.stream.flush()


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on stderr (or kwargs' file): in place on a terminal, as LogLines
    elsewhere."""
    from tqdm import tqdm  # noqa: PLC0415

    stream = kwargs.pop("file", None) or sys.stderr
    if not is_terminal(stream) and not kwargs.get("disable"):
        stream = LogLines(stream)
    return tqdm(iterable, file=stream, **kwargs)
