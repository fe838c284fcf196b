"""Stats counters: exact across concurrent processes, kept when the log is folded into its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from ctxcache import _events, _stats


def _events_dir(tmp_path: Path) -> Path:
    root = tmp_path / "v1"
    (root / "locks").mkdir(parents=True)
    return root / "events.log"


def test_compaction_keeps_every_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _events_dir(tmp_path)
    monkeypatch.setattr(_events, "_COMPACT_AT", 2000)  # a rotation every ~20 lines
    for i in range(300):
        _events.record(log, ["hit", "miss", "fallback", "bypass"][i % 4], f"{i % 3:032x}", "r" if i % 4 > 1 else None, 0.5, 0.25)
    assert log.stat().st_size <= 2200  # rotated, not growing
    # The load path only renames: nothing was folded yet, and every count is still there.
    assert not (log.parent / "events.summary.json").exists()
    assert len(list(log.parent.glob("*.folding"))) >= 10
    assert _stats.summarize(log).loads == 300
    assert _stats.compact(log, now=time.time() + 10)  # housekeeping, once the rotated logs have settled
    assert (log.parent / "events.summary.json").is_file() and not list(log.parent.glob("*.folding"))
    s = _stats.summarize(log)
    assert (s.hits, s.misses, s.fallbacks, s.bypasses) == (75, 75, 75, 75)
    assert s.compile_seconds == pytest.approx(150.0) and s.saved_seconds == pytest.approx(75.0)
    assert s.reasons == {"r": 150}
    assert sum(s.per_key_hits.values()) == 75 and s.since is not None
    _stats.reset(log)
    assert _stats.summarize(log).loads == 0
    assert not (log.parent / "events.summary.json").exists()


def test_a_fresh_rotation_is_not_folded_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An appender may still write into a log renamed a moment ago: it is folded only once settled."""
    log = _events_dir(tmp_path)
    monkeypatch.setattr(_events, "_COMPACT_AT", 200)
    for _ in range(5):
        _events.record(log, "hit", None, None, 0.0, 0.0)
    fresh = list(log.parent.glob("*.folding"))
    assert fresh
    assert _stats.compact(log)
    assert all(p.exists() for p in fresh)  # too fresh to fold
    assert _stats.summarize(log).hits == 5


def test_a_folded_log_that_could_not_be_deleted_is_not_counted_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _events_dir(tmp_path)
    for _ in range(4):
        _events.record(log, "miss", None, None, 1.0, 0.0)
    os.rename(log, log.with_name("events.1000000000000000000.abc123.folding"))
    monkeypatch.setattr(_stats._fs, "remove_file", lambda p: False)  # Windows: held open by a reader
    assert _stats.compact(log)
    monkeypatch.undo()
    assert _stats.summarize(log).misses == 4  # the summary names it as folded
    assert _stats.compact(log)
    assert _stats.summarize(log).misses == 4 and not list(log.parent.glob("*.folding"))


def test_concurrent_writers_and_compactions_lose_nothing(tmp_path: Path) -> None:
    log = _events_dir(tmp_path)
    writers, per_writer = 4, 400
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from ctxcache import _events, _stats
_events._COMPACT_AT = 3000
from pathlib import Path
for i in range({per_writer}):
    _events.record(Path({str(log)!r}), "hit", "{'a' * 32}", None, 0.0, 1.0)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(writers)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    s = _stats.summarize(log)
    assert s.hits == writers * per_writer
    assert s.per_key_hits == {"a" * 32: writers * per_writer}


def test_malformed_summary_counts_as_nothing(tmp_path: Path) -> None:
    log = _events_dir(tmp_path)
    _events.record(log, "hit", None, None, 0.0, 0.0)
    for junk in ["[1, 2]", '{"hits": "many", "reasons": {"x": "y"}}', "{nope"]:
        (log.parent / "events.summary.json").write_text(junk)
        assert _stats.summarize(log).hits == 1


def test_leftover_fold_from_a_dead_compactor_is_counted_once(tmp_path: Path) -> None:
    log = _events_dir(tmp_path)
    for _ in range(3):
        _events.record(log, "miss", None, None, 1.0, 0.0)
    os.rename(log, log.with_name("events.dead0001.folding"))  # the compactor was killed here
    _events.record(log, "hit", None, None, 0.0, 0.0)
    assert (_stats.summarize(log).misses, _stats.summarize(log).hits) == (3, 1)
    assert _stats.compact(log, now=time.time() + 10)
    s = _stats.summarize(log)
    assert (s.misses, s.hits) == (3, 1)
    assert not list(log.parent.glob("*.folding"))
    assert json.loads((log.parent / "events.summary.json").read_text())["misses"] == 3


def test_tier_hits_are_counted_apart(tmp_path: Path) -> None:
    log = _events_dir(tmp_path)
    _events.record(log, "hit", "a" * 32, None, 0.0, 1.0, tier="bundle")
    _events.record(log, "hit", "a" * 32, None, 0.0, 1.0)
    _events.record(log, "hit", "b" * 32, None, 0.0, 1.0, tier="remote")
    assert _stats.compact(log, now=time.time() + 10)
    _events.record(log, "hit", "b" * 32, None, 0.0, 1.0, tier="remote")
    s = _stats.summarize(log)
    assert s.hits == 4 and s.tier_hits == {"bundle": 1, "remote": 2}
    assert s.as_dict()["tier_hits"] == {"bundle": 1, "remote": 2}
