"""The promise on the paths 0.2 added (docs/reliability.md, guarantees 20-24): revocation that reaches
installed entries, rebuilds that never take a working entry out of service, one worker per key, the
background worker honouring the whole configuration, damaged bytes that never reach the provider.

Real files, real processes, the real QNN provider; the only seam is the provider's compatibility verdict
(QNN cannot answer on an x86 host without an NPU).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _child import dead_pid
from conftest import QNN, Layout, first_outputs, jit_outputs, run_python

import ctxcache
from ctxcache import export_bundle


# -- revocation reaches installed entries ---------------------------------------------------------------------
def test_revoking_a_key_stops_serving_what_it_brought_in(tmp_path: Path, conv_model: Path, qnn_providers: list[Any],
                                                         keys: dict[str, Any]) -> None:
    build = ctxcache.ContextCache(tmp_path / "build")
    assert build.load(conv_model, providers=qnn_providers).outcome == "miss"
    bundle = export_bundle(build, tmp_path / "bundle.tar", signing_key=[keys["a"].path])
    device = tmp_path / "device"
    trusted = [keys["a"].public_key]
    first = ctxcache.ContextCache(device, tiers=[bundle.path], trusted_keys=trusted).load(conv_model, providers=qnn_providers)
    assert (first.outcome, first.tier) == ("hit", "bundle")
    assert ctxcache.ContextCache(device, tiers=[bundle.path], trusted_keys=trusted).load(
        conv_model, providers=qnn_providers).outcome == "hit"

    # The key leaked: revoked. The entry it already put here is not served again, nor called intact.
    revoked = ctxcache.ContextCache(device, trusted_keys=trusted, revoked_keys=[keys["a"].key_id])
    report = {r.key: r for r in revoked.verify_entries()}
    assert report[first.key].problem is not None and report[first.key].problem.code == "signer_revoked"  # type: ignore[index]
    ex = revoked.explain(conv_model, providers=qnn_providers)
    r = revoked.load(conv_model, providers=qnn_providers)
    assert ex.verdict == r.outcome == "fallback" and r.reason is not None and r.reason.code == "signer_revoked", r
    assert keys["a"].key_id in r.reason.message
    assert first_outputs(r) == pytest.approx(jit_outputs(conv_model), abs=1e-3)  # the original model, correct
    # Quarantined: the next launch compiles its own (and trusts it: it has no tier origin).
    again = revoked.load(conv_model, providers=qnn_providers)
    assert again.outcome == "miss" and again.tier is None


def test_a_key_removed_from_the_trusted_list_is_no_longer_trusted_for_its_entries(
        tmp_path: Path, conv_model: Path, qnn_providers: list[Any], keys: dict[str, Any]) -> None:
    build = ctxcache.ContextCache(tmp_path / "build")
    build.load(conv_model, providers=qnn_providers)
    bundle = export_bundle(build, tmp_path / "bundle.tar", signing_key=[keys["a"].path])
    device = tmp_path / "device"
    first = ctxcache.ContextCache(device, tiers=[bundle.path], trusted_keys=[keys["a"].public_key]).load(
        conv_model, providers=qnn_providers)
    assert first.tier == "bundle"
    # Rotated to key b: a's entries must go through b's trust again.
    rotated = ctxcache.ContextCache(device, trusted_keys=[keys["b"].public_key])
    fixed = rotated.verify_entries(fix=True)
    assert [(v.problem.code if v.problem else None, v.quarantined) for v in fixed] == [("signer_revoked", True)]
    assert rotated.load(conv_model, providers=qnn_providers).outcome == "miss"


def test_an_unsigned_bundle_entry_stops_serving_when_its_folder_is_no_longer_the_apps(
        tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    build = ctxcache.ContextCache(tmp_path / "build")
    build.load(conv_model, providers=qnn_providers)
    bundle = export_bundle(build, tmp_path / "app" / "bundle")
    device = tmp_path / "device"
    own = ctxcache.ContextCache(device, tiers=[bundle.path], trusted_dirs=[tmp_path / "app"])
    assert own.load(conv_model, providers=qnn_providers).tier == "bundle"
    assert own.load(conv_model, providers=qnn_providers).outcome == "hit"
    # A process that names no trust policy at all keeps what was installed (there is nothing to ask again)...
    assert ctxcache.ContextCache(device).load(conv_model, providers=qnn_providers).outcome == "hit"
    # ...but once the app's own folder is another one, the old folder's unsigned entries are no longer the app's.
    moved = ctxcache.ContextCache(device, trusted_dirs=[tmp_path / "app-v2"])
    r = moved.load(conv_model, providers=qnn_providers)
    assert r.outcome == "fallback" and r.reason is not None and r.reason.code == "signer_revoked"


# -- rebuilds never take a working entry out of service -------------------------------------------------------
@pytest.fixture
def prefer_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxcache import providers

    monkeypatch.setattr(providers.get(QNN), "compatibility",
                        lambda info: ("prefer_recompilation", "EP_SUPPORTED_PREFER_RECOMPILATION (played)"))


def test_a_failed_rebuild_keeps_the_entry_serving_and_is_remembered_with_backoff(
        tmp_path: Path, conv_model: Path, qnn_providers: list[Any], prefer_rebuild: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxcache._compile import CompileFailed
    from ctxcache._seams import hooks

    cache = ctxcache.ContextCache(tmp_path / "c")
    hooks_compile = hooks.compile
    assert cache.load(conv_model, providers=qnn_providers).outcome in ("miss", "hit")

    def failing(*a: Any, **k: Any) -> float:
        raise CompileFailed("the compiler crashed (injected)")

    monkeypatch.setattr(hooks, "compile", failing)
    said = cache.rebuild(conv_model, providers=qnn_providers)
    assert "failed" in said and "keeps serving" in said
    monkeypatch.setattr(hooks, "compile", hooks_compile)
    # The intact entry still serves, nothing is remembered against the key, and no rebuild starts now.
    r = cache.load(conv_model, providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("hit", "prefer_recompilation"), r
    assert "not rebuilt now" in r.reason.message and "failed 1 time" in r.reason.message  # type: ignore[union-attr]
    assert not (Layout(cache).locks_dir / f"{r.key}.bg").exists()
    assert not (Layout(cache).negative_dir / f"{r.key}.json").exists()
    ex = cache.explain(conv_model, providers=qnn_providers)
    assert ex.verdict == "hit" and ex.reason is not None and "failed 1 time" in ex.reason.message


def test_a_rebuilt_context_that_does_not_load_is_remembered_not_retried_every_launch(
        tmp_path: Path, conv_model: Path, qnn_providers: list[Any], prefer_rebuild: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxcache._seams import hooks

    cache = ctxcache.ContextCache(tmp_path / "c")
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"
    real = hooks.compile

    def garbage(staging: Path, *a: Any, **k: Any) -> float:
        seconds = real(staging, *a, **k)
        for p in staging.iterdir():
            if p.suffix == ".bin":
                p.write_bytes(os.urandom(p.stat().st_size))  # a context the provider refuses
        return seconds

    monkeypatch.setattr(hooks, "compile", garbage)
    said = cache.rebuild(conv_model, providers=qnn_providers)
    assert "failed" in said, said
    monkeypatch.setattr(hooks, "compile", real)
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "hit" and "not rebuilt now" in (r.reason.message if r.reason else "")
    assert first_outputs(r) == pytest.approx(jit_outputs(conv_model), abs=1e-3)


def test_a_successful_rebuild_replaces_the_entry_once(tmp_path: Path, conv_model: Path, qnn_providers: list[Any],
                                                      prefer_rebuild: None) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    first = cache.load(conv_model, providers=qnn_providers)
    assert cache.rebuild(conv_model, providers=qnn_providers) == "rebuilt"
    assert "once already" in cache.rebuild(conv_model, providers=qnn_providers)
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "hit" and r.entry_path is not None and first.entry_path == r.entry_path
    manifest = json.loads((r.entry_path / "manifest.json").read_text())
    assert manifest.get("rebuilt_for")


# -- one worker per key -------------------------------------------------------------------------------------
def _workers(root: Path, key: str) -> int:
    """How many background workers were started for ``key``: each start writes its guard's attempt count."""
    guard = Layout(root).locks_dir / f"{key}.bg"
    return int(json.loads(guard.read_text())["attempts"]) if guard.exists() else 0


def test_sixteen_threads_start_one_worker(tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    root = tmp_path / "c"
    cache = ctxcache.ContextCache(root, on_miss="background")
    fp = cache.key(conv_model, providers=qnn_providers)
    assert fp is not None
    started: list[str] = []
    barrier = threading.Barrier(16)

    def launch() -> None:
        barrier.wait()
        r = ctxcache.ContextCache(root, on_miss="background").load(conv_model, providers=qnn_providers)
        started.append(r.reason.message if r.reason else r.outcome)

    threads = [threading.Thread(target=launch) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum("separate process" in s for s in started) == 1, started
    assert ctxcache.ContextCache(root).wait(fp.key, timeout=180)


def test_twenty_four_processes_start_one_worker(tmp_path: Path, conv_model: Path) -> None:
    root = tmp_path / "c"
    code = f"""
import json, sys, time
import ctxcache
from ctxcache import models
t = float(sys.argv[1])
while time.time() < t:
    time.sleep(0.001)
r = ctxcache.ContextCache({str(root)!r}, on_miss="background").load({str(conv_model)!r},
    providers=[("QNNExecutionProvider", models.qnn_htp_options())])
from _report import report
report({{"outcome": r.outcome, "why": r.reason.message if r.reason else ""}})
"""
    import subprocess

    from _child import Child

    start = time.time() + 4.0
    procs = [Child.python(code, str(start), stderr=subprocess.DEVNULL) for _ in range(24)]
    outs = [p.finish(timeout=300).result for p in procs]
    started = [o for o in outs if "separate process" in o["why"]]
    assert len(started) <= 1 and all(o["outcome"] in ("pending", "hit") for o in outs), outs
    fp = ctxcache.ContextCache(root).key(conv_model, providers=[(QNN, ctxcache.models.qnn_htp_options())])
    assert fp is not None and ctxcache.ContextCache(root).wait(fp.key, timeout=180)


# -- the background worker honours the whole configuration --------------------------------------------------
def _launches(root: Path | str, models: list[Path], mode: str, **settings: Any) -> list[str]:
    cache = ctxcache.ContextCache(root, on_miss=mode, **settings)  # type: ignore[arg-type]
    outcomes = []
    for m in models:
        r = cache.load(m, providers=[(QNN, ctxcache.models.qnn_htp_options())])
        outcomes.append(r.outcome)
        if r.outcome == "pending":
            assert r.ready(timeout=180)
            guard = Layout(cache).locks_dir / f"{r.key}.bg"
            deadline = time.monotonic() + 60
            while guard.exists() and time.monotonic() < deadline:  # the worker's last act: prune done
                time.sleep(0.05)
    return outcomes


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_background_and_foreground_give_the_same_cache_under_max_size(
        tmp_path: Path, rel_models: list[Path], relative: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    one = ctxcache.ContextCache(tmp_path / "probe")
    one.load(rel_models[0], providers=[(QNN, ctxcache.models.qnn_htp_options())])
    cap = int(one.size() * 2.5)  # room for two entries of these same-size models, not three
    monkeypatch.chdir(tmp_path)
    results = {}
    for mode in ("compile", "background"):
        root: Path | str = f"{mode}-cache" if relative else tmp_path / f"{mode}-cache"
        _launches(root, rel_models, mode, max_size=cap)
        cache = ctxcache.ContextCache(root)
        assert cache.root == tmp_path / f"{mode}-cache"  # absolute once: a worker in another folder agrees
        results[mode] = (sorted(e.key for e in cache.entries()), cache.size())
        assert results[mode][1] <= cap
        assert not (tmp_path / f"{mode}-cache" / f"{mode}-cache").exists()
    assert results["compile"][0] == results["background"][0]
    # and the next launches hit in both
    assert _launches("background-cache" if relative else tmp_path / "background-cache", rel_models[1:], "background") == ["hit", "hit"]


@pytest.mark.parametrize("setting", ["extra_key", "negative_ttl", "verify", "embed"])
def test_the_worker_makes_the_apps_key_for_every_setting(tmp_path: Path, conv_model: Path, setting: str) -> None:
    value = {"extra_key": "app-v2", "negative_ttl": 5.0, "verify": "stat", "embed": True}[setting]
    outs = {mode: _launches(tmp_path / mode, [conv_model, conv_model], mode, **{setting: value})
            for mode in ("compile", "background")}
    assert outs == {"compile": ["miss", "hit"], "background": ["pending", "hit"]}, outs
    keys = {mode: [e.key for e in ctxcache.ContextCache(tmp_path / mode).entries()] for mode in outs}
    assert keys["compile"] == keys["background"] and len(keys["compile"]) == 1


def test_a_worker_that_computes_another_key_refuses_and_the_app_compiles_in_the_foreground(
        tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    from ctxcache import _background

    root = tmp_path / "c"
    cache = ctxcache.ContextCache(root, on_miss="background")
    fp = cache.key(conv_model, providers=qnn_providers)
    assert fp is not None
    job = {"config": cache.config.to_json(), "model": str(conv_model), "providers": [[QNN, ctxcache.models.qnn_htp_options()]],
           "graph_optimization": "ORT_ENABLE_ALL", "session_config": {}, "key": "0" * 32, "mode": "compile"}
    Layout(root).ensure()
    state, _ = _background.start(cache._store, "0" * 32, job, give_up=lambda why: None)
    assert state == "started"
    deadline = time.monotonic() + 60
    while not (Layout(root).negative_dir / f"{'0' * 32}.background.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "computes key" in json.loads((Layout(root).negative_dir / f"{'0' * 32}.background.json").read_text())["message"]
    assert not Layout(root).keys()  # it published nothing


# -- damaged bytes never reach the provider -------------------------------------------------------------------
def test_a_damaged_context_never_reaches_the_provider(tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    from ctxcache._seams import hooks

    cache = ctxcache.ContextCache(tmp_path / "c")
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.entry_path is not None
    binary = next(p for p in r.entry_path.iterdir() if p.suffix == ".bin")
    raw = bytearray(binary.read_bytes())
    for off in range(256, len(raw) - 4, 256):
        raw[off:off + 4] = b"\xff\xff\xff\x7f"  # length fields set to 0x7fffffff: what crashed QNN
    binary.write_bytes(bytes(raw))
    loaded: list[str] = []
    real = hooks.verified
    hooks.verified = lambda entry: loaded.append(entry.key)
    try:
        t = time.monotonic()
        bad = cache.load(conv_model, providers=qnn_providers)
    finally:
        hooks.verified = real
    assert bad.outcome == "fallback" and bad.reason is not None and bad.reason.code == "artifact_digest"
    assert loaded == []  # no session was ever created on those bytes
    assert time.monotonic() - t < 30
    assert first_outputs(bad) == pytest.approx(jit_outputs(conv_model), abs=1e-3)


def test_a_crash_on_damaged_bytes_is_damage_not_a_crash(tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    """A loader died while loading an entry whose bytes no longer match (verify="concurrent" let them reach
    the provider): quarantined as damage; it does not count toward turning the cache off."""
    cache = ctxcache.ContextCache(tmp_path / "c")
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.key is not None and r.entry_path is not None
    binary = next(p for p in r.entry_path.iterdir() if p.suffix == ".bin")
    raw = bytearray(binary.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    binary.write_bytes(bytes(raw))
    # The marker a loader killed during the context load leaves (a pid that exited and was reaped).
    (Layout(cache).markers_dir / f"{r.key}.{dead_pid()}.abcdef").write_text("")
    bad = cache.load(conv_model, providers=qnn_providers)
    assert bad.outcome == "fallback" and bad.reason is not None and bad.reason.code == "artifact_digest"
    assert "a loader died on these bytes" in bad.reason.message
    assert cache._store.crash_count(r.key) == 0
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"


def test_verify_concurrent_still_never_hands_out_damaged_bytes(tmp_path: Path, conv_model: Path,
                                                               qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c", verify="concurrent")
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.entry_path is not None
    binary = next(p for p in r.entry_path.iterdir() if p.suffix == ".bin")
    raw = bytearray(binary.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped byte: QNN loads it and computes wrong outputs
    binary.write_bytes(bytes(raw))
    bad = cache.load(conv_model, providers=qnn_providers)
    assert bad.outcome == "fallback" and bad.reason is not None and bad.reason.code == "artifact_digest"
    assert first_outputs(bad) == pytest.approx(jit_outputs(conv_model), abs=1e-3)


def test_the_launch_process_is_a_plain_hit_in_a_fresh_interpreter(tmp_path: Path, conv_model: Path) -> None:
    code = f"""
import json, ctxcache
from ctxcache import models
c = ctxcache.ContextCache({str(tmp_path / "c")!r})
from _report import report
report([c.load({str(conv_model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())]).outcome
        for _ in range(2)])
"""
    assert run_python(code).result == ["miss", "hit"]
