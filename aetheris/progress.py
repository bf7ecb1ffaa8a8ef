"""Progress bars that stay readable in a log file.

    bar = progress_bar(total=240, desc="train")      # a live tqdm bar on a terminal
    ...                                              # whole lines, one per ~10 % or per minute, in `make demo > log`

On a terminal ``progress_bar`` is tqdm's own bar (``tqdm.auto``). When its stream is not a terminal (a log file,
a pipe, CI), a carriage-return bar would write thousands of overwritten updates into the file; there it prints
one plain line at the start, at every ``every_fraction`` of the total, at most ``every_seconds`` apart, and at
the end -- the same counters, rate, ETA and postfix (``set_postfix``) as the live bar.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineProgress(tqdm):
    """A tqdm bar that writes whole lines: at the start, every ``every_fraction`` of ``total``, at least every
    ``every_seconds`` while it moves, and at the end. Everything else (counters, rates, postfix) is tqdm's."""

    def __init__(self, *args, every_fraction: float = 0.1, every_seconds: float = 60.0, **kwargs):
        self._every_fraction, self._every_seconds = every_fraction, every_seconds
        self._printed_n, self._printed_t, self._next_n = None, 0.0, 0
        kwargs.setdefault("bar_format", LINE_FORMAT)
        # tqdm asks for a redraw on every update (mininterval=0, miniters=1); display() decides what is written.
        super().__init__(*args, mininterval=0, miniters=1, dynamic_ncols=False, **kwargs)

    def _step_n(self) -> int:
        return max(1, int((self.total or 0) * self._every_fraction)) if self.total else 0

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clearing or overriding its line: nothing to erase in a log
            return True
        now = time.monotonic()
        due = (self._printed_n is None                                         # the first line
               or (self._step_n() and self.n >= self._next_n)                  # the next ~10 %
               or (self.n != self._printed_n and now - self._printed_t >= self._every_seconds))
        if due:
            self._write_line(now)
        return True

    def _write_line(self, now: float) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._printed_n, self._printed_t = self.n, now
        step = self._step_n()
        if step:
            self._next_n = (self.n // step + 1) * step

    def close(self):
        if getattr(self, "disable", True):
            return
        if self.n != self._printed_n:
            self._write_line(time.monotonic())  # the final count, rate and postfix
        # tqdm's own close would redraw or erase the line with a carriage return; only its bookkeeping is kept.
        self.disable = True
        self._decr_instances(self)


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int | None = None, desc: str = "", *, file=None, disable: bool = False,
                 every_fraction: float = 0.1, every_seconds: float = 60.0, **kwargs):
    """A tqdm bar on a terminal, a ``LineProgress`` (one line per ``every_fraction``) anywhere else.

    ``file`` defaults to stderr; ``disable=True`` shows nothing. Other keyword arguments go to tqdm
    (``initial``, ``unit``, ``leave``, ...)."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        return auto_tqdm(total=total, desc=desc, file=file, disable=disable, dynamic_ncols=True, **kwargs)
    kwargs.pop("leave", None)  # a written line cannot be taken back
    return LineProgress(total=total, desc=desc, file=file, disable=disable, every_fraction=every_fraction,
                        every_seconds=every_seconds, **kwargs)
