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
from conftest import QNN, layout

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
    assert set(report.removed) == {i.key for i in report.items} and report.freed == sizes[a] + sizes[other]
    assert [e.path for e in cache.entries()] == [b]


def test_prune_without_limits_takes_only_what_cannot_load_here(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, b, other = three_entries
    assert cache.prune(other_environments=False).items == ()
    report = cache.prune()
    assert [(i.key, i.why) for i in report.items] == [(other.name, "other_environment")]
    assert sorted(e.path for e in cache.entries()) == sorted([a, b])


def test_prune_older_than(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, _b, _other = three_entries
    report = cache.prune(older_than=200, other_environments=False)
    assert [(i.key, i.why) for i in report.items] == [(a.name, "older_than")]


def test_prune_skips_an_entry_whose_key_lock_is_held(three_entries: tuple[ContextCache, Path, Path, Path]) -> None:
    cache, a, b, other = three_entries
    lock = filelock.FileLock(str(layout(cache).lock_path(a.name)), is_singleton=False)
    with lock:  # another process compiling this key right now
        report = cache.prune(max_size=0)
    assert {i.key: i.key in report.removed for i in report.items} == {other.name: True, a.name: False, b.name: True}
    assert [i.key for i in report.failed] == [a.name]
    assert a.is_dir()


def test_prune_executes_the_plan_that_was_shown(three_entries: tuple[ContextCache, Path, Path, Path],
                                               external_model: Path, qnn_providers: list[Any]) -> None:
    """The plan the user confirmed is the one executed: an entry that appears (or is rebuilt) between the
    plan and its execution is not removed on the strength of a plan it was never part of."""
    cache, a, b, other = three_entries
    plan = cache.plan_prune(max_size=0)
    planned = {i.key for i in plan.items}
    assert planned == {a.name, b.name, other.name}
    # Meanwhile: a new entry is compiled, and `a` is rebuilt under the same key (another entry_id).
    new = cache.load(external_model, providers=qnn_providers)
    assert new.outcome == "miss" and new.key not in planned
    manifest = json.loads((a / "manifest.json").read_text())
    manifest["entry_id"] = "rebuilt0" * 2
    (a / "manifest.json").write_text(json.dumps(manifest))
    report = plan.execute()
    assert set(report.removed) == {b.name, other.name}
    assert [i.key for i in report.failed] == [a.name]
    assert a.is_dir() and layout(cache).entry_path(new.key).is_dir()


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


def test_verify_reports_a_crash_marker_without_consuming_it(cache_dir: Path, conv_model: Path, qnn_providers: list[Any],
                                                            killer_context: tuple[Path, Path]) -> None:
    """A dead loader's marker on an entry whose context kills its loader (a probe load dies too)."""
    from test_reliability_support import plant_killer

    cache = ContextCache(cache_dir)
    entry = _entry_of(cache, conv_model, qnn_providers)
    plant_killer(entry, killer_context)
    marker = layout(cache).markers_dir / f"{entry.name}.999999999.abcdef"  # a pid that cannot be alive
    marker.write_bytes(b"")
    res = cache.verify_entries()
    assert [r.problem.code if r.problem else None for r in res] == ["crashed_during_load"]
    assert marker.exists() and entry.is_dir()
    res = cache.verify_entries(fix=True)
    assert res[0].quarantined and not entry.exists() and not marker.exists()
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"


def test_verify_probes_a_dead_loaders_context_and_keeps_one_that_loads(cache_dir: Path, conv_model: Path,
                                                                      qnn_providers: list[Any]) -> None:
    """A dead loader's marker on a healthy context (an external kill): verify probes, reports it intact,
    and leaves the marker to the next load (which probes and counts the death) rather than consuming it."""
    cache = ContextCache(cache_dir)
    entry = _entry_of(cache, conv_model, qnn_providers)
    marker = layout(cache).markers_dir / f"{entry.name}.999999999.abcdef"
    marker.write_bytes(b"")
    assert [r.problem for r in cache.verify_entries(fix=True)] == [None]
    assert marker.exists() and entry.is_dir()


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


def test_verify_sees_a_crashed_loader_whose_pid_was_reused(cache_dir: Path, conv_model: Path, qnn_providers: list[Any],
                                                           killer_context: tuple[Path, Path]) -> None:
    # A flock-style marker whose pid is alive now (ours: a container app is pid 1 at every start) but
    # whose lock nobody holds was left by a loader that died; verify must report it as the loader would.
    from test_reliability_support import plant_killer

    cache = ContextCache(cache_dir)
    r = cache.load(conv_model, providers=qnn_providers)
    key = r.key
    assert r.entry_path is not None
    plant_killer(r.entry_path, killer_context)
    marker = layout(cache).markers_dir / f"{key}.{os.getpid()}.abc123"
    marker.write_bytes(b"flock\n")
    [res] = cache.verify_entries()
    assert res.problem is not None and res.problem.code == "crashed_during_load"
    assert marker.exists()  # reported, not consumed


# -- rules that once had two copies (and drifted): now one owner each ---------------------------------
def test_explain_agrees_with_load_on_an_incompatible_context(cache_dir: Path, conv_model: Path, qnn_providers: list[Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """explain once skipped the provider's compatibility check and said "hit" where the load fell back.

    Through the provider seam (``ExecutionProvider.compatibility``): on this x86 host QNN's own check
    cannot answer (it wants an NPU device), so the device's UNSUPPORTED verdict is played by the seam."""
    from ctxcache import providers

    cache = ContextCache(cache_dir)
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"  # (a fresh compile is not asked)
    qnn = providers.get(QNN)
    seen: list[str] = []

    def unsupported(info: str) -> tuple[str, str]:
        seen.append(info)
        return "unsupported", "ONNX Runtime reports EP_UNSUPPORTED"

    monkeypatch.setattr(qnn, "compatibility", unsupported)
    ex = cache.explain(conv_model, providers=qnn_providers)
    assert (ex.verdict, ex.reason.code if ex.reason else None) == ("miss", "incompatible")  # as the load: rebuilt at once
    assert seen and seen[0].startswith("v2:")  # the entry's recorded compatibility string was asked about
    r = cache.load(conv_model, providers=qnn_providers)  # never loaded: out of the way, and rebuilt at once
    assert (r.outcome, r.reason.code if r.reason else None) == ("miss", "incompatible")


def test_warm_does_not_recompile_a_context_known_not_to_load(cache_dir: Path, conv_model: Path,
                                                             qnn_providers: list[Any]) -> None:
    cache = ContextCache(cache_dir)
    fp = cache.key(conv_model, providers=qnn_providers)
    assert fp is not None
    layout(cache).remember_failure(fp.key, "context_unloadable", "its freshly compiled context failed to load")
    res = cache.warm(conv_model, providers=qnn_providers)
    assert (res.status, res.outcome) == ("failed", "bypass") and res.reason and "context_unloadable" in res.reason
    assert not layout(cache).keys() and cache.stats().misses == 0  # nothing compiled
    assert (layout(cache).negative_dir / f"{fp.key}.json").exists()  # still remembered
    # A remembered "compiled no node" is retried: warm is an explicit request.
    layout(cache).remember_failure(fp.key, "not_compilable", "QNN compiled no node (an older SDK)")
    res = cache.warm(conv_model, providers=qnn_providers)
    assert (res.status, res.outcome) == ("compiled", "miss")
    assert cache.warm(conv_model, providers=qnn_providers).status == "cached"
    assert cache.stats().warm_compiles == 1


def test_invalidate_never_takes_a_prefix_that_matches_everything(cache_dir: Path, conv_model: Path, conv_model_b: Path,
                                                                qnn_providers: list[Any]) -> None:
    cache = ContextCache(cache_dir)
    a = cache.load(conv_model, providers=qnn_providers).key
    b = cache.load(conv_model_b, providers=qnn_providers).key
    assert a and b
    for bad in ("", "   ", "a", "xyz!", "0123"[:3]):
        with pytest.raises(ValueError):
            cache.invalidate(key=bad)
    common = os.path.commonprefix([a, b])  # noqa: RUF071 - hex keys: a character prefix is what is meant
    if len(common) >= 4:
        with pytest.raises(ValueError, match="matches 2 entries"):
            cache.invalidate(key=common)
    assert sorted(layout(cache).keys()) == sorted([a, b])  # nothing was touched
    assert cache.invalidate(key=a[:8]) == 1 and layout(cache).keys() == [b]


def test_write_back_runs_after_the_key_lock_is_released(cache_dir: Path, conv_model: Path,
                                                        qnn_providers: list[Any]) -> None:
    """An upload must never hold the key's lock: other launches of the app would wait for the network."""
    import contextlib

    pushed: list[tuple[str, bool]] = []

    class Recorder:  # a writable tier (the Tier protocol plus push), with nothing to offer
        kind, match, write_back = "remote", "exact", True

        def describe(self) -> str:
            return "a recording tier"

        def lookup(self, key: str, parts: Any = ()) -> None:
            return None

        @contextlib.contextmanager
        def offer(self, key: str, parts: Any = (), *, trust: Any = None) -> Any:
            yield None

        def push(self, entry: Any, *, overwrite: bool = False) -> bool:
            lock = filelock.FileLock(str(layout(cache).lock_path(entry.key)), is_singleton=False)
            try:
                lock.acquire(timeout=0)
                free = True
                lock.release()
            except filelock.Timeout:
                free = False
            pushed.append((entry.key, free))
            return True

    cache = ContextCache(cache_dir, tiers=[Recorder()])
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "miss"
    assert pushed == [(r.key, True)]
    assert cache.load(conv_model, providers=qnn_providers).outcome == "hit" and len(pushed) == 1  # never on a hit
