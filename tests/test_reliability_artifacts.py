"""Damaged entries on disk: every kind of broken artifact or manifest is a fallback with correct outputs,
the entry is quarantined, and the next load recompiles (then hits).

FIELD-NOTES: a one-byte flip in a QNN .bin, or another model's .bin of the same shape, LOADS AND RUNS
WITH SILENTLY WRONG OUTPUTS; every output here is compared bit for bit with a JIT session's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import output_digest
from test_reliability_support import assert_consistent, reference

import ctxcache


def _flip(path: Path, offset: int | None = None) -> None:
    """Flip one byte in place and put the mtime back (as a careless tool might): ctime still moves."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _random(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _manifest(entry: Path, change: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((entry / "manifest.json").read_text())
    change(m)
    (entry / "manifest.json").write_text(json.dumps(m))


def _symlink_to_other(a: Path, b: Path, name: str) -> None:
    (a / name).unlink()
    (a / name).symlink_to(b / name)


def _dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


# damage(entry_a, entry_b) -> the reason codes that correctly describe it
DAMAGE: dict[str, tuple[Callable[[Path, Path], None], set[str]]] = {
    "bin_truncated": (lambda a, b: _truncate(a / "ctx_qnn.bin"), {"artifact_size"}),
    "bin_emptied": (lambda a, b: os.truncate(a / "ctx_qnn.bin", 0), {"artifact_size"}),
    "bin_deleted": (lambda a, b: (a / "ctx_qnn.bin").unlink(), {"artifact_missing"}),
    "bin_random_bytes": (lambda a, b: _random(a / "ctx_qnn.bin"), {"artifact_digest"}),
    "bin_one_byte_flipped_mtime_restored": (lambda a, b: _flip(a / "ctx_qnn.bin"), {"artifact_digest"}),
    "bin_flipped_in_header": (lambda a, b: _flip(a / "ctx_qnn.bin", 16), {"artifact_digest"}),
    "bin_swapped_with_other_entry": (lambda a, b: shutil.copyfile(b / "ctx_qnn.bin", a / "ctx_qnn.bin"), {"artifact_digest"}),
    "bin_replaced_by_symlink": (lambda a, b: _symlink_to_other(a, b, "ctx_qnn.bin"), {"artifact_not_regular"}),
    "bin_replaced_by_directory": (lambda a, b: _dir(a / "ctx_qnn.bin"), {"artifact_not_regular"}),
    "ctx_truncated": (lambda a, b: _truncate(a / "ctx.onnx"), {"artifact_size"}),
    "ctx_one_byte_flipped": (lambda a, b: _flip(a / "ctx.onnx"), {"artifact_digest"}),
    "ctx_swapped_with_other_entry": (lambda a, b: shutil.copyfile(b / "ctx.onnx", a / "ctx.onnx"), {"artifact_digest", "artifact_size"}),
    "ctx_deleted": (lambda a, b: (a / "ctx.onnx").unlink(), {"artifact_missing"}),
    "manifest_garbage": (lambda a, b: (a / "manifest.json").write_bytes(os.urandom(300)), {"manifest_corrupt"}),
    "manifest_truncated": (lambda a, b: _truncate(a / "manifest.json"), {"manifest_corrupt"}),
    "manifest_emptied": (lambda a, b: (a / "manifest.json").write_bytes(b""), {"manifest_corrupt"}),
    "manifest_deleted": (lambda a, b: (a / "manifest.json").unlink(), {"manifest_missing"}),
    "manifest_newer_format": (lambda a, b: _manifest(a, lambda m: m.update(format=99)), {"manifest_corrupt"}),
    "manifest_of_other_entry": (lambda a, b: shutil.copyfile(b / "manifest.json", a / "manifest.json"), {"manifest_corrupt"}),
    "manifest_digest_edited": (
        lambda a, b: _manifest(a, lambda m: [x.update(sig=[0, 0, 0, 0], xxh3="0" * 32) for x in m["artifacts"]]),
        {"artifact_digest"},
    ),
    "manifest_size_edited": (lambda a, b: _manifest(a, lambda m: m["artifacts"][0].update(size=1)), {"artifact_size"}),
    "whole_entries_swapped": (
        lambda a, b: (os.rename(a, a.with_name("tmp")), os.rename(b, a), os.rename(a.with_name("tmp"), b)),
        {"manifest_corrupt"},
    ),
}


@pytest.fixture(scope="module")
def _warm(rel_models: list[Path]) -> None:
    for m in rel_models[:2]:
        reference(m)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_falls_back_then_heals(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], damage: str, _warm: None
) -> None:
    model_a, model_b = rel_models[0], rel_models[1]
    cache = ctxcache.ContextCache(tmp_path / "cache")
    a = cache.load(model_a, providers=qnn_providers)
    b = cache.load(model_b, providers=qnn_providers)
    assert (a.outcome, b.outcome) == ("miss", "miss")
    assert a.entry_path is not None and b.entry_path is not None
    harm, codes = DAMAGE[damage]
    harm(a.entry_path, b.entry_path)

    hurt = cache.load(model_a, providers=qnn_providers)
    assert hurt.outcome == "fallback", hurt
    assert hurt.reason is not None and hurt.reason.code in codes, hurt.reason
    assert output_digest(hurt) == reference(model_a)  # never a silently wrong output
    # The damaged entry is out of the way (kept in quarantine for a post-mortem), nothing half-visible.
    if damage != "whole_entries_swapped":  # there, B's folder still holds A's entry until B loads
        assert assert_consistent(cache.root) == 1
    healed = cache.load(model_a, providers=qnn_providers)
    assert healed.outcome == "miss", healed
    assert output_digest(healed) == reference(model_a)
    again = cache.load(model_a, providers=qnn_providers)
    assert again.outcome == "hit" and output_digest(again) == reference(model_a)
    # The other entry is untouched unless it was damaged too.
    other = cache.load(model_b, providers=qnn_providers)
    assert other.outcome == ("fallback" if damage == "whole_entries_swapped" else "hit"), other
    assert output_digest(other) == reference(model_b)
    if damage == "whole_entries_swapped":
        assert cache.load(model_b, providers=qnn_providers).outcome == "miss"
    assert assert_consistent(cache.root) == 2


def test_stray_files_in_cache_are_ignored(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    """Junk anywhere in the cache root never breaks a load, a listing, the stats or a clear."""
    root = tmp_path / "cache"
    cache = ctxcache.ContextCache(root)
    first = cache.load(rel_models[0], providers=qnn_providers)
    v1 = root / "v1"
    junk = {
        root / "README.txt": b"hello",
        root / "v2" / "entries" / ("f" * 32) / "manifest.json": b"{}",  # a future layout: not ours to read
        v1 / "junk": b"\x00" * 10,
        v1 / "entries" / "not-a-key": b"x",
        v1 / "entries" / ".hidden" / "manifest.json": b"{}",
        v1 / "entries" / ("e" * 32): b"a file where an entry folder should be",
        v1 / "staging" / "someone-elses-folder" / "x": b"x",
        v1 / "staging" / "trash.notes": b"x",
        v1 / "markers" / "garbage": b"",
        v1 / "markers" / f"{first.key}.notapid.x": b"",
        v1 / "locks" / "odd.lock": b"",
        v1 / "memo" / "bad.json": b"{not json",
        v1 / "negative" / f"{'d' * 32}.json": b"[1,2]",
        v1 / "quarantine" / "loose-file": b"x",
    }
    for path, data in junk.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with open(v1 / "events.log", "ab") as f:
        f.write(b"garbage line\n" + b"{" * 10000 + b"\n" + b'{"o": 5}\n')

    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"
    assert cache.load(rel_models[1], providers=qnn_providers).outcome == "miss"
    fresh = ctxcache.ContextCache(root)  # a new process's view: nothing memoised
    r = fresh.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "hit" and output_digest(r) == reference(rel_models[0])
    listed = fresh.entries(include_broken=True)
    assert {e.key for e in listed if e.broken is None} == {first.key, r.key} | {e.key for e in fresh.entries()}
    assert fresh.stats().hits >= 2
    if hasattr(fresh, "verify_entries"):
        fresh.verify_entries()
    assert fresh.clear() >= 2
    assert fresh.entries() == []
    # clear() leaves nothing behind in staging but what it does not own.
    leftovers = {p.name for p in (v1 / "staging").iterdir()}
    assert leftovers <= {"someone-elses-folder", "trash.notes"}, leftovers
    assert (root / "README.txt").read_bytes() == b"hello"  # never touches what is not under v1/
