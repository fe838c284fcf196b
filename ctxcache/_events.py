"""Load outcomes, appended as one JSON line per load to ``events.log`` (the write side of the stats).

O_APPEND writes of one short line are atomic with respect to each other on POSIX and Windows, so many
processes count into one file without a lock. This module is all a load imports for its stats: a log
grown past :data:`_COMPACT_AT` is renamed aside for folding (one rename, no read, no sleep); the
reading and folding live in ``_stats``, which only housekeeping and ``stats()`` import.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import _fs

# The log is rotated for folding past this size (~10,000 launches), so `stats` and `ls` stay fast.
_COMPACT_AT = 1 << 20


def record(path: Path, outcome: str, key: str | None, reason: str | None, compile_s: float, saved_s: float,
           *, tier: str | None = None, warm: bool = False) -> None:
    """Append one load's outcome. Raises ``OSError`` (the caller ignores it: stats never break a load)."""
    event: dict[str, Any] = {"t": round(time.time(), 3), "o": outcome, "k": key, "r": reason, "c": round(compile_s, 4),
                             "s": round(saved_s, 4)}
    if tier is not None:
        event["f"] = tier  # a hit whose entry was fetched from a bundle / package / remote during this load
    if warm:
        event["w"] = 1
    size = _fs.append_line(path, (json.dumps(event, separators=(",", ":")) + "\n").encode())
    if size > _COMPACT_AT:
        rotate(path)


def rotate(path: Path) -> None:
    """Rename the log aside for folding (``_stats.compact`` folds it once it has settled)."""
    try:
        _fs.rename(path, path.with_name(f"events.{time.time_ns()}.{os.urandom(3).hex()}.folding"))
    except OSError:
        pass  # another process rotated it first
