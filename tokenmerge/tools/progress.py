"""Progress bars for long work, the same in every command: tqdm's bar on a terminal,
and where the output is a log file or a pipe, one plain line at the start, at most one
every :data:`LOG_INTERVAL_S` seconds and one at the end, instead of carriage-return
redraws that fill a log."""
from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL_S = 30.0


class ProgressBar(tqdm):
    """``tqdm`` (same arguments) that writes whole lines where its output is not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any):
        stream = kwargs.get("file") or sys.stderr
        self._terminal = stream.isatty()
        self._lines = _WholeLines(stream)
        self._last_line = -float("inf")
        self._last_count: float | None = None
        self._closing = False
        if not self._terminal:
            kwargs["file"] = self._lines
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._terminal:
            return super().display(msg, pos)
        now = time.monotonic()
        if (self._closing and self.n != self._last_count) or now - self._last_line >= LOG_INTERVAL_S:
            self._last_line, self._last_count = now, self.n
            line = self.__str__() if msg is None else msg
            if line:
                self._lines.write_line(line)
        return True

    def close(self) -> None:
        self._closing = True
        super().close()


class _WholeLines:
    """The output of a :class:`ProgressBar` off a terminal: the lines it writes, and
    none of the carriage returns and line ends tqdm writes around a redraw."""

    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def write_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.flush()

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()
