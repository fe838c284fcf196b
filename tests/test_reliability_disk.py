"""Disk faults: a full disk during compile or publish, a read-only cache, the cache folder deleted while
the app runs. Each: the app gets a working session with correct outputs, nothing half-visible is left,
and once the fault is gone the next load compiles and caches again.

Full and read-only disks are real: a small tmpfs mounted for the test (needs root or CAP_SYS_ADMIN;
skipped with that reason otherwise). Root ignores permission bits, so a read-only cache cannot be
simulated with chmod; a read-only remount is what a locked-down device or a full-disk remount does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import layout, output_digest
from test_reliability_support import assert_consistent, reference

import ctxcache
from ctxcache._seams import hooks


class Tmpfs:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def remount(self, opt: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opt}", str(self.path)], check=True)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> Path:
        """Fill the filesystem, leaving about ``leave`` bytes free; returns the filler (delete it to free)."""
        filler = self.path / f"filler{len(list(self.path.glob('filler*')))}"
        with open(filler, "wb") as f:
            chunk = b"\0" * 65536
            try:
                while self.free() - leave >= len(chunk):
                    f.write(chunk)
                    f.flush()
                rest = self.free() - leave
                if rest > 0:
                    f.write(b"\0" * rest)
            except OSError:
                pass
        return filler

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    fs = Tmpfs(tmp_path / "mnt", 8 << 20)
    try:
        yield fs
    finally:
        fs.close()


def _no_debris(cache: ctxcache.ContextCache) -> None:
    assert_consistent(cache.root)
    staging = layout(cache).staging_dir
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def test_disk_full_before_compile(tmpfs: Tmpfs, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmpfs.path / "cache")
    layout(cache).ensure()
    filler = tmpfs.fill(leave=0)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome in ("fallback", "bypass"), r
    assert output_digest(r) == reference(rel_models[0])
    _no_debris(cache)
    filler.unlink()
    # A full disk is transient: it must not be remembered as "this model cannot compile".
    healed = cache.load(rel_models[0], providers=qnn_providers)
    assert healed.outcome == "miss", healed
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"


def test_disk_full_during_compile(tmpfs: Tmpfs, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    """Room for the layout and a few KB, not for the compiled binary: the compiler's own write fails."""
    cache = ctxcache.ContextCache(tmpfs.path / "cache")
    layout(cache).ensure()
    filler = tmpfs.fill(leave=16 << 10)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome in ("fallback", "bypass"), r
    assert output_digest(r) == reference(rel_models[0])
    _no_debris(cache)
    filler.unlink()
    healed = cache.load(rel_models[0], providers=qnn_providers)
    assert healed.outcome == "miss", healed
    assert output_digest(healed) == reference(rel_models[0])


def test_disk_full_during_publish(tmpfs: Tmpfs, rel_models: list[Path], qnn_providers: list[Any],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile succeeds, then the disk fills (another app writing): the manifest write fails."""
    cache = ctxcache.ContextCache(tmpfs.path / "cache")
    fillers: list[Path] = []
    real = hooks.compile

    def compile_then_fill(*a: Any, **k: Any) -> float:
        seconds = real(*a, **k)
        fillers.append(tmpfs.fill(leave=0))
        return seconds

    monkeypatch.setattr(hooks, "compile", compile_then_fill)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert fillers, "the fault was never injected"
    assert r.outcome == "fallback" and r.reason is not None and r.reason.code == "publish_failed", r
    assert output_digest(r) == reference(rel_models[0])
    _no_debris(cache)
    monkeypatch.setattr(hooks, "compile", real)
    for f in fillers:
        f.unlink()
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"


def test_read_only_cache(tmpfs: Tmpfs, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmpfs.path / "cache")
    for m in rel_models:
        assert cache.load(m, providers=qnn_providers).outcome == "miss"
    damaged = cache.load(rel_models[2], providers=qnn_providers)
    assert damaged.entry_path is not None
    with open(damaged.entry_path / "ctx_qnn.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    cache.invalidate(model=rel_models[1])  # model 1 now has no entry
    tmpfs.remount("ro")
    try:
        fresh = ctxcache.ContextCache(tmpfs.path / "cache")  # a new launch on the read-only cache
        hit = fresh.load(rel_models[0], providers=qnn_providers)
        assert hit.outcome == "hit" and output_digest(hit) == reference(rel_models[0])
        miss = fresh.load(rel_models[1], providers=qnn_providers)
        assert miss.outcome == "bypass" and miss.reason is not None and miss.reason.code == "cache_unwritable", miss
        assert output_digest(miss) == reference(rel_models[1])
        bad = fresh.load(rel_models[2], providers=qnn_providers)  # cannot be quarantined: still a fallback
        assert bad.outcome == "fallback" and bad.reason is not None and bad.reason.code == "artifact_digest", bad
        assert output_digest(bad) == reference(rel_models[2])
        assert fresh.clear() == 0  # nothing removable, and no exception
        assert len(fresh.entries()) == 2
    finally:
        tmpfs.remount("rw")
    again = ctxcache.ContextCache(tmpfs.path / "cache")
    assert again.load(rel_models[2], providers=qnn_providers).outcome == "fallback"  # now quarantined
    assert again.load(rel_models[2], providers=qnn_providers).outcome == "miss"


def test_cache_dir_deleted_while_app_runs(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    cache = ctxcache.ContextCache(root)
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    shutil.rmtree(root)
    r = cache.load(rel_models[0], providers=qnn_providers)  # same process, same ContextCache object
    assert r.outcome == "miss" and output_digest(r) == reference(rel_models[0])
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"

    # Deleted between the compile and the publish.
    real = hooks.compile

    def compile_then_delete(*a: Any, **k: Any) -> float:
        seconds = real(*a, **k)
        shutil.rmtree(root)
        return seconds

    monkeypatch.setattr(hooks, "compile", compile_then_delete)
    r = cache.load(rel_models[1], providers=qnn_providers)
    assert r.outcome == "fallback" and output_digest(r) == reference(rel_models[1])
    monkeypatch.setattr(hooks, "compile", real)
    assert cache.load(rel_models[1], providers=qnn_providers).outcome == "miss"

    # Deleted between the lookup and the context load of a hit.
    def verified_then_delete(entry: Any) -> None:
        shutil.rmtree(root)

    monkeypatch.setattr(hooks, "verified", verified_then_delete)
    r = cache.load(rel_models[1], providers=qnn_providers)
    assert r.outcome == "fallback" and output_digest(r) == reference(rel_models[1])
    monkeypatch.undo()
    assert cache.load(rel_models[1], providers=qnn_providers).outcome == "miss"
    assert cache.load(rel_models[1], providers=qnn_providers).outcome == "hit"


def test_disk_full_in_staging_is_not_remembered_as_uncompilable(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]
) -> None:
    """Only the staging folder is out of space (its own tiny tmpfs); the rest of the cache has room, so
    a "cannot compile this model" record COULD be written: a transient ENOSPC must not become a
    week-long bypass of the cache for this model."""
    cache = ctxcache.ContextCache(tmp_path / "cache")
    layout(cache).ensure()
    staging = Tmpfs.__new__(Tmpfs)
    staging.path = layout(cache).staging_dir
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k,mode=0700", "tmpfs", str(staging.path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        r = cache.load(rel_models[0], providers=qnn_providers)
        assert r.outcome == "fallback" and r.reason is not None and r.reason.code == "compile_failed", r
        assert output_digest(r) == reference(rel_models[0])
    finally:
        staging.close()
    assert_consistent(cache.root)
    healed = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert healed.outcome == "miss", healed
    assert output_digest(healed) == reference(rel_models[0])


def test_live_session_survives_its_entry_being_deleted(tmp_path: Path, rel_models: list[Path],
                                                       qnn_providers: list[Any]) -> None:
    """`ctxcache clear` (or a prune, or the user's rm -rf) while the app runs: a session already made
    from a cached context keeps running with correct outputs, and the next load recompiles."""
    root = tmp_path / "cache"
    cache = ctxcache.ContextCache(root)
    cache.load(rel_models[0], providers=qnn_providers)
    hit = ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers)
    assert hit.outcome == "hit"
    ctxcache.ContextCache(root).clear()
    assert output_digest(hit) == reference(rel_models[0])
    shutil.rmtree(root)
    assert output_digest(hit) == reference(rel_models[0])
    assert ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers).outcome == "miss"
