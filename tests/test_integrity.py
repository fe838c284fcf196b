"""Integrity of the hit: what is served is verified by content, the bytes compiled are the bytes hashed,
and every folder the cache reads or writes is checked.

Real faults on real filesystems: an ext4 image loop-mounted here, damaged at block level while
unmounted (bit rot: bytes change, no stat field does), and a read-only image whose new model version
keeps the old one's inode and timestamps. Needs root (mount); skipped, saying so, where it cannot mount.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _child import Child, dead_pid
from conftest import QNN, Layout, layout, output_digest, run_python
from test_reliability_support import reference

import ctxcache
from ctxcache._seams import hooks


# -- a real filesystem image -------------------------------------------------------------------------
def sbin(tool: str) -> str:
    """The path of a filesystem tool: a plain user's PATH often lacks the sbin folders where they live."""
    found = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]))
    if found is None:
        pytest.skip(f"{tool} is not installed here (e2fsprogs)")
    return found


class Image:
    """An ext4 image file, mounted on ``mnt`` with a loop device; damaged through the image file while unmounted."""

    def __init__(self, root: Path, size_mb: int = 96) -> None:
        self.file = root / "disk.img"
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        with open(self.file, "wb") as f:
            f.truncate(size_mb << 20)
        for cmd in ([sbin("mkfs.ext4"), "-q", "-F", "-b", "4096", str(self.file)],):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot make an ext4 image here ({' '.join(cmd[:1])}): {proc.stderr.strip()}")
        self.mount()

    def mount(self, *opts: str) -> None:
        proc = subprocess.run(["mount", "-o", ",".join(("loop", *opts)), str(self.file), str(self.mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot loop-mount an image here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def umount(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)

    def blocks(self, rel: str) -> list[int]:
        """The physical 4 KiB blocks of a file in the image (unmounted), in file order."""
        out = subprocess.run([sbin("debugfs"), "-R", f"blocks /{rel}", str(self.file)], capture_output=True, text=True, check=True)
        return [int(b) for b in out.stdout.split()]

    def write_at(self, rel: str, offset: int, data: bytes) -> None:
        """Write ``data`` into the file's bytes at ``offset`` through the image, as a disk would corrupt it."""
        blocks = self.blocks(rel)
        with open(self.file, "r+b") as f:
            for i, b in enumerate(data):
                pos = offset + i
                f.seek(blocks[pos // 4096] * 4096 + pos % 4096)
                f.write(bytes([b]))


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Image]:
    img = Image(tmp_path)
    try:
        yield img
    finally:
        subprocess.run(["umount", str(img.mnt)], capture_output=True)


def _stat(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


LOAD = """
import json, sys
from _report import report
import ctxcache
from ctxcache import models
cache = ctxcache.ContextCache(sys.argv[1], verify=sys.argv[3])
r = cache.load(sys.argv[2], providers=[("QNNExecutionProvider", models.qnn_htp_options())])
import numpy as np, xxhash
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
report({"outcome": r.outcome, "reason": r.reason.code if r.reason else None, "key": r.key,
        "digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())})
"""


def _launch(cache_dir: Path, model: Path, verify: str = "content") -> dict[str, Any]:
    return run_python(LOAD, str(cache_dir), str(model), verify).result  # type: ignore[no-any-return]


# -- 1. content changes that no stat signature sees ---------------------------------------------------
def test_bit_rot_in_a_context_is_caught_at_the_hit(image: Image, rel_models: list[Path]) -> None:
    """One byte of the cached .bin changes on disk (block level); size, mtime, ctime, inode stay."""
    model = rel_models[0]
    cache_dir = image.mnt / "cache"
    first = _launch(cache_dir, model)
    assert first["outcome"] == "miss"
    key = first["key"]
    assert _launch(cache_dir, model)["outcome"] == "hit"
    rel = f"cache/v1/entries/{key}/ctx_qnn.bin"
    bin_path = image.mnt / rel
    before = _stat(bin_path)
    size = before[0]
    image.umount()
    # An odd offset in the middle: a byte of fp16 weights that holds exponent bits (visible in outputs).
    offset = (size // 2) | 1
    with open(image.file, "rb") as f:
        f.seek(image.blocks(rel)[offset // 4096] * 4096 + offset % 4096)
        old = f.read(1)
    image.write_at(rel, offset, bytes([old[0] ^ 0xFF]))
    image.mount()
    assert _stat(bin_path) == before  # no stat field moved: only the bytes did
    # The class in action: trusting the stat signature serves the damaged binary (wrong outputs).
    blind = _launch(cache_dir, model, verify="stat")
    assert blind["outcome"] == "hit" and blind["digest"] != reference(model)
    # The default re-hashes what it serves: a fallback with correct outputs, then a recompile.
    r = _launch(cache_dir, model)
    assert (r["outcome"], r["reason"]) == ("fallback", "artifact_digest") and r["digest"] == reference(model)
    healed = _launch(cache_dir, model)
    assert healed["outcome"] == "miss" and healed["digest"] == reference(model)
    assert _launch(cache_dir, model)["outcome"] == "hit"


def test_a_new_model_in_a_read_only_image_with_the_same_inode_and_timestamps(image: Image, tmp_path: Path,
                                                                             rel_models: list[Path]) -> None:
    """A reproducible read-only image (Android system image, OSTree, snap): every file has one fixed
    timestamp, and the next version's model keeps the inode. The stat memo must not vouch for it."""
    v1, v2 = rel_models[0], rel_models[1]
    assert v1.stat().st_size == v2.stat().st_size  # same architecture, other weights
    shutil.copyfile(v1, image.mnt / "model.onnx")
    os.utime(image.mnt / "model.onnx", ns=(1230768000 * 10**9, 1230768000 * 10**9))  # 2009-01-01, as AOSP builds
    image.umount()
    image.mount("ro")
    model = image.mnt / "model.onnx"
    cache_dir = tmp_path / "cache"
    first = _launch(cache_dir, model)
    assert first["outcome"] == "miss" and first["digest"] == reference(v1)
    assert _launch(cache_dir, model)["outcome"] == "hit"
    before = _stat(model)
    image.umount()
    image.write_at("model.onnx", 0, v2.read_bytes())  # the image's next version, same blocks and inode
    image.mount("ro")
    assert _stat(model) == before  # size, mtime, ctime, inode and device all the same
    r = _launch(cache_dir, model)
    assert r["outcome"] == "miss" and r["key"] != first["key"], r
    assert r["digest"] == reference(v2)  # the new weights' outputs, not the old context's


# -- 2. the bytes compiled are the bytes hashed ---------------------------------------------------------
@pytest.mark.parametrize("how", ["replaced", "rewritten_in_place"])
def test_a_model_updated_during_its_compile_is_not_published(tmp_path: Path, rel_models: list[Path],
                                                             qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch,
                                                             how: str) -> None:
    """An updater swaps the model while ctxcache compiles it (after hashing it). Publishing would put the
    new model's context under the old bytes' key, for good."""
    model = tmp_path / "model.onnx"
    shutil.copyfile(rel_models[0], model)
    real = hooks.compile
    swapped: list[str] = []

    def compile_then_update(*a: Any, **k: Any) -> float:
        seconds = real(*a, **k)
        if how == "replaced":  # a new file renamed over the old one (the usual updater)
            shutil.copyfile(rel_models[1], tmp_path / "new.onnx")
            os.replace(tmp_path / "new.onnx", model)
        else:  # the same file rewritten, its mtime put back
            st = model.stat()
            model.write_bytes(rel_models[1].read_bytes())
            os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
        swapped.append(how)
        return seconds

    monkeypatch.setattr(hooks, "compile", compile_then_update)
    cache = ctxcache.ContextCache(tmp_path / "cache")
    r = cache.load(model, providers=qnn_providers)
    assert swapped and (r.outcome, r.reason.code if r.reason else None) == ("fallback", "source_changed"), r
    assert output_digest(r) == reference(rel_models[1])  # the session is on the model as it is now
    assert layout(cache).keys() == []  # nothing published under the old bytes' key
    monkeypatch.setattr(hooks, "compile", real)
    again = cache.load(model, providers=qnn_providers)
    assert again.outcome == "miss" and output_digest(again) == reference(rel_models[1])
    hit = ctxcache.ContextCache(tmp_path / "cache").load(model, providers=qnn_providers)
    assert hit.outcome == "hit" and output_digest(hit) == reference(rel_models[1])


def test_a_memo_that_vouches_for_bytes_that_changed_is_dropped_at_the_compile(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]
) -> None:
    """If the memo ever vouches for stale bytes (here: its identity forged to match), the miss that
    compiles them notices before publishing, and forgets the memo."""
    import json

    model = tmp_path / "model.onnx"
    shutil.copyfile(rel_models[0], model)
    cache = ctxcache.ContextCache(tmp_path / "cache")
    layout(cache).ensure()
    fp = cache.key(model, providers=qnn_providers)  # hashes v1, writes the memo; nothing is compiled
    assert fp is not None
    shutil.copyfile(rel_models[1], model)  # v2, same size
    memos = [p for p in layout(cache).memo_dir.glob("*.json") if json.loads(p.read_text()).get("key") == str(model)]
    assert memos
    memo = memos[0]
    data = json.loads(memo.read_text())
    from ctxcache._hashing import identity

    data["files"][0][1] = identity(str(model))  # the forgery: "the file is the one I hashed"
    memo.write_text(json.dumps(data))
    r = cache.load(model, providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("fallback", "source_changed")
    assert output_digest(r) == reference(rel_models[1]) and not memo.exists()
    again = cache.load(model, providers=qnn_providers)
    assert again.outcome == "miss" and again.key != fp.key and output_digest(again) == reference(rel_models[1])


# -- 3. every folder the cache reads from or writes into ------------------------------------------------
FOLDERS = ["", "v1", "v1/entries", "v1/staging", "v1/quarantine", "v1/locks", "v1/memo", "v1/markers", "v1/negative"]


@pytest.mark.parametrize("folder", [*FOLDERS, "entry"])
@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_folder_others_can_write_is_never_trusted(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any],
                                                   folder: str, mode: int) -> None:
    """Another user who can write any folder of the cache could plant a context under a key."""
    cache_dir = tmp_path / "cache"
    first = ctxcache.ContextCache(cache_dir).load(rel_models[0], providers=qnn_providers)
    assert first.outcome == "miss" and first.key
    target = Layout(cache_dir).entry_path(first.key) if folder == "entry" else cache_dir / folder
    os.chmod(target, mode)
    if mode & stat.S_IWGRP and not mode & stat.S_IWOTH:
        # Group-writable is refused unless the group is the user's private one (as ssh accepts): give
        # the folder a shared group where this process may (root), else say why this case is skipped.
        import grp

        shared = next((g.gr_gid for g in grp.getgrall() if g.gr_name in ("users", "nogroup", "staff")), None)
        try:
            assert shared is not None
            os.chown(target, -1, shared)
        except (AssertionError, PermissionError):
            pytest.skip("cannot give the folder a shared group here (needs root, and a 'users' or 'nogroup' group)")
    r = ctxcache.ContextCache(cache_dir).load(rel_models[0], providers=qnn_providers)
    expected = {"entry": ("fallback", "entry_not_folder")}.get(folder, ("bypass", "cache_insecure"))
    assert (r.outcome, r.reason.code if r.reason else None) == expected, r
    assert output_digest(r) == reference(rel_models[0]) and r.providers[0] == QNN
    if folder == "entry":  # an entry others could have written into is quarantined, and rebuilt
        assert not target.exists() and any(Layout(cache_dir).quarantine_dir.iterdir())
        assert ctxcache.ContextCache(cache_dir).load(rel_models[0], providers=qnn_providers).outcome == "miss"
    else:
        assert target.is_dir()  # refused, never deleted: the cache folder is the user's to fix


def test_cli_commands_never_write_through_a_planted_subfolder_link(tmp_path: Path, rel_models: list[Path],
                                                                   qnn_providers: list[Any]) -> None:
    """A subfolder replaced by a link to a folder outside the cache: a load, verify, prune, clear and
    stats neither follow it nor touch what it points at."""
    cache_dir = tmp_path / "cache"
    cache = ctxcache.ContextCache(cache_dir)
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    for sub in ("quarantine", "staging", "memo", "markers", "negative", "locks"):
        d = cache_dir / "v1" / sub
        shutil.rmtree(d)
        d.symlink_to(outside)
        r = ctxcache.ContextCache(cache_dir).load(rel_models[0], providers=qnn_providers)
        assert (r.outcome, r.reason.code if r.reason else None) == ("bypass", "cache_insecure"), (sub, r)
        c = ctxcache.ContextCache(cache_dir)
        c.verify_entries(fix=True)
        c.prune(max_size=0)
        c.clear()
        c.stats()
        assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"], sub
        assert (outside / "precious.txt").read_text() == "keep me"
        d.unlink()
        d.mkdir(mode=0o700)
    proc = run_python(f"""
import ctxcache
from ctxcache import models
from _report import report
report(ctxcache.ContextCache({str(cache_dir)!r}).load({str(rel_models[0])!r},
       providers=[("QNNExecutionProvider", models.qnn_htp_options())]).outcome)
""")
    assert proc.result in ("hit", "miss")


# -- 6. a lock holder that is alive but makes no progress ------------------------------------------------
HOLDER = r"""
import os, signal, sys, time
from _report import report
import ctxcache
from ctxcache import models
from ctxcache._seams import hooks
how = sys.argv[3]
real = hooks.compile
def compile_and_stall(*a, **k):
    report("COMPILING")
    if how == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)   # a frozen process (SIGSTOP, a frozen cgroup)
    elif how == "pipe":
        sys.stdout.write("x" * (1 << 24))       # stdout is a pipe nobody reads: blocks here
        sys.stdout.flush()
    elif how == "busy":
        t = time.process_time()
        while time.process_time() - t < 8:      # a slow compile that is working
            pass
    return real(*a, **k)
hooks.compile = compile_and_stall
r = ctxcache.ContextCache(sys.argv[1]).load(sys.argv[2], providers=[("QNNExecutionProvider", models.qnn_htp_options())])
report(f"DONE {r.outcome}")
"""


@pytest.mark.parametrize("how", ["stop", "pipe"])
def test_a_frozen_lock_holder_costs_a_launch_seconds_not_lock_timeout(tmp_path: Path, rel_models: list[Path], how: str) -> None:
    """With ctxcache.InferenceSession's defaults (lock_timeout 600 s), a launch gets a working session in
    seconds while the compiling process is stopped or blocked on a full pipe; the wait is reported."""
    import time

    cache_dir, model = tmp_path / "cache", rel_models[0]
    holder = Child.python(HOLDER, str(cache_dir), str(model), how)  # its stdout: a pipe nobody reads
    try:
        assert holder.next_report() == "COMPILING"
        time.sleep(0.5)
        t = time.monotonic()
        r = _launch(cache_dir, model)
        elapsed = time.monotonic() - t
        assert (r["outcome"], r["reason"]) == ("bypass", "lock_stalled"), r
        assert r["digest"] == reference(model)
        assert elapsed < 15, elapsed  # stall_timeout 5 s + a process start, not 600 s
    finally:
        holder.kill()  # SIGKILL ends a stopped process too
    # The holder is gone: the next launch compiles.
    assert _launch(cache_dir, model)["outcome"] == "miss"


def test_a_slow_compile_that_makes_progress_is_waited_for(tmp_path: Path, rel_models: list[Path]) -> None:
    import time

    cache_dir, model = tmp_path / "cache", rel_models[0]
    holder = Child.python(HOLDER, str(cache_dir), str(model), "busy")
    try:
        assert holder.next_report() == "COMPILING"
        t = time.monotonic()
        r = _launch(cache_dir, model)
        assert r["outcome"] == "hit", r  # it waited for the working compiler, then loaded its entry
        assert time.monotonic() - t > 5 and r["digest"] == reference(model)
    finally:
        holder.kill()


def test_the_key_lock_is_not_held_while_the_fresh_context_loads(tmp_path: Path, rel_models: list[Path],
                                                                 qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import filelock

    cache = ctxcache.ContextCache(tmp_path / "cache")
    free: list[bool] = []

    def verified(entry: Any) -> None:  # right before the context's session is created
        lock = filelock.FileLock(str(layout(cache).lock_path(entry.key)), is_singleton=False)
        try:
            lock.acquire(timeout=0)
            lock.release()
            free.append(True)
        except filelock.Timeout:
            free.append(False)

    monkeypatch.setattr(hooks, "verified", verified)
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    assert free == [True]


# -- 8. bounded disk: max_size and prune count everything the cache keeps -------------------------------
def _junk(cache_dir: Path, key: str) -> dict[str, Path]:
    """Plant the leftovers a long-lived cache accumulates (each as the library itself would name it)."""
    import json
    import time

    lay = Layout(cache_dir)
    pid = dead_pid()
    made = {
        "quarantined": lay.quarantine_dir / f"{key}.{int(time.time())}.abcdef",
        "staging": lay.staging_dir / f"{'d' * 32}.{os.getpid()}.abcd1234",  # pid alive (ours), lock free: dead
        "memo": lay.memo_dir / "0123456789abcdef.json",
        "lock": lay.locks_dir / f"{'e' * 32}.lock",
        "marker": lay.markers_dir / f"{'f' * 32}.{pid}.abcdef",
    }
    made["quarantined"].mkdir()
    (made["quarantined"] / "ctx_qnn.bin").write_bytes(b"q" * 300_000)
    made["staging"].mkdir()
    (made["staging"] / "ctx_qnn.bin").write_bytes(b"s" * 300_000)
    made["memo"].write_text(json.dumps({"format": 2, "key": "/gone/model.onnx", "digest": "0" * 32,
                                        "files": [["/gone/model.onnx", [1, 2, 3, 4, 5]]]}))
    made["lock"].write_bytes(b"")
    old = time.time() - 7200
    os.utime(made["lock"], (old, old))
    made["marker"].write_bytes(b"")
    return made


def test_prune_and_max_size_bound_everything_the_cache_keeps(tmp_path: Path, rel_models: list[Path],
                                                             qnn_providers: list[Any]) -> None:
    cache_dir = tmp_path / "cache"
    cache = ctxcache.ContextCache(cache_dir)
    a = cache.load(rel_models[0], providers=qnn_providers)
    assert a.key
    made = _junk(cache_dir, a.key)
    plan = cache.plan_prune()
    junk = {i.junk_kind for i in plan.items if i.why == "junk"}
    assert junk == set(made), junk
    assert plan.size_before >= 600_000 + sum(e.size for e in cache.entries())
    report = plan.execute()
    assert not report.failed and not any(p.exists() for p in made.values())
    assert [e.key for e in cache.entries()] == [a.key]  # the entry itself is fine and stays
    # A cap: after each compile the cache prunes junk first, then entries, to stay under max_size.
    made = _junk(cache_dir, a.key)
    capped = ctxcache.ContextCache(cache_dir, max_size=sum(e.size for e in cache.entries()) * 3)
    b = capped.load(rel_models[1], providers=qnn_providers)
    assert b.outcome == "miss"
    assert not any(p.exists() for p in made.values())
    assert sorted(e.key for e in capped.entries()) == sorted([a.key, b.key])


def test_clear_leaves_nothing_but_what_a_live_process_holds(tmp_path: Path, rel_models: list[Path],
                                                            qnn_providers: list[Any]) -> None:
    from test_reliability_support import hold_lock

    cache_dir = tmp_path / "cache"
    cache = ctxcache.ContextCache(cache_dir)
    a = cache.load(rel_models[0], providers=qnn_providers)
    assert a.key
    made = _junk(cache_dir, a.key)
    lay = Layout(cache_dir)
    holder = hold_lock(lay.lock_path("9" * 32), 600)  # a compile running elsewhere
    try:
        live = lay.new_staging("9" * 32, pid=holder.pid)
        assert cache.clear() == 1
        assert not any(p.exists() for p in made.values())
        assert live.is_dir() and lay.lock_path("9" * 32).exists()
        assert not any(lay.entries_dir.iterdir()) and not any(lay.memo_dir.iterdir())
        assert not any(lay.negative_dir.iterdir()) and not any(lay.quarantine_dir.iterdir())
    finally:
        holder.kill()
        holder.wait()


# -- 9. bad input: a clear one-line error, nothing changed ------------------------------------------------
@pytest.mark.parametrize("options", [{"soc_model": True}, {"soc_model": -3}, {"htp_arch": "73a"},
                                     {"soc_model": 10**15}, {"vtcm_mb": 4.5}, {"enable_htp_fp16_precision": 2},
                                     {"enable_htp_fp16_precision": "yes"}])
def test_option_values_wrong_for_the_option_are_refused_before_anything_is_written(
    tmp_path: Path, rel_models: list[Path], qnn_options: dict[str, str], options: dict[str, Any]
) -> None:
    cache_dir = tmp_path / "cache"
    with pytest.raises(ctxcache.errors.ProviderOptionError) as info:
        ctxcache.ContextCache(cache_dir).load(rel_models[0], providers=[(QNN, {**qnn_options, **options})])
    (name,) = options
    assert name in str(info.value) and "\n" not in str(info.value) and info.value.option == name
    assert not cache_dir.exists()


def _bundle_folder(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> Path:
    src = ctxcache.ContextCache(tmp_path / "src")
    assert src.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    return ctxcache.export_bundle(src, tmp_path / "app" / "bundle").path


def test_a_nesting_bomb_index_is_one_clear_refusal(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    bundle = _bundle_folder(tmp_path, rel_models, qnn_providers)
    (bundle / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    cache = ctxcache.ContextCache(tmp_path / "dst", trusted_dirs=[tmp_path / "app"])
    with pytest.raises(ctxcache.errors.BundleError) as info:
        ctxcache.import_bundle(cache, bundle)
    assert "index.json" in str(info.value) and "\n" not in str(info.value) and "Recursion" in str(info.value)
    # As a tier: a warning, then a compile; never a RecursionError in the app.
    tiered = ctxcache.ContextCache(tmp_path / "dst2", trusted_dirs=[tmp_path / "app"], tiers=[bundle])
    r = tiered.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "miss" and output_digest(r) == reference(rel_models[0])


def test_import_while_the_key_lock_is_busy_is_a_lock_timeout_error(tmp_path: Path, rel_models: list[Path],
                                                                  qnn_providers: list[Any]) -> None:
    from test_reliability_support import hold_lock

    bundle = _bundle_folder(tmp_path, rel_models, qnn_providers)
    cache = ctxcache.ContextCache(tmp_path / "dst", trusted_dirs=[tmp_path / "app"], lock_timeout=1.0)
    key = cache.key(rel_models[0], providers=qnn_providers)
    assert key is not None
    Layout(cache.root).ensure()
    holder = hold_lock(Layout(cache.root).lock_path(key.key), 600)
    try:
        with pytest.raises(ctxcache.errors.LockTimeoutError) as info:
            ctxcache.import_bundle(cache, bundle)
        assert key.key[:12] in str(info.value) and "\n" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    assert ctxcache.import_bundle(cache, bundle).installed == (key.key,)


def test_an_entry_larger_than_the_free_space_is_refused_with_the_numbers(tmp_path: Path, rel_models: list[Path],
                                                                        qnn_providers: list[Any]) -> None:
    bundle = _bundle_folder(tmp_path, rel_models, qnn_providers)
    small = tmp_path / "small"
    small.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(small)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        cache = ctxcache.ContextCache(small / "cache", trusted_dirs=[tmp_path / "app"])
        res = ctxcache.import_bundle(cache, bundle)
        (why,) = res.refused.values()
        assert not res.installed and "bytes" in why and "free" in why, why
        assert not any(Layout(small / "cache").staging_dir.iterdir())
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_external_data_that_is_not_a_file_is_a_clear_error_not_a_hang(tmp_path: Path, kind: str) -> None:
    from ctxcache import models

    model = models.conv_net(tmp_path / "m" / "model.onnx", layers=2, channels=8, external_data=True)
    (data,) = [p for p in model.parent.iterdir() if p != model]
    data.unlink()
    os.mkfifo(data) if kind == "fifo" else data.mkdir()
    proc = run_python(f"""
import ctxcache
from ctxcache import errors, models
from _report import report
try:
    ctxcache.ContextCache({str(tmp_path / 'cache')!r}).load({str(model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
except errors.InvalidModelError as e:
    report(f"ERR {{e}}")
""", timeout=60)
    line = proc.result
    assert line.startswith("ERR") and data.name in line and "not a regular file" in line


def test_a_tier_model_name_with_escape_codes_is_only_ever_shown_escaped(
        tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    """A tier's record whose model name carries terminal escape codes (legal in a file name) is taken, and
    every command shows the name escaped (guarantee 18: any name the OS accepts caches; display escapes it)."""
    import json

    from ctxcache.cli import main

    bundle = _bundle_folder(tmp_path, rel_models, qnn_providers)
    index = json.loads((bundle / "index.json").read_text())
    (key,) = index["entries"]
    index["entries"][key]["model"]["name"] = "model\x1b[2J\x1b[31m.onnx"
    (bundle / "index.json").write_text(json.dumps(index))
    cache = ctxcache.ContextCache(tmp_path / "dst", trusted_dirs=[tmp_path / "app"])
    res = ctxcache.import_bundle(cache, bundle)
    assert res.installed, res.refused
    capsys.readouterr()
    assert main(["ls", "--cache-dir", str(tmp_path / "dst")]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and len(cache.entries()) == 1
