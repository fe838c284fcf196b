"""One decision, many executors: ``explain()``'s verdict is the outcome of the ``load()`` that follows, and
``key()`` is ``None`` exactly when that load bypasses, over every cache state a load can meet.

Each state is made with real files, real processes and the real QNN provider; the only seam is the
provider's compatibility verdict (QNN cannot answer on an x86 host without an NPU).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from _child import Child, dead_pid
from conftest import QNN, Layout, read_only_bind, run_python

import ctxcache
from ctxcache import models


def agree(cache: ctxcache.ContextCache, model: Path, providers: Any, *, sess_options: Any = None,
          expect: str | None = None, code: str | None = None) -> ctxcache.LoadResult:
    """explain, key and load on one state: explain's verdict is the load's outcome; key is None iff bypass."""
    ex = cache.explain(model, providers=providers, sess_options=sess_options)
    fp = cache.key(model, providers=providers, sess_options=sess_options)
    r = cache.load(model, providers=providers, sess_options=sess_options)
    assert ex.verdict == r.outcome, (ex.summary(), r)
    assert (fp is None) == (r.outcome == "bypass"), (fp, r)
    if fp is not None:
        assert fp.key == r.key
    if expect is not None:
        assert r.outcome == expect, r
    if code is not None:
        assert r.reason is not None and r.reason.code == code, r
        assert ex.reason is not None and ex.reason.code == code, ex
    if r.outcome == "pending":
        assert r.ready(timeout=180), "the background compile never finished"
    return r


@pytest.fixture
def qnn(qnn_options: dict[str, str]) -> list[Any]:
    return [(QNN, qnn_options)]


def test_empty_then_warm(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    agree(cache, conv_model, qnn, expect="miss")
    agree(cache, conv_model, qnn, expect="hit")


def test_root_writable_by_others(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    root = tmp_path / "c"
    agree(ctxcache.ContextCache(root), conv_model, qnn, expect="miss")
    os.chmod(root, 0o777)
    agree(ctxcache.ContextCache(root), conv_model, qnn, expect="bypass", code="cache_insecure")


def test_damaged_entry(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    r = agree(cache, conv_model, qnn, expect="miss")
    assert r.entry_path is not None
    binary = next(p for p in r.entry_path.iterdir() if p.suffix == ".bin")
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0x01
    binary.write_bytes(bytes(data))
    agree(cache, conv_model, qnn, expect="fallback", code="artifact_digest")
    agree(cache, conv_model, qnn, expect="miss")  # quarantined: the next launch heals


def test_remembered_compile_failure(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    fp = cache.key(conv_model, providers=qnn)
    assert fp is not None
    Layout(tmp_path / "c").remember_failure(fp.key, "compile_failed", "the compiler failed (planted)")
    agree(cache, conv_model, qnn, expect="bypass", code="not_compilable")


def test_selection_policy_and_non_compiling_provider(tmp_path: Path, conv_model: Path) -> None:
    # A fresh process: once a plugin EP is registered here (other tests register QNN), ORT's policy picks it.
    code = f"""
import json, onnxruntime as ort, ctxcache
so = ort.SessionOptions()
so.set_provider_selection_policy(ort.OrtExecutionProviderDevicePolicy.PREFER_CPU)
cache = ctxcache.ContextCache({str(tmp_path / "c")!r})
m = {str(conv_model)!r}
out = []
for providers, options in ((None, so), (["CPUExecutionProvider"], None)):
    ex = cache.explain(m, providers=providers, sess_options=options)
    fp = cache.key(m, providers=providers, sess_options=options)
    r = cache.load(m, providers=providers, sess_options=options)
    out.append([ex.verdict, ex.reason.code, fp is None, r.outcome, r.reason.code])
from _report import report
report(out)
"""
    out = run_python(code).result
    assert out == [["bypass", "provider_policy", True, "bypass", "provider_policy"],
                   ["bypass", "nothing_to_compile", True, "bypass", "nothing_to_compile"]], out
    assert not (tmp_path / "c").exists()  # decided from the inputs: nothing written


def test_compile_affecting_config_after_import(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    plain = cache.key(conv_model, providers=qnn)
    r = agree(cache, conv_model, qnn, sess_options=so, expect="miss")
    assert plain is not None and r.key != plain.key
    agree(cache, conv_model, qnn, sess_options=so, expect="hit")


def test_compile_affecting_config_before_import(tmp_path: Path, conv_model: Path) -> None:
    """Options configured before ``import ctxcache``: explain, key and load still agree (a fresh process)."""
    code = f"""
import json, onnxruntime as ort
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_quant_qdq", "1")
import ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({str(tmp_path / "c")!r})
p = [("QNNExecutionProvider", models.qnn_htp_options())]
out = []
for _ in range(2):
    ex = cache.explain({str(conv_model)!r}, providers=p, sess_options=so)
    fp = cache.key({str(conv_model)!r}, providers=p, sess_options=so)
    r = cache.load({str(conv_model)!r}, providers=p, sess_options=so)
    out.append([ex.verdict, r.outcome, fp.key if fp else None, r.key])
from _report import report
report(out)
"""
    out = run_python(code).result
    assert [o[:2] for o in out] == [["miss", "miss"], ["hit", "hit"]], out
    assert all(o[2] == o[3] for o in out), out


def test_a_tier_that_would_serve(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    build = ctxcache.ContextCache(tmp_path / "build")
    assert build.load(conv_model, providers=qnn).outcome == "miss"
    bundle = ctxcache.export_bundle(build, tmp_path / "app" / "bundle")
    device = ctxcache.ContextCache(tmp_path / "device", tiers=[bundle.path], trusted_dirs=[tmp_path / "app"])
    ex = device.explain(conv_model, providers=qnn)
    assert ex.served_by is not None and not ex.hit
    r = agree(device, conv_model, qnn, expect="hit")
    assert r.tier == "bundle"
    agree(device, conv_model, qnn, expect="hit")


def test_incompatible_verdict(tmp_path: Path, conv_model: Path, qnn: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from ctxcache import providers

    cache = ctxcache.ContextCache(tmp_path / "c")
    agree(cache, conv_model, qnn, expect="miss")
    monkeypatch.setattr(providers.get(QNN), "compatibility", lambda info: ("unsupported", "EP_UNSUPPORTED (played)"))
    agree(cache, conv_model, qnn, expect="miss", code="incompatible")


def test_background_first_launch_and_a_running_compile(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    root = tmp_path / "c"
    cache = ctxcache.ContextCache(root, on_miss="background")
    fp = cache.key(conv_model, providers=qnn)
    assert fp is not None
    # Another process holds the key's lock and makes progress (a worker compiling it right now).
    Layout(root).ensure()
    holder = Child.python(f"""
        import sys, time
        from pathlib import Path
        from _report import report
        from ctxcache._locking import KeyLock
        lock = KeyLock(Path({str(Layout(root).lock_path(fp.key))!r}))
        lock.acquire(None, "test")
        report("held")
        end = time.monotonic() + 8
        while time.monotonic() < end:
            sum(range(10000))
        """)
    try:
        assert holder.next_report() == "held"
        ex = cache.explain(conv_model, providers=qnn)
        r = cache.load(conv_model, providers=qnn)
        assert ex.verdict == r.outcome == "pending", (ex, r)
        assert r.reason is not None and r.reason.code == "compiling_in_background"
    finally:
        holder.kill()
        holder.wait()
    # Nobody compiling now: the launch starts the one worker, and says so.
    r = agree(cache, conv_model, qnn, expect="pending")
    agree(cache, conv_model, qnn, expect="hit")


def test_background_mode_with_a_stopped_worker_says_so(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    """A worker holding the key but stopped (SIGSTOP): launches are served at once and told the truth."""
    import signal

    root = tmp_path / "c"
    cache = ctxcache.ContextCache(root, on_miss="background", stall_timeout=1.0)
    fp = cache.key(conv_model, providers=qnn)
    assert fp is not None
    Layout(root).ensure()
    holder = Child.python(f"""
        import time
        from pathlib import Path
        from _report import report
        from ctxcache._locking import KeyLock
        lock = KeyLock(Path({str(Layout(root).lock_path(fp.key))!r}))
        lock.acquire(None, "test")
        report("held")
        time.sleep(600)
        """)
    try:
        assert holder.next_report() == "held"
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(3.0)
        ex = cache.explain(conv_model, providers=qnn)
        t = time.monotonic()
        r = cache.load(conv_model, providers=qnn)
        assert time.monotonic() - t < 30
        assert ex.verdict == r.outcome == "pending"
        assert r.reason is not None and r.reason.code == "lock_stalled" and "no progress" in r.reason.message
        assert r.session.run(None, models.random_input(r.session))[0] is not None
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def read_only_image(tmp_path: Path, conv_model: Path, qnn_options: dict[str, str]) -> Iterator[Path]:
    """A cache holding conv_model's entry, bind-mounted read-only (root ignores permission bits)."""
    src = tmp_path / "src"
    assert ctxcache.ContextCache(src).load(conv_model, providers=[(QNN, qnn_options)]).outcome == "miss"
    with read_only_bind(src, tmp_path / "ro") as ro:
        yield ro


def test_read_only_image(read_only_image: Path, conv_model: Path, conv_model_b: Path, qnn: list[Any]) -> None:
    for mode in ("compile", "background"):
        cache = ctxcache.ContextCache(read_only_image, on_miss=mode)  # type: ignore[arg-type]
        agree(cache, conv_model, qnn, expect="hit")
        # Not in the image: said plainly (not "a compile is already running"), whatever the mode.
        agree(cache, conv_model_b, qnn, expect="bypass", code="cache_unwritable")


def test_a_dead_loaders_marker_in_a_read_only_image_costs_no_probe(tmp_path: Path, conv_model: Path,
                                                                   qnn_options: dict[str, str]) -> None:
    """A crash marker baked into an image cannot be from a load on this device: no probe process at every launch."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    first = ctxcache.ContextCache(src).load(conv_model, providers=[(QNN, qnn_options)])
    assert first.key is not None
    # A marker of a loader that died (a pid that exited and was reaped), as _markers writes them.
    (Layout(src).markers_dir / f"{first.key}.{dead_pid()}.abcdef").write_text("")
    with read_only_bind(src, ro):
        from ctxcache import _probe

        calls: list[Any] = []
        real = _probe.probe
        _probe.probe = lambda *a, **k: calls.append(a) or real(*a, **k)  # type: ignore[assignment]
        try:
            r = ctxcache.ContextCache(ro).load(conv_model, providers=[(QNN, qnn_options)])
        finally:
            _probe.probe = real  # type: ignore[assignment]
        assert r.outcome == "hit" and calls == []


def test_the_plan_is_typed_and_keyed(tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c")
    p = cache.plan(conv_model, providers=qnn)
    assert isinstance(p, ctxcache.Miss) and p.mode == "here" and len(p.key) == 32
    cache.load(conv_model, providers=qnn)
    p = cache.plan(conv_model, providers=qnn)
    assert isinstance(p, ctxcache.Serve) and p.entry.key == p.key and p.checked
    p = cache.plan(conv_model, providers=["CPUExecutionProvider"])
    assert isinstance(p, ctxcache.Bypass) and p.silent and p.reason.code == "nothing_to_compile"
    assert not hasattr(p, "key")
    assert json.dumps(cache.config.to_json())  # the whole configuration serialises


def test_entries_published_beside_a_held_one_are_ordered_by_their_recorded_sequence(
        tmp_path: Path, conv_model: Path, qnn: list[Any]) -> None:
    """Windows publishes beside an entry a session holds ("ready" folders with random names): the one to
    promote is the last published (its manifest's sequence), never the last by name."""
    import shutil

    from ctxcache._store import Store

    root = tmp_path / "c"
    r = ctxcache.ContextCache(root).load(conv_model, providers=qnn)
    assert r.key is not None and r.entry_path is not None
    lay = Layout(root)
    manifests = {}
    for name, seq in (("zzzz", 1), ("aaaa", 2)):  # by name "zzzz" is last; by sequence "aaaa" is
        ready = lay.staging_dir / f"{r.key}.ready.{name}"
        shutil.copytree(r.entry_path, ready)
        m = json.loads((ready / "manifest.json").read_text())
        m["published_ns"], m["entry_id"] = seq, name * 4
        (ready / "manifest.json").write_text(json.dumps(m))
        manifests[name] = m
    shutil.rmtree(r.entry_path)
    entry = Store(root).look_again(r.key)
    assert entry is not None and entry.entry_id == "aaaa" * 4
    assert ctxcache.ContextCache(root).load(conv_model, providers=qnn).outcome == "hit"


@pytest.mark.parametrize("mode", ["compile", "background"])
def test_an_entry_found_by_looking_again_is_judged_like_any_hit(tmp_path: Path, conv_model: Path, qnn: list[Any],
                                                                mode: str) -> None:
    """The plan saw no entry; under the key's lock the load finds one (published beside a held entry, or by the
    process it waited for). Its bytes are checked before the provider sees them, in both miss modes."""
    import shutil

    root = tmp_path / "c"
    r = ctxcache.ContextCache(root).load(conv_model, providers=qnn)
    assert r.key is not None and r.entry_path is not None
    ready = Layout(root).staging_dir / f"{r.key}.ready.abcd"
    shutil.move(str(r.entry_path), ready)
    binary = next(p for p in ready.iterdir() if p.suffix == ".bin")
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 0x01  # loads and runs with wrong outputs if it ever reached QNN
    binary.write_bytes(bytes(data))
    bad = ctxcache.ContextCache(root, on_miss=mode).load(conv_model, providers=qnn)  # type: ignore[arg-type]
    assert (bad.outcome, bad.reason.code if bad.reason else None) == ("fallback", "artifact_digest"), bad
