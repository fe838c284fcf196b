"""Device reality that the simulator never shows, tested at the boundary where the device would act:
ONNX Runtime refusing a context load with a device's error, Windows refusing to rename or delete a file
another process holds open, Android's missing ``sem_open`` / app folder, an emulated Python.

Each test says which seam plays the device: ``onnxruntime.InferenceSession`` (the call that fails on a
device), ``ctxcache._fs.ops`` (the OS calls Windows refuses), platformdirs, ``sys.modules``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import QNN, Layout, layout, output_digest, run_python
from test_reliability_support import reference

import ctxcache
from ctxcache import _fs


# -- 2. transient is not stale -------------------------------------------------------------------------
class _DeviceRefuses:
    """ORT's context load fails the way QNN does on a device, ``times`` times, then works."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, message: str, times: int) -> None:
        self.left = times
        self.calls = 0
        real = ort.InferenceSession
        outer = self

        class Session(real):  # type: ignore[misc, valid-type]
            def __init__(self, model: Any, *a: Any, **k: Any) -> None:
                if isinstance(model, str) and model.endswith("ctx.onnx"):
                    outer.calls += 1
                    if outer.left > 0:
                        outer.left -= 1
                        raise RuntimeError(message)
                super().__init__(model, *a, **k)

        monkeypatch.setattr(ort, "InferenceSession", Session)


BUSY = ("[ONNXRuntimeError] : 1 : FAIL : Failed to load from EpContext model. qnn_backend_manager.cc:868 "
        "LoadCachedQnnContextFromBuffer Failed to create context from binary. Error code: 5005")
STALE = BUSY.replace("5005", "5000")


def test_a_busy_npu_is_retried_then_served_on(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    refuses = _DeviceRefuses(monkeypatch, BUSY, times=1)  # busy once (another process held the NPU)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "hit" and refuses.calls == 2 and output_digest(r) == reference(rel_models[0])


def test_a_npu_busy_for_longer_serves_the_original_model_and_keeps_the_entry(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(rel_models[0], providers=qnn_providers)
    refuses = _DeviceRefuses(monkeypatch, BUSY, times=10)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("bypass", "device_busy"), r
    assert refuses.calls == 3 and "5005" in r.reason.message  # type: ignore[union-attr]
    assert output_digest(r) == reference(rel_models[0])
    assert layout(cache).keys() == [first.key] and not any(layout(cache).quarantine_dir.iterdir())
    monkeypatch.undo()
    again = cache.load(rel_models[0], providers=qnn_providers)
    assert again.outcome == "hit"  # not recompiled: the NPU was busy, the context was never stale
    assert cache.stats().reasons.get("device_busy") == 1


def test_a_stale_context_code_invalidates(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    cache.load(rel_models[0], providers=qnn_providers)
    _DeviceRefuses(monkeypatch, STALE, times=10)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("fallback", "load_failed")
    assert layout(cache).keys() == []  # out of the way: rebuilt at the next launch


def test_an_unknown_load_failure_is_treated_as_the_contexts_and_says_so(tmp_path: Path, rel_models: list[Path],
                                                                        qnn_providers: list[Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    cache.load(rel_models[0], providers=qnn_providers)
    _DeviceRefuses(monkeypatch, "something nobody has seen before", times=10)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "fallback" and r.reason is not None and "not a failure the provider knows" in r.reason.message


def test_the_classification_table_is_the_providers(tmp_path: Path) -> None:
    from ctxcache import providers

    qnn = providers.get(QNN)
    assert qnn.load_error_kind(BUSY) == "transient" and qnn.load_error_kind(STALE) == "artifact"
    assert qnn.load_error_kind("QNN subsystem restart detected") == "transient"
    assert providers.get("CPUExecutionProvider").load_error_kind(BUSY) == "unknown"


# -- 3. Windows file semantics -------------------------------------------------------------------------
def _sharing_violation(path: str) -> PermissionError:
    e = PermissionError(13, "The process cannot access the file because it is being used by another process", path)
    e.winerror = 32  # type: ignore[attr-defined]
    return e


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Folders (and everything in them) another process holds open, Windows-style: renaming them or
    deleting anything in them raises a sharing violation (winerror 32). Played through ``_fs.ops``."""
    folders: set[str] = set()

    def inside(p: str, dir_fd: int | None = None) -> bool:
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p) if dir_fd is not None else p
        path = os.path.abspath(path)
        return any(path == f or path.startswith(f + os.sep) for f in folders)

    real = _fs.OsCalls()

    def rename(src: str, dst: str) -> None:
        if inside(src):
            raise _sharing_violation(src)
        real.rename(src, dst)

    def unlink(p: str, *, dir_fd: int | None = None) -> None:
        if inside(p, dir_fd) and not os.path.basename(p).startswith(("manifest.json", ".manifest.json", "tombstone")):
            raise _sharing_violation(p)
        real.unlink(p, dir_fd=dir_fd)

    def rmdir(p: str, *, dir_fd: int | None = None) -> None:
        if inside(p, dir_fd):
            raise _sharing_violation(p)
        real.rmdir(p, dir_fd=dir_fd)

    monkeypatch.setattr(_fs.ops, "rename", rename)
    monkeypatch.setattr(_fs.ops, "unlink", unlink)
    monkeypatch.setattr(_fs.ops, "rmdir", rmdir)
    yield folders


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 | 1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_invalidating_an_entry_another_process_holds_hides_it_at_once_and_finishes_later(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], held: set[str]
) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(rel_models[0], providers=qnn_providers)  # this session holds the files (as on Windows)
    assert first.entry_path is not None and first.key
    held.add(str(first.entry_path))
    assert cache.invalidate(key=first.key) == 1
    assert cache.entries() == [] and first.entry_path.is_dir()  # hidden, not half-removed
    rebuilt = cache.load(rel_models[0], providers=qnn_providers)  # the app never sees the refusal
    assert rebuilt.outcome == "miss" and output_digest(rebuilt) == reference(rel_models[0])
    assert rebuilt.entry_path is not None and rebuilt.entry_path != first.entry_path  # published beside it
    again = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert again.outcome == "hit" and output_digest(again) == reference(rel_models[0])  # served from beside it
    held.clear()  # the other process has exited
    promoted = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert promoted.outcome == "hit" and promoted.entry_path == first.entry_path
    assert [e.key for e in cache.entries()] == [first.key]
    assert not any(n.name.startswith(first.key) for n in Layout(cache.root).staging_dir.iterdir())


def test_a_damaged_entry_that_is_held_falls_back_and_is_hidden(tmp_path: Path, rel_models: list[Path],
                                                                qnn_providers: list[Any], held: set[str]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(rel_models[1], providers=qnn_providers)
    assert first.entry_path is not None
    _flip(first.entry_path / "ctx_qnn.bin")
    held.add(str(first.entry_path))
    r = cache.load(rel_models[1], providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("fallback", "artifact_digest")
    assert output_digest(r) == reference(rel_models[1])
    assert cache.entries() == []
    nxt = cache.load(rel_models[1], providers=qnn_providers)
    assert nxt.outcome == "miss" and output_digest(nxt) == reference(rel_models[1])


def test_clear_and_prune_of_held_entries_report_them_gone_and_delete_them_later(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], held: set[str]
) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    a = cache.load(rel_models[0], providers=qnn_providers)
    assert a.entry_path is not None
    held.add(str(a.entry_path))
    assert cache.clear() == 1 and cache.entries() == [] and a.entry_path.is_dir()
    assert cache.load(rel_models[2], providers=qnn_providers).outcome == "miss"  # the rest of the cache works
    plan = cache.plan_prune()
    assert [i.junk_kind for i in plan.items if i.why == "junk"] == ["hidden"]
    assert [i.key for i in plan.execute().failed] == [str(a.entry_path.relative_to(cache.root))]  # still held
    held.clear()
    assert not cache.plan_prune().execute().failed and not a.entry_path.exists()


def test_import_over_a_held_broken_entry(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                         held: set[str]) -> None:
    src = ctxcache.ContextCache(tmp_path / "src")
    assert src.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    bundle = ctxcache.export_bundle(src, tmp_path / "app" / "b").path
    dst = ctxcache.ContextCache(tmp_path / "dst", trusted_dirs=[tmp_path / "app"])
    first = dst.load(rel_models[0], providers=qnn_providers)
    assert first.entry_path is not None
    _flip(first.entry_path / "ctx_qnn.bin")
    held.add(str(first.entry_path))
    res = ctxcache.import_bundle(dst, bundle, force=True)
    assert res.installed == (first.key,)
    # The same app, so the same trust (a bundle admitted because its folder is the app's own is served only
    # while that folder still is: guarantee 21).
    r = ctxcache.ContextCache(tmp_path / "dst", trusted_dirs=[tmp_path / "app"]).load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "hit" and output_digest(r) == reference(rel_models[0])


def test_paths_handed_to_onnxruntime_survive_a_non_ascii_user_folder(tmp_path: Path, rel_models: list[Path],
                                                                    qnn_providers: list[Any]) -> None:
    import shutil

    home = tmp_path / "Users" / "Jürgen Ölçü 山田"
    model = home / "Mödels" / "net ü.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(rel_models[0], model)
    cache = ctxcache.ContextCache(home / "AppData" / "Lökal" / "ctxcache")
    assert cache.load(model, providers=qnn_providers).outcome == "miss"
    r = ctxcache.ContextCache(home / "AppData" / "Lökal" / "ctxcache").load(model, providers=qnn_providers)
    assert r.outcome == "hit" and output_digest(r) == reference(rel_models[0])


def test_a_cache_path_too_long_for_windows_is_a_clear_bypass(tmp_path: Path, rel_models: list[Path],
                                                            qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PATH (260) on Windows without long paths: the entry's longest path is checked before anything is
    written. Played through ``_fs.path_limit`` (Linux has no such limit)."""
    monkeypatch.setattr(_fs, "path_limit", lambda: 260)
    deep = tmp_path / ("x" * 120) / ("y" * 100)
    r = ctxcache.ContextCache(deep).load(rel_models[0], providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("bypass", "cache_unwritable"), r
    assert "260" in r.reason.message and "shorter" in r.reason.message  # type: ignore[union-attr]
    assert output_digest(r) == reference(rel_models[0]) and not deep.exists()


# -- 4. Android and other constrained runtimes ------------------------------------------------------------
def test_no_platformdirs_folder_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("CTXCACHE_DIR", raising=False)

    def android(*a: Any, **k: Any) -> str:  # what platformdirs does on Android without an app folder
        raise RuntimeError("Unable to find the Android data folder")

    monkeypatch.setattr(platformdirs, "user_data_dir", android)
    with pytest.raises(ctxcache.errors.CacheLocationError) as info:
        ctxcache.ContextCache()
    assert "cache_dir" in str(info.value) and "CTXCACHE_DIR" in str(info.value)


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "cache"
    f.write_text("")
    with pytest.raises(ctxcache.errors.CacheLocationError, match="is a file, not a folder"):
        ctxcache.ContextCache(f)


@pytest.mark.parametrize("missing", ["multiprocessing", "fcntl"])
def test_load_without_multiprocessing_or_fcntl(tmp_path: Path, rel_models: list[Path], missing: str) -> None:
    """Android has no sem_open (multiprocessing's locks fail); some Pythons have no fcntl. A load (miss,
    hit, a crash marker) must need neither."""
    code = f"""
import sys
for name in [{missing!r}, "_multiprocessing" if {missing!r} == "multiprocessing" else "fcntl"]:
    sys.modules[name] = None  # import fails
import json, ctxcache
from ctxcache import models
from _report import report
c = ctxcache.ContextCache({str(tmp_path / 'cache')!r})
p = [("QNNExecutionProvider", models.qnn_htp_options())]
report([c.load({str(rel_models[0])!r}, providers=p).outcome, c.load({str(rel_models[0])!r}, providers=p).outcome,
        sorted(m for m in sys.modules if m.startswith("multiprocessing") and sys.modules[m] is not None)])
"""
    proc = run_python(code)
    assert proc.result == ["miss", "hit", []]


def test_warm_jobs_need_no_multiprocessing(tmp_path: Path, rel_models: list[Path]) -> None:
    """Android has no sem_open: ``warm --jobs`` starts its workers with subprocess (isolated children,
    guarantee 17), not with multiprocessing, so parallel jobs work there too."""
    code = f"""
import sys
sys.modules["_multiprocessing"] = None
sys.modules["multiprocessing.synchronize"] = None
from ctxcache.cli import main
raise SystemExit(main(["warm", {str(rel_models[0])!r}, {str(rel_models[1])!r}, "--jobs", "2",
                       "--cache-dir", {str(tmp_path / 'cache')!r}]))
"""
    proc = run_python(code, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "serially" not in proc.stderr and proc.stdout.count("compiled") == 3, (proc.stdout, proc.stderr[-2000:])


# -- 5. the process architecture -----------------------------------------------------------------------------
def test_an_emulated_python_is_detected_and_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Windows-on-ARM with an x64 Python: played through ``_arch.native_machine`` (what IsWow64Process2 /
    sysctl.proc_translated report on those systems)."""
    from ctxcache import _arch

    monkeypatch.setattr(_arch, "native_machine", lambda: "arm64")
    monkeypatch.setattr(_arch, "python_machine", lambda: "amd64")
    d = ctxcache.diagnose(ctxcache.ContextCache(tmp_path / "c"))
    assert d.data["architecture"]["emulated"] is True
    assert any("emulated" in p and "native ARM64 Python" in p for p in d.problems)


def test_explain_names_the_architecture_when_it_is_the_part_that_differs(tmp_path: Path, rel_models: list[Path],
                                                                        qnn_providers: list[Any]) -> None:
    import json

    cache = ctxcache.ContextCache(tmp_path / "cache")
    r = cache.load(rel_models[0], providers=qnn_providers)
    mpath = layout(cache).entry_path(r.key) / "manifest.json"
    m = json.loads(mpath.read_text())
    parts = [[k, "win32-amd64" if k == "host" else v] for k, v in m["parts"]]
    key = ctxcache.Fingerprint(tuple((p[0], p[1]) for p in parts)).key
    m.update(parts=parts, key=key)
    (mpath.parent.parent / key).mkdir()
    for f in mpath.parent.iterdir():
        if f.name != "manifest.json":
            (mpath.parent.parent / key / f.name).write_bytes(f.read_bytes())
    (mpath.parent.parent / key / "manifest.json").write_text(json.dumps(m))
    import shutil

    shutil.rmtree(mpath.parent)
    ex = cache.explain(rel_models[0], providers=qnn_providers)
    assert ex.verdict == "miss"
    text = " ".join(str(d) for d in ex.nearest[0].differences)
    assert "host win32-amd64 -> linux-" in text and "architecture" in text
