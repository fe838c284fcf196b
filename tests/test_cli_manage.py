"""The library behind the CLI's verify / prune / explain (``ctxcache._manage`` through ``ContextCache``),
on real QNN entries: pruning order, entries being rebuilt, crash markers, read-only explain.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import filelock
import onnxruntime as ort
import pytest
from conftest import QNN

from ctxcache import ContextCache, models
from ctxcache.cli._common import parse_duration, parse_size


def _entry_of(cache: ContextCache, model: Path, providers: list[Any]) -> Path:
    r = cache.load(model, providers=providers)
    assert r.outcome == "miss", r
    assert r.entry_path is not None
    return r.entry_path


def _foreign(entry: Path, **changes: Any) -> Path:
    """A copy of ``entry`` as another environment wrote it (changed key parts, its own key)."""
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["parts"] = [[k, changes.get(k, v)] for k, v in manifest["parts"]]
    manifest["key"] = key = "e" * 31 + str(len(os.listdir(entry.parent)))
    dst = entry.parent / key
    shutil.copytree(entry, dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _age(entry: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(entry / "manifest.json", (t, t))  # the manifest's mtime is the entry's last use


@pytest.fixture
def three_entries(cache_dir: Path, conv_model: Path, conv_model_b: Path, qnn_providers: list[Any]) -> tuple[ContextCache, Path, Path, Path]:
    cache = ContextCache(cache_dir)
    a = _entry_of(cache, conv_model, qnn_providers)
    b = _entry_of(cache, conv_model_b, qnn_providers)
    other = _foreign(a, onnxruntime="1.31.1")
    _age(a, 300)
    _age(b, 100)
    _age(other, 10)  # the most recently used, yet useless here
    return cache, a, b, other


def test_prune_removes_other_environments_first_then_lru(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, b, other = three_entries
    sizes = {e.path: e.size for e in cache.entries()}
    one = sizes[b]
    plan = cache.prune(max_size=one, other_environments=False, dry_run=True)
    assert [(Path(i.key).name, i.why) for i in plan.items] == [(other.name, "over_size"), (a.name, "over_size")]
    assert "onnxruntime 1.31.1 -> " + ort.__version__ in plan.items[0].detail
    assert other.is_dir() and a.is_dir()  # dry run
    report = cache.prune(max_size=one, other_environments=False)
    assert all(i.removed for i in report.items) and report.freed == sizes[a] + sizes[other]
    assert [e.path for e in cache.entries()] == [b]


def test_prune_without_limits_takes_only_what_cannot_load_here(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, b, other = three_entries
    assert cache.prune(other_environments=False).items == []
    report = cache.prune()
    assert [(i.key, i.why) for i in report.items] == [(other.name, "other_environment")]
    assert sorted(e.path for e in cache.entries()) == sorted([a, b])


def test_prune_older_than(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, _b, _other = three_entries
    report = cache.prune(older_than=200, other_environments=False)
    assert [(i.key, i.why) for i in report.items] == [(a.name, "older_than")]


def test_prune_skips_an_entry_whose_key_lock_is_held(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, b, other = three_entries
    lock = filelock.FileLock(str(cache.store.lock_path(a.name)), is_singleton=False)
    with lock:  # another process compiling this key right now
        report = cache.prune(max_size=0)
    assert {i.key: i.removed for i in report.items} == {other.name: True, a.name: False, b.name: True}
    assert a.is_dir()


def test_max_size_on_the_cache_prefers_other_environments(
    cache_dir: Path, conv_model: Path, conv_model_b: Path, external_model: Path, qnn_providers: list[Any]
) -> None:
    cache = ContextCache(cache_dir)
    a = _entry_of(cache, conv_model, qnn_providers)
    other = _foreign(a, ep_versions={"onnxruntime_qnn": "2.6.0", "qnn_sdk": "2.50.0"})
    _age(other, 0)
    capped = ContextCache(cache_dir, max_size=2 * cache.entries()[0].size + 4096)
    b = _entry_of(capped, conv_model_b, qnn_providers)
    keys = {e.path for e in capped.entries()}
    assert keys == {a, b}, "the entry of another EP version should have gone first, not the LRU one"


def test_explain_is_read_only_and_names_the_fault(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ContextCache(cache_dir)
    entry = _entry_of(cache, conv_model, qnn_providers)
    assert cache.explain(conv_model, providers=qnn_providers).verdict == "hit"
    binary = next(entry.glob("*.bin"))
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0x01
    binary.write_bytes(bytes(data))
    before = cache.stats().as_dict()
    ex = cache.explain(conv_model, providers=qnn_providers)
    assert ex.verdict == "fallback" and ex.reason is not None and ex.reason.code == "artifact_digest"
    assert entry.is_dir() and cache.stats().as_dict() == before  # nothing invalidated, nothing counted
    assert cache.explain(conv_model, providers=["CPUExecutionProvider"]).verdict == "bypass"


def test_explain_ranks_same_content_before_same_name(
    cache_dir: Path, conv_model: Path, tmp_path: Path, qnn_options: dict[str, str]
) -> None:
    cache = ContextCache(cache_dir)
    _entry_of(cache, conv_model, [(QNN, qnn_options)])
    edited = models.conv_net(tmp_path / "edited" / conv_model.name, layers=4, channels=16, seed=99)
    _entry_of(cache, edited, [(QNN, {**qnn_options, "soc_model": "69", "htp_arch": "79"})])
    ex = cache.explain(conv_model, providers=[(QNN, {**qnn_options, "soc_model": "69", "htp_arch": "79"})])
    assert ex.verdict == "miss"
    assert [n.same_content for n in ex.nearest] == [True, False]
    assert [str(d) for d in ex.nearest[0].differences] == ["ep_options.htp_arch 73 -> 79", "ep_options.soc_model 60 -> 69"]
    assert [d.part for d in ex.nearest[1].differences] == ["model"]
    assert str(ex.nearest[1].differences[0]).startswith("model content ")


def test_verify_reports_a_crash_marker_without_consuming_it(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ContextCache(cache_dir)
    entry = _entry_of(cache, conv_model, qnn_providers)
    marker = cache.store.markers_dir / f"{entry.name}.999999999.abcdef"  # a pid that cannot be alive
    marker.write_bytes(b"")
    res = cache.verify_entries()
    assert [r.problem.code if r.problem else None for r in res] == ["crashed_during_load"]
    assert marker.exists() and entry.is_dir()
    res = cache.verify_entries(fix=True)
    assert res[0].quarantined and not entry.exists() and not marker.exists()
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"


@pytest.mark.parametrize("text, value", [("500M", 500 << 20), ("1.5G", int(1.5 * (1 << 30))), ("2GiB", 2 << 30),
                                         ("100MB", 100 << 20), ("4096", 4096), ("0", 0)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text, value", [("90s", 90), ("45m", 2700), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)])
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == value


def test_the_library_prints_nothing(three_entries: tuple[ContextCache, Path, Path, Path], conv_model: Path,
                                    qnn_providers: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    cache = three_entries[0]
    capsys.readouterr()
    cache.verify_entries(fix=True)
    cache.explain(conv_model, providers=qnn_providers)
    cache.prune(max_size=0, dry_run=True)
    cache.prune(older_than=0)
    cap = capsys.readouterr()
    assert (cap.out, cap.err) == ("", "")


def test_prune_keeps_entries_that_differ_only_in_library_digests(
    cache_dir: Path, conv_model: Path, qnn_providers: list[Any]
) -> None:
    # The manifest keeps the backend type, not the app's backend_path: an app that side-loads its own
    # QNN SDK has other library digests, and its entries still hit for it. Not ours to delete.
    cache = ContextCache(cache_dir)
    a = _entry_of(cache, conv_model, qnn_providers)
    sideloaded = _foreign(a, ep_libraries={"libQnnHtp.so": "0" * 32})
    qnn_sdk = _foreign(a, ep_versions={"onnxruntime_qnn": "2.7.0", "qnn_sdk": "2.50.0"})
    report = cache.prune(dry_run=True)
    assert [(i.key, i.why) for i in report.items] == [(qnn_sdk.name, "other_environment")]
    assert "ep_versions.qnn_sdk 2.50.0 -> " in report.items[0].detail
    assert sideloaded.is_dir()


def test_verify_sees_a_crashed_loader_whose_pid_was_reused(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    # A flock-style marker whose pid is alive now (ours: a container app is pid 1 at every start) but
    # whose lock nobody holds was left by a loader that died; verify must report it as the loader would.
    cache = ContextCache(cache_dir)
    key = cache.load(conv_model, providers=qnn_providers).key
    marker = cache.store.markers_dir / f"{key}.{os.getpid()}.abc123"
    marker.write_bytes(b"flock\n")
    [res] = cache.verify_entries()
    assert res.problem is not None and res.problem.code == "crashed_during_load"
    assert marker.exists()  # reported, not consumed
