"""A bytes-based progress line on stderr for long transfers (export, import, pull).

On a terminal: one line rewritten in place (``\\r``), at most ten times a second, erased at the end. Not a
terminal (a log, CI): a plain line every ``interval`` seconds, so a long import is never silent and a
short one prints nothing. stdout stays untouched (``--format json`` remains machine-clean).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO

from ._common import human_size

_PHASES = {"verify": "verifying", "write": "writing", "import": "importing", "read": "reading the archive"}


class ProgressLine:
    """``progress(phase, done, total)`` for the library's transfer functions."""

    def __init__(self, command: str, *, stream: IO[str] | None = None, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.command = command
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last = self.started
        self.shown = False

    def text(self, phase: str, done: int, total: int) -> str:
        pct = f" ({100 * done // total}%)" if total > 0 else ""
        return f"ctxcache {self.command}: {_PHASES.get(phase, phase)} {human_size(done)} of {human_size(total)}{pct}"

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        if self.live:
            if now - self.last < 0.1 and done < total:
                return
            self.last = now
            self.stream.write("\r" + self.text(phase, done, total) + "\033[K")
            self.stream.flush()
            self.shown = True
        elif now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.text(phase, done, total) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Erase the live line, so the command's own output starts on a clean line."""
        if self.live and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False
