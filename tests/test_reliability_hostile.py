"""Hostile or bad inputs: each gets a clear error or a safe refusal; nothing outside the cache root is
read or written, and no tampered context is ever handed to ONNX Runtime.

The tampering cases play an attacker who can write into the cache and re-computes the manifest
(digests, sizes, stat signatures) so that the integrity check alone would pass: what must stop them is
ctxcache's own check of what the context model points at. A recorder around ``InferenceSession``
proves that ORT was never asked to open the tampered context (QNN happens to refuse absolute and '..'
paths itself; other providers need not, and a symlink passes QNN's check).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import xxhash
from conftest import layout, output_digest
from test_reliability_support import assert_consistent, reference

import ctxcache
from ctxcache import errors, models
from ctxcache._hashing import signature


@pytest.fixture
def ort_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model path handed to ort.InferenceSession in this process."""
    calls: list[str] = []
    real = ort.InferenceSession

    class Recorder(real):  # type: ignore[misc,valid-type]
        def __init__(self, model: Any, *a: Any, **k: Any) -> None:
            calls.append(model if isinstance(model, str) else "<bytes>")
            super().__init__(model, *a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    return calls


def _reseal(entry: Path, extra: list[str] = ()) -> None:  # type: ignore[assignment]
    """Re-compute the manifest as an attacker with write access would: the integrity check passes."""
    m = json.loads((entry / "manifest.json").read_text())
    arts = []
    for name in [a["name"] for a in m["artifacts"]] + list(extra):
        p = entry / name
        st = os.lstat(p)
        xxh3 = xxhash.xxh3_128(p.read_bytes()).hexdigest()  # what an attacker computes (a link is followed)
        arts.append({"name": name, "size": st.st_size, "xxh3": xxh3, "sig": list(signature(st))})
    m["artifacts"] = arts
    (entry / "manifest.json").write_text(json.dumps(m))


def _point_context(entry: Path, target: str) -> None:
    m = onnx.load(str(entry / "ctx.onnx"), load_external_data=False)
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "ep_cache_context":
                a.s = target.encode()
    onnx.save(m, str(entry / "ctx.onnx"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def _cached(tmp_path: Path, model: Path, providers: list[Any]) -> tuple[ctxcache.ContextCache, Any]:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    r = cache.load(model, providers=providers)
    assert r.outcome == "miss"
    return cache, r


def _never_loaded_from_cache(calls: list[str], cache: ctxcache.ContextCache) -> None:
    bad = [c for c in calls if c.startswith(str(cache.root))]
    assert not bad, f"ORT was handed a cached context: {bad}"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink_in_entry", "subfolder_symlink", "listed_symlink"])
def test_context_pointing_outside_its_entry_is_never_loaded(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], outside: Path, how: str, ort_calls: list[str]
) -> None:
    model = rel_models[0]
    cache, first = _cached(tmp_path, model, qnn_providers)
    entry: Path = first.entry_path
    foreign = outside / "ctx_qnn.bin"
    shutil.copyfile(entry / "ctx_qnn.bin", foreign)  # a perfectly loadable binary, just not ours
    extra: list[str] = []
    if how == "absolute":
        _point_context(entry, str(foreign))
    elif how == "dotdot":
        _point_context(entry, os.path.relpath(foreign, entry))
    elif how == "symlink_in_entry":
        (entry / "evil.bin").symlink_to(foreign)
        _point_context(entry, "evil.bin")
    elif how == "subfolder_symlink":
        (entry / "sub").symlink_to(outside)
        _point_context(entry, "sub/ctx_qnn.bin")
    elif how == "listed_symlink":
        (entry / "evil.bin").symlink_to(foreign)
        _point_context(entry, "evil.bin")
        extra = ["evil.bin"]
    _reseal(entry, extra)
    ort_calls.clear()
    r = ctxcache.ContextCache(tmp_path / "cache").load(model, providers=qnn_providers)
    assert r.outcome == "fallback", r
    assert r.reason is not None and r.reason.code in ("unsafe_context", "artifact_not_regular"), r.reason
    _never_loaded_from_cache(ort_calls, cache)
    assert output_digest(r) == reference(model)
    assert foreign.read_bytes() == (outside / "ctx_qnn.bin").read_bytes()  # untouched
    assert ctxcache.ContextCache(tmp_path / "cache").load(model, providers=qnn_providers).outcome == "miss"


def test_context_with_external_data_outside_is_never_loaded(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], outside: Path, ort_calls: list[str]
) -> None:
    """An entry whose ctx.onnx is swapped for a plain model reading its weights from outside the entry."""
    cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    entry: Path = first.entry_path
    plain = onnx.load(str(rel_models[0]))
    onnx.save_model(plain, str(outside / "x.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    m = onnx.load(str(outside / "x.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = os.path.relpath(outside / "w.data", entry)
    onnx.save(m, str(entry / "ctx.onnx"))
    _reseal(entry)
    ort_calls.clear()
    r = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "fallback" and r.reason is not None and r.reason.code == "unsafe_context", r
    _never_loaded_from_cache(ort_calls, cache)


def test_entry_folder_replaced_by_symlink(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], outside: Path, ort_calls: list[str]
) -> None:
    cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    entry: Path = first.entry_path
    shutil.copytree(entry, outside / "entry")
    shutil.rmtree(entry)
    entry.symlink_to(outside / "entry")
    ort_calls.clear()
    r = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "fallback", r
    _never_loaded_from_cache(ort_calls, cache)
    assert not any(c.startswith(str(outside)) for c in ort_calls), ort_calls
    assert sorted(p.name for p in (outside / "entry").iterdir()) == ["ctx.onnx", "ctx_qnn.bin", "manifest.json"]
    assert ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers).outcome == "miss"
    assert (outside / "entry" / "ctx_qnn.bin").exists()  # quarantine moved the link, not its target


def _fifo(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def _with_deadline(fn: Callable[[], Any], seconds: float = 60) -> Any:
    """Run ``fn`` in a thread: a blocking open() of a FIFO would otherwise hang the whole suite."""
    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "HUNG: the load blocked (a FIFO or device opened for reading or writing)"
    if err:
        raise err[0]
    return out[0]


PLANTS: dict[str, Callable[[Path, str, Path], Path]] = {
    # (cache root v1, key, outside folder) -> the outside file that must stay untouched
    "manifest_symlink": lambda v1, key, out: _link(v1 / "entries" / key / "manifest.json", out, copy=True),
    "events_log_symlink": lambda v1, key, out: _link(v1 / "events.log", out),
    "negative_symlink": lambda v1, key, out: _link(v1 / "negative" / f"{key}.json", out),
    "lock_symlink": lambda v1, key, out: _link(v1 / "locks" / f"{key}.lock", out),
    "memo_symlinks": lambda v1, key, out: [_link(p, out) for p in (v1 / "memo").iterdir()][-1],
    "staging_symlink_to_dir": lambda v1, key, out: _link_dir(v1 / "staging" / f"{key}.999999.dead", out),
    "quarantine_symlinks": lambda v1, key, out: [
        _link_dir(v1 / "quarantine" / f"{key}.{i}.x", out) for i in range(12)
    ][-1],
    "marker_symlink": lambda v1, key, out: _link(v1 / "markers" / f"{key}.999999.ab", out),
}


def _link(path: Path, out: Path, *, copy: bool = False) -> Path:
    target = out / f"victim-{path.name}"
    target.write_bytes(path.read_bytes() if copy and path.exists() else b"precious\n")
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)
    return target


def _link_dir(path: Path, out: Path) -> Path:
    d = out / "victim-dir"
    d.mkdir(exist_ok=True)
    (d / "precious.txt").write_bytes(b"precious\n")
    path.symlink_to(d)
    return d / "precious.txt"


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_planted_symlinks_never_lead_outside(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], outside: Path, plant: str, ort_calls: list[str]
) -> None:
    cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    cache.load(rel_models[1], providers=qnn_providers)
    cache.invalidate(model=rel_models[1])  # model 1 will miss: the lock, staging and negative paths run
    victim = PLANTS[plant](layout(cache).root, first.key, outside)
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in outside.rglob("*") if p.is_file()}
    fresh = ctxcache.ContextCache(tmp_path / "cache", max_size=1)
    for m in rel_models[:2]:
        r = _with_deadline(lambda m=m: fresh.load(m, providers=qnn_providers))
        assert r.outcome in ("hit", "miss", "fallback", "bypass"), r
        assert output_digest(r) == reference(m)
    _with_deadline(lambda: (fresh.entries(include_broken=True), fresh.stats(), fresh.clear()))
    after = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in outside.rglob("*") if p.is_file()}
    assert after == before, f"a file outside the cache was changed: {victim}"
    assert not any(c.startswith(str(outside)) for c in ort_calls), ort_calls


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX feature")
@pytest.mark.parametrize("where", ["manifest", "negative", "events_log", "memo"])
def test_fifos_in_the_cache_never_hang_a_load(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], where: str
) -> None:
    cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    v1 = layout(cache).root
    target = {
        "manifest": v1 / "entries" / first.key / "manifest.json",
        "negative": v1 / "negative" / f"{first.key}.json",
        "events_log": v1 / "events.log",
        "memo": min((v1 / "memo").iterdir()),
    }[where]
    _fifo(target)
    fresh = ctxcache.ContextCache(tmp_path / "cache")
    r = _with_deadline(lambda: fresh.load(rel_models[0], providers=qnn_providers))
    assert output_digest(r) == reference(rel_models[0])
    _with_deadline(lambda: (fresh.entries(include_broken=True), fresh.stats()))


def test_hard_links_in_cache_never_change_the_linked_file(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], outside: Path
) -> None:
    """Hard links planted for every file ctxcache writes into (not replaces): appends or writes through
    them would change a file outside the cache (same inode)."""
    cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    entry: Path = first.entry_path
    v1 = layout(cache).root
    keep = outside / "keep.bin"
    shutil.copyfile(entry / "ctx_qnn.bin", keep)
    (entry / "ctx_qnn.bin").unlink()
    os.link(keep, entry / "ctx_qnn.bin")  # same content: verifies after a re-hash, and must load fine
    victims = {}
    second_key = cache.key(rel_models[1], providers=qnn_providers).key
    for name, path in {
        "events": v1 / "events.log",
        "lock": v1 / "locks" / f"{second_key}.lock",
        "negative": v1 / "negative" / f"{second_key}.json",
    }.items():
        victim = outside / f"victim-{name}"
        victim.write_bytes(b"precious\n")
        if path.exists():
            path.unlink()
        os.link(victim, path)
        victims[victim] = victim.read_bytes()
    content = keep.read_bytes()
    r = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "hit" and output_digest(r) == reference(rel_models[0])
    r = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[1], providers=qnn_providers)  # lock + compile
    assert output_digest(r) == reference(rel_models[1])
    cache.invalidate(model=rel_models[0])
    cache.load(rel_models[0], providers=qnn_providers)
    cache.clear()
    assert keep.read_bytes() == content
    for victim, before in victims.items():
        assert victim.read_bytes() == before, f"{victim.name} was written through a hard link in the cache"


# -- ownership and permissions ---------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_cache_is_created_owner_only(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    root = tmp_path / "deep" / "cache"
    cache = ctxcache.ContextCache(root)
    cache.load(rel_models[0], providers=qnn_providers)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        assert _mode(d) & 0o077 == 0, f"{d} is {oct(_mode(d))}"


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership and mode bits")
@pytest.mark.parametrize("fault", ["world_writable_root", "group_writable_layout", "owned_by_other_user"])
def test_cache_writable_by_others_is_refused(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], fault: str, ort_calls: list[str]
) -> None:
    """Like ssh with key files: a cache someone else can write into could feed us a context; refuse it."""
    root = tmp_path / "cache"
    cache, _first = _cached(tmp_path, rel_models[0], qnn_providers)
    if fault == "world_writable_root":
        os.chmod(root, 0o777)
    elif fault == "group_writable_layout":
        os.chmod(root / "v1", 0o770)
        os.chown(root / "v1", -1, _shared_gid())  # a group with other members (or not ours)
    else:
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(root, 65534, 65534)
    ort_calls.clear()
    r = ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "cache_insecure", r
    assert str(root) in r.reason.message
    _never_loaded_from_cache(ort_calls, cache)
    assert output_digest(r) == reference(rel_models[0])
    os.chmod(root, 0o700)
    os.chmod(root / "v1", 0o700)
    os.chown(root, os.getuid(), os.getgid())
    os.chown(root / "v1", os.getuid(), os.getgid())
    assert ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers).outcome == "hit"


def _shared_gid() -> int:
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    for g in grp.getgrall():
        if g.gr_gid != me.pw_gid or any(m != me.pw_name for m in g.gr_mem):
            return g.gr_gid
    pytest.skip("no group here other than this user's private one")


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership and mode bits")
def test_group_writable_private_group_is_accepted(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    """umask 002 with user-private groups (Debian, Ubuntu) makes an app's folders group-writable; when
    the group is the user's own and has nobody else in it, that is not someone else's write access."""
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid())
    if any(m != me.pw_name for m in grp.getgrgid(me.pw_gid).gr_mem):
        pytest.skip("this user's primary group has other members")
    root = tmp_path / "app-data"
    root.mkdir(mode=0o775)
    os.chmod(root, 0o775)
    os.chown(root, os.getuid(), me.pw_gid)
    r = ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "miss", r


# -- manifests -------------------------------------------------------------------------------------
def _good_manifest(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "manifest.json").read_text())


BAD_MANIFESTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "nested_array_bomb": lambda m: b"[" * 200_000 + b"]" * 200_000,
    "nested_object_bomb": lambda m: b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "oversized": lambda m: json.dumps(dict(m, pad="x" * (2 << 20))).encode(),
    "huge_number": lambda m: json.dumps(dict(m, format=10**4000 if False else 1)).replace('"format": 1', '"format": ' + "9" * 5000).encode(),
    "nan_sizes": lambda m: json.dumps(dict(m, artifacts=[dict(a, size=float("nan")) for a in m["artifacts"]])).encode(),
    "compat_is_list": lambda m: json.dumps(dict(m, compat=[1, 2])).encode(),
    "compat_values_not_strings": lambda m: json.dumps(dict(m, compat={"QNNExecutionProvider": {"x": 1}})).encode(),
    "compile_seconds_string": lambda m: json.dumps(dict(m, compile_seconds="fast")).encode(),
    "created_string": lambda m: json.dumps(dict(m, created="yesterday")).encode(),
    "parts_not_pairs": lambda m: json.dumps(dict(m, parts=[1, 2, 3])).encode(),
    "model_not_object": lambda m: json.dumps(dict(m, model="m.onnx")).encode(),
    "entry_id_object": lambda m: json.dumps(dict(m, entry_id={"a": 1})).encode(),
    "artifact_name_traversal": lambda m: json.dumps(
        dict(m, artifacts=m["artifacts"] + [dict(m["artifacts"][0], name="../../escape")])
    ).encode(),
    "utf16": lambda m: json.dumps(m).encode("utf-16"),
    "invalid_utf8": lambda m: json.dumps(m).encode()[:-2] + b"\xff\xfe}",
    "top_level_list": lambda m: json.dumps([m]).encode(),
    "duplicate_keys_last_wins_wrong": lambda m: json.dumps(m).encode()[:-1] + b', "format": "one"}',
}


@pytest.mark.parametrize("bad", sorted(BAD_MANIFESTS))
def test_malformed_manifest_is_a_fallback_never_an_exception(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], bad: str
) -> None:
    _cache, first = _cached(tmp_path, rel_models[0], qnn_providers)
    entry: Path = first.entry_path
    (entry / "manifest.json").write_bytes(BAD_MANIFESTS[bad](_good_manifest(entry)))
    fresh = ctxcache.ContextCache(tmp_path / "cache", max_size=10 << 20)
    # The management API reads the same manifest: never an exception there either.
    listed = fresh.entries(include_broken=True)
    for info in listed:
        assert isinstance(info.model_name, str) and isinstance(info.size, int)
    r = fresh.load(rel_models[0], providers=qnn_providers)
    assert r.outcome in ("fallback", "hit"), r  # "hit" only where the damage is in a field a hit ignores
    assert output_digest(r) == reference(rel_models[0])
    assert fresh.load(rel_models[1], providers=qnn_providers).outcome == "miss"  # max_size walks entries()
    again = fresh.load(rel_models[0], providers=qnn_providers)
    assert again.outcome in ("miss", "hit"), again
    fresh.stats()
    fresh.clear()


# -- bad model files and paths ---------------------------------------------------------------------
BAD_MODELS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda good: b"",
    "random": lambda good: os.urandom(4096),
    "text": lambda good: b"this is not a model\n" * 100,
    "json": lambda good: b'{"ir_version": 8, "graph": {}}',
    "truncated_quarter": lambda good: good[: len(good) // 4],
    "truncated_half": lambda good: good[: len(good) // 2],
    "truncated_last_byte": lambda good: good[:-1],
    "zip_header": lambda good: b"PK\x03\x04" + os.urandom(1000),
    "deep_nesting": lambda good: b"\x3a\x80\x80\x04" + b"\x0a\x7f" * 10_000,
}


@pytest.mark.parametrize("bad", sorted(BAD_MODELS))
def test_bad_model_file_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], bad: str
) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(BAD_MODELS[bad](rel_models[0].read_bytes()))
    cache = ctxcache.ContextCache(tmp_path / "cache")
    with pytest.raises(errors.CtxCacheError) as info:
        cache.load(path, providers=qnn_providers)
    assert isinstance(info.value, (errors.InvalidModelError, errors.ModelNotFoundError)), info.value
    assert str(path) in str(info.value)
    assert assert_consistent(cache.root) == 0
    neg = layout(cache).negative_dir
    assert not neg.exists() or not any(neg.iterdir())
    # The same bytes as a model= bytes argument: same verdict.
    with pytest.raises(errors.InvalidModelError):
        cache.load(path.read_bytes(), providers=qnn_providers)


def test_paths_with_spaces_and_non_ascii(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    weird = tmp_path / "dír with spaces ☃" / "modèl ünïcode 模型.onnx"
    weird.parent.mkdir()
    shutil.copyfile(rel_models[0], weird)
    ext_dir = tmp_path / "外部 data"
    ext = models.conv_net(ext_dir / "ext model é.onnx", layers=2, channels=8, seed=5, external_data=True)
    cache = ctxcache.ContextCache(tmp_path / "cäche with spaces")
    first = cache.load(weird, providers=qnn_providers)
    assert first.outcome == "miss" and output_digest(first) == reference(rel_models[0])
    assert cache.load(weird, providers=qnn_providers).outcome == "hit"
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"  # same bytes, same key
    r = cache.load(ext, providers=qnn_providers)
    assert r.outcome == "miss" and output_digest(r) == reference(ext)
    assert [e.model_name for e in cache.entries()].count(weird.name) == 1


def test_same_model_by_many_paths_is_one_entry(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    src = rel_models[0]
    d = tmp_path / "paths"
    (d / "sub").mkdir(parents=True)
    shutil.copyfile(src, d / "copy.onnx")
    os.symlink(src, d / "link.onnx")
    os.link(d / "copy.onnx", d / "hard.onnx")
    monkeypatch.chdir(d)
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(src, providers=qnn_providers)
    assert first.outcome == "miss"
    for p in [d / "copy.onnx", d / "link.onnx", d / "hard.onnx", "copy.onnx", "sub/../copy.onnx", str(src).encode()
              if False else Path(str(src)), src.read_bytes()]:
        r = cache.load(p, providers=qnn_providers)
        assert r.outcome == "hit" and r.key == first.key, (p if not isinstance(p, bytes) else "<bytes>", r)
        assert output_digest(r) == reference(src)
    assert len(cache.entries()) == 1


# -- a model over 2 GB with external data --------------------------------------------------------
def _big_external_model(d: Path) -> Path:
    """A conv whose weights live in a 2.07 GB (sparse) external-data file, past the 2**31 offset."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32)
    offset = (1 << 31) + 4096
    data = d / "big weights.data"
    with open(data, "wb") as f:
        f.truncate(offset + (64 << 20))  # sparse: no disk space used
        f.seek(offset)
        f.write(w.tobytes())
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=w.shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
        t.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["output"])],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 16, 32, 32])],
        [t],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = d / "big model.onnx"
    onnx.save(m, str(path))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
def test_model_over_2gb_with_external_data(tmp_path: Path, qnn_providers: list[Any]) -> None:
    from _child import run_python

    model = _big_external_model(tmp_path)
    data = tmp_path / "big weights.data"
    assert data.stat().st_size > (1 << 31)
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(model, providers=qnn_providers)
    assert first.outcome == "miss", first
    assert output_digest(first) == reference(model)
    second = ctxcache.ContextCache(tmp_path / "cache").load(model, providers=qnn_providers)
    assert second.outcome == "hit" and second.timings.hash < 0.5, second.timings  # the stat memo, not 2 GB read
    # Hashing streams: memory stays flat whatever the data size (measured in a fresh process).
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child of a big pytest process reports its parent's peak.
    peak_kib = run_python(
        "import sys; from pathlib import Path; from ctxcache._hashing import model_digest; from _report import report;"
        "model_digest(Path(sys.argv[1]), None);"
        "report(int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]))", str(model),
    ).result
    assert peak_kib < 300 * 1024, f"peak RSS {peak_kib} KiB while hashing 2 GB"
    # A byte changed past 2**31 (in the weights) is a new key, and the outputs follow the new weights.
    with open(data, "r+b") as f:
        f.seek((1 << 31) + 4096 + 3)  # the sign byte of the first weight
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x80]))
    third = ctxcache.ContextCache(tmp_path / "cache").load(model, providers=qnn_providers)
    assert third.outcome == "miss" and third.key != first.key, third
    changed = reference(model, fresh=True)
    assert changed != output_digest(first) and output_digest(third) == changed
