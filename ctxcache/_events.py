"""Load outcomes, appended as one JSON line per load to ``events.log``.

O_APPEND writes of one short line are atomic with respect to each other on POSIX and Windows, so many
processes count into one file without a lock; the counters are sums over the lines.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A line longer than this is damage, not an event (and must not cost memory to skip).
_MAX_LINE = 4096


def record(path: Path, outcome: str, key: str | None, reason: str | None, compile_s: float, saved_s: float) -> None:
    line = json.dumps(
        {"t": round(time.time(), 3), "o": outcome, "k": key, "r": reason, "c": round(compile_s, 4), "s": round(saved_s, 4)},
        separators=(",", ":"),
    )
    # O_NOFOLLOW: a planted link must not make every launch append to a file outside the cache;
    # O_NONBLOCK: a FIFO planted here fails (ENXIO) instead of blocking the launch.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags, 0o600)
    try:
        # A hard link shares its inode with a file elsewhere: appending would write there too.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EINVAL, "events log is not a plain file of the cache (a link?)", str(path))
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@dataclass
class Stats:
    """Counters over every load recorded in a cache (all processes)."""

    hits: int = 0
    misses: int = 0
    fallbacks: int = 0
    bypasses: int = 0
    compile_seconds: float = 0.0
    saved_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    per_key_hits: dict[str, int] = field(default_factory=dict)
    since: float | None = None

    @property
    def loads(self) -> int:
        return self.hits + self.misses + self.fallbacks + self.bypasses

    def as_dict(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "hits": self.hits,
            "misses": self.misses,
            "fallbacks": self.fallbacks,
            "bypasses": self.bypasses,
            "compile_seconds": round(self.compile_seconds, 3),
            "saved_seconds": round(self.saved_seconds, 3),
            "reasons": dict(sorted(self.reasons.items())),
            "since": self.since,
        }


def summarize(path: Path) -> Stats:
    stats = Stats()
    from ._fs import open_regular

    try:
        f = os.fdopen(open_regular(path), "rb")  # not a link out of the cache, not a FIFO that blocks
    except OSError:
        return stats
    with f:
        for raw in f:
            if len(raw) > _MAX_LINE:
                continue
            try:
                ev = json.loads(raw)
                outcome = ev["o"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: skip it, never fail a stats read
            if stats.since is None and isinstance(ev.get("t"), (int, float)):
                stats.since = ev["t"]
            if outcome == "hit":
                stats.hits += 1
                key = ev.get("k")
                if isinstance(key, str):
                    stats.per_key_hits[key] = stats.per_key_hits.get(key, 0) + 1
            elif outcome == "miss":
                stats.misses += 1
            elif outcome == "fallback":
                stats.fallbacks += 1
            elif outcome == "bypass":
                stats.bypasses += 1
            else:
                continue
            if isinstance(ev.get("r"), str):
                stats.reasons[ev["r"]] = stats.reasons.get(ev["r"], 0) + 1
            if isinstance(ev.get("c"), (int, float)):
                stats.compile_seconds += ev["c"]
            if isinstance(ev.get("s"), (int, float)):
                stats.saved_seconds += ev["s"]
    return stats


def reset(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
