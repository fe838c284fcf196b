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
# The log is folded into events.summary.json past this size (~10,000 launches), so `stats` and `ls`
# stay fast and the file stays small in an app that launches for years.
_COMPACT_AT = 1 << 20
# Appenders open, write one line and close within microseconds; a compactor waits this long after
# renaming the log so that a line whose writer opened the old name still lands before it is read.
_SETTLE = 0.05


def record(path: Path, outcome: str, key: str | None, reason: str | None, compile_s: float, saved_s: float,
           *, tier: str | None = None) -> None:
    event: dict[str, Any] = {"t": round(time.time(), 3), "o": outcome, "k": key, "r": reason, "c": round(compile_s, 4),
                             "s": round(saved_s, 4)}
    if tier is not None:
        event["f"] = tier  # a hit whose entry was fetched from a bundle / package / remote during this load
    line = json.dumps(event, separators=(",", ":"))
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
    if st.st_size > _COMPACT_AT:
        compact(path)


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
    #: hits whose entry came from a tier during the load, per tier kind ("bundle", "package", "remote")
    tier_hits: dict[str, int] = field(default_factory=dict)
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
            "tier_hits": dict(sorted(self.tier_hits.items())),
            "since": self.since,
        }


    def add(self, other: Stats) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.fallbacks += other.fallbacks
        self.bypasses += other.bypasses
        self.compile_seconds += other.compile_seconds
        self.saved_seconds += other.saved_seconds
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        for k, v in other.per_key_hits.items():
            self.per_key_hits[k] = self.per_key_hits.get(k, 0) + v
        for k, v in other.tier_hits.items():
            self.tier_hits[k] = self.tier_hits.get(k, 0) + v
        if other.since is not None and (self.since is None or other.since < self.since):
            self.since = other.since

    def to_json(self) -> dict[str, Any]:
        return dict(self.as_dict(), per_key_hits=self.per_key_hits)

    @classmethod
    def from_json(cls, data: Any) -> Stats:
        """Counters from a summary file; anything malformed counts as nothing, never as an error."""
        out = cls()
        if not isinstance(data, dict):
            return out
        for name in ("hits", "misses", "fallbacks", "bypasses"):
            if isinstance(data.get(name), int) and data[name] >= 0:
                setattr(out, name, data[name])
        for name in ("compile_seconds", "saved_seconds"):
            if isinstance(data.get(name), (int, float)):
                setattr(out, name, float(data[name]))
        if isinstance(data.get("since"), (int, float)):
            out.since = float(data["since"])
        for name in ("reasons", "per_key_hits", "tier_hits"):
            table = data.get(name)
            if isinstance(table, dict):
                getattr(out, name).update({k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, int)})
        return out


def _summary_path(path: Path) -> Path:
    return path.with_name("events.summary.json")


def _read_summary(path: Path) -> Stats:
    from ._fs import open_regular

    try:
        with os.fdopen(open_regular(_summary_path(path)), "rb") as f:
            raw = f.read(_MAX_SUMMARY + 1)
    except OSError:
        return Stats()
    if len(raw) > _MAX_SUMMARY:
        return Stats()
    try:
        return Stats.from_json(json.loads(raw))
    except ValueError:
        return Stats()


_MAX_SUMMARY = 8 << 20


def _folding(path: Path) -> list[Path]:
    """Logs being compacted now, or left by a compactor that died before folding them in."""
    try:
        return sorted(path.parent / n for n in os.listdir(path.parent) if n.startswith("events.") and n.endswith(".folding"))
    except OSError:
        return []


def compact(path: Path) -> bool:
    """Fold the log into the summary file. One compactor at a time; returns whether it ran."""
    from . import _fs
    from ._locking import release, try_lock

    handle = try_lock(path.parent / "locks" / "events.lock")
    if handle is None:
        return False
    try:
        import secrets

        moving = path.with_name(f"events.{secrets.token_hex(4)}.folding")
        try:
            os.rename(path, moving)
        except OSError:
            return False
        time.sleep(_SETTLE)
        total = _read_summary(path)
        pending = _folding(path)
        for log in pending:
            total.add(_summarize_log(log))
        _fs.atomic_write(_summary_path(path), json.dumps(total.to_json(), separators=(",", ":")).encode())
        for log in pending:
            try:
                os.unlink(log)
            except OSError:
                pass
        return True
    except OSError:
        return False
    finally:
        release(handle)


def summarize(path: Path) -> Stats:
    """Every load ever counted in this cache: the summary file plus the log (and any log mid-fold)."""
    stats = _read_summary(path)
    for log in [*_folding(path), path]:
        stats.add(_summarize_log(log))
    return stats


def _summarize_log(path: Path) -> Stats:
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
                if isinstance(ev.get("f"), str):
                    stats.tier_hits[ev["f"]] = stats.tier_hits.get(ev["f"], 0) + 1
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
    for p in [path, _summary_path(path), *_folding(path)]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
