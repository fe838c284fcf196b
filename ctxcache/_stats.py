"""The read side of the stats: the counters are sums over the lines ``_events`` appends.

The log is folded into ``events.summary.json`` in two phases, so that nothing on the load path waits:

1. ``_events.record`` (the load path) renames a log that grew past :data:`_COMPACT_AT` to
   ``events.<ns>.<rand>.folding``: one rename, no read, no sleep. An appender that opened the old name
   just before writes into the renamed file, which is still counted (summaries read folding files).
2. :func:`compact` (housekeeping: after a publish, ``stats()``, the CLI) folds the folding files that
   were renamed at least :data:`_SETTLE` seconds ago (every appender of them is long done) into the
   summary. The summary names the files it has folded, so a compactor killed between writing the
   summary and deleting them does not count them twice.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _events, _fs

# A line longer than this is damage, not an event (and must not cost memory to skip).
_MAX_LINE = 4096
# A folding file is folded once it was renamed this long ago: appenders hold the log for microseconds.
_SETTLE = 2.0
_MAX_SUMMARY = 8 << 20


@dataclass(frozen=True)
class Stats:
    """Counters over every load recorded in a cache (all processes). ``warm_*`` count ``ctxcache warm``
    and :meth:`ContextCache.warm` loads apart from the application's."""

    hits: int = 0
    misses: int = 0
    fallbacks: int = 0
    bypasses: int = 0
    #: loads served on the meanwhile providers while the context compiled in the background
    pendings: int = 0
    compile_seconds: float = 0.0
    saved_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    per_key_hits: dict[str, int] = field(default_factory=dict)
    #: hits whose entry came from a tier during the load, per tier kind ("bundle", "package", "remote")
    tier_hits: dict[str, int] = field(default_factory=dict)
    warm_compiles: int = 0
    warm_loads: int = 0
    since: float | None = None
    #: warm-up loads that hit (rare: `warm` checks for an intact entry without a load, so "already cached" is no load)
    warm_hits: int = 0
    #: warm-up loads that fell back / were bypassed (so that the application's own counts add up)
    warm_fallbacks: int = 0
    warm_bypasses: int = 0

    @property
    def loads(self) -> int:
        return self.hits + self.misses + self.fallbacks + self.bypasses + self.pendings

    @property
    def app_loads(self) -> int:
        return self.loads - self.warm_loads

    @property
    def app_hits(self) -> int:
        return self.hits - self.warm_hits

    @property
    def app_misses(self) -> int:
        """Compiles an application's load waited for (a warm-up's compiles are ``warm_compiles``)."""
        return self.misses - self.warm_compiles

    @property
    def app_fallbacks(self) -> int:
        return self.fallbacks - self.warm_fallbacks

    @property
    def app_bypasses(self) -> int:
        return self.bypasses - self.warm_bypasses

    def as_dict(self) -> dict[str, Any]:
        return {
            "loads": self.loads,
            "app_loads": self.app_loads,
            "hits": self.hits,
            "misses": self.misses,
            "fallbacks": self.fallbacks,
            "bypasses": self.bypasses,
            "pendings": self.pendings,
            "app_hits": self.app_hits,
            "app_misses": self.app_misses,
            "warm_loads": self.warm_loads,
            "warm_compiles": self.warm_compiles,
            "warm_hits": self.warm_hits,
            "warm_fallbacks": self.warm_fallbacks,
            "warm_bypasses": self.warm_bypasses,
            "app_fallbacks": self.app_fallbacks,
            "app_bypasses": self.app_bypasses,
            "compile_seconds": round(self.compile_seconds, 3),
            "saved_seconds": round(self.saved_seconds, 3),
            "reasons": dict(sorted(self.reasons.items())),
            "tier_hits": dict(sorted(self.tier_hits.items())),
            "since": self.since,
        }


_COUNTS = ("hits", "misses", "fallbacks", "bypasses", "pendings", "warm_compiles", "warm_loads", "warm_hits",
           "warm_fallbacks", "warm_bypasses")
_SECONDS = ("compile_seconds", "saved_seconds")
_TABLES = ("reasons", "per_key_hits", "tier_hits")
_OUTCOME_FIELD = {"hit": "hits", "miss": "misses", "fallback": "fallbacks", "bypass": "bypasses", "pending": "pendings"}


class _Tally:
    """Mutable sums while reading; frozen into :class:`Stats` at the end."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.seconds = dict.fromkeys(_SECONDS, 0.0)
        self.tables: dict[str, dict[str, int]] = {t: {} for t in _TABLES}
        self.since: float | None = None
        self.folded: list[str] = []

    def bump(self, table: str, key: str, n: int = 1) -> None:
        t = self.tables[table]
        t[key] = t.get(key, 0) + n

    def add_json(self, data: Any) -> None:
        """Counters from a summary file; anything malformed counts as nothing, never as an error."""
        if not isinstance(data, dict):
            return
        for name in _COUNTS:
            v = data.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                self.counts[name] += v
        for name in _SECONDS:
            v = data.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.seconds[name] += float(v)
        for name in _TABLES:
            table = data.get(name)
            if isinstance(table, dict):
                for k, v in table.items():
                    if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool):
                        self.bump(name, k, v)
        since = data.get("since")
        if isinstance(since, (int, float)) and not isinstance(since, bool):
            self.since = float(since) if self.since is None else min(self.since, float(since))
        folded = data.get("folded")
        if isinstance(folded, list):
            self.folded += [n for n in folded if isinstance(n, str)]

    def add_line(self, raw: bytes) -> None:
        if len(raw) > _MAX_LINE:
            return
        try:
            ev = json.loads(raw)
            field_name = _OUTCOME_FIELD[ev["o"]]
        except (ValueError, KeyError, TypeError):
            return  # a torn or foreign line: skip it, never fail a stats read
        t = ev.get("t")
        if self.since is None and isinstance(t, (int, float)):
            self.since = float(t)
        self.counts[field_name] += 1
        if ev.get("w"):
            self.counts["warm_loads"] += 1
            if field_name == "misses":
                self.counts["warm_compiles"] += 1
            elif field_name == "hits":
                self.counts["warm_hits"] += 1
            elif field_name in ("fallbacks", "bypasses"):
                self.counts["warm_" + field_name] += 1
        if field_name == "hits":
            if isinstance(ev.get("k"), str):
                self.bump("per_key_hits", ev["k"])
            if isinstance(ev.get("f"), str):
                self.bump("tier_hits", ev["f"])
        if isinstance(ev.get("r"), str):
            self.bump("reasons", ev["r"])
        for short, name in (("c", "compile_seconds"), ("s", "saved_seconds")):
            v = ev.get(short)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.seconds[name] += v

    def add_log(self, path: Path) -> None:
        try:
            fd = _fs.open_regular(path)  # not a link out of the cache, not a FIFO that blocks
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            for raw in f:
                self.add_line(raw)

    def freeze(self) -> Stats:
        c, s, t = self.counts, self.seconds, self.tables
        return Stats(c["hits"], c["misses"], c["fallbacks"], c["bypasses"], c["pendings"], s["compile_seconds"],
                     s["saved_seconds"],
                     dict(t["reasons"]), dict(t["per_key_hits"]), dict(t["tier_hits"]), c["warm_compiles"],
                     c["warm_loads"], self.since, c["warm_hits"], c["warm_fallbacks"], c["warm_bypasses"])

    def to_json(self, folded: list[str]) -> dict[str, Any]:
        return {**self.counts, **self.seconds, **self.tables, "since": self.since, "folded": folded}


def _summary_path(path: Path) -> Path:
    return path.with_name("events.summary.json")


def _read_summary(path: Path) -> _Tally:
    tally = _Tally()
    try:
        raw = _fs.read_small(_summary_path(path), _MAX_SUMMARY)
    except OSError:
        return tally
    if len(raw) > _MAX_SUMMARY:
        return tally
    try:
        tally.add_json(json.loads(raw))
    except (ValueError, RecursionError):
        pass
    return tally


def _folding(path: Path) -> list[str]:
    """Logs renamed for folding (``events.<ns>.<rand>.folding``; older ones ``events.<rand>.folding``)."""
    return sorted(n for n in _fs.names(path.parent) if n.startswith("events.") and n.endswith(".folding"))


def _settled(folder: Path, name: str, now: float) -> bool:
    parts = name.split(".")
    if len(parts) == 4 and parts[1].isdigit():
        return now - int(parts[1]) / 1e9 > _SETTLE
    try:  # a leftover of an older ctxcache, or an odd name: judge by its mtime
        return now - os.lstat(folder / name).st_mtime > _SETTLE
    except OSError:
        return False


def compact(path: Path, *, now: float | None = None) -> bool:
    """Fold settled logs into the summary (housekeeping, never the load path); returns whether it ran."""
    from ._locking import release, try_lock

    try:
        _fs.check_folder(path.parent / "locks")  # filelock creates its file through whatever the folder is
        _fs.check_folder(path.parent)
    except OSError:
        return False
    handle = try_lock(path.parent / "locks" / "events.lock")
    if handle is None:
        return False
    try:
        now = time.time() if now is None else now
        if _fs.exists(path):
            try:
                if os.lstat(path).st_size > _events._COMPACT_AT:
                    _events.rotate(path)
            except OSError:
                pass
        total = _read_summary(path)
        already = set(total.folded)
        present = _folding(path)
        todo = [n for n in present if n not in already and _settled(path.parent, n, now)]
        # Folded before but still there (its deletion was refused, or the compactor died): delete it now.
        leftover = [n for n in present if n in already]
        if not todo and not leftover and not (already - set(present)):
            return True
        for name in todo:
            total.add_log(path.parent / name)
        folded = [n for n in present if n in already or n in todo]
        _fs.atomic_write(_summary_path(path), json.dumps(total.to_json(folded), separators=(",", ":")).encode())
        gone = [n for n in folded if _fs.remove_file(path.parent / n)]
        if gone:
            left = [n for n in folded if n not in gone]
            _fs.atomic_write(_summary_path(path), json.dumps(total.to_json(left), separators=(",", ":")).encode())
        return True
    except OSError:
        return False
    finally:
        release(handle)


def summarize(path: Path) -> Stats:
    """Every load ever counted in this cache: the summary plus the logs not folded into it yet."""
    tally = _read_summary(path)
    folded = set(tally.folded)
    for name in _folding(path):
        if name not in folded:
            tally.add_log(path.parent / name)
    tally.add_log(path)
    return tally.freeze()


def reset(path: Path) -> None:
    for p in [path, _summary_path(path), *(path.parent / n for n in _folding(path))]:
        _fs.remove_file(p)
