"""On-disk layout, manifests, atomic publish, lookup, integrity checks, invalidation.

Layout under the cache root (one folder per format version, so an older ctxcache never misreads a
newer one)::

    v1/
      entries/<key>/        manifest.json, ctx.onnx, ctx_<ep>.bin ...   (one committed entry)
      staging/<key>.<pid>.<rand>/                                      (an entry being built)
      quarantine/<key>.<time>.<rand>/  + reason.json                   (invalidated, kept for a post-mortem)
      locks/<key>.lock      memo/<hash>.json      markers/<key>.<pid>.<rand>
      negative/<key>.json   (models that cannot compile for this key)    events.log (stats)

An entry is staged in its own folder, fsynced, and committed by ONE rename of that folder: a reader
sees a whole entry or none. The manifest is written inside the staging folder before the rename, so a
committed entry always has one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _fs
from ._hashing import file_digest, signature
from ._onnxproto import WireError, read_facts

log = logging.getLogger("ctxcache")

LAYOUT = "v1"
MANIFEST = "manifest.json"
CONTEXT = "ctx.onnx"
MANIFEST_FORMAT = 1
# A manifest is a few KB; anything much larger is damage or an attack (JSON bomb), not ours.
_MAX_MANIFEST = 1 << 20
_KEEP_QUARANTINED = 8
_STAGING_MAX_AGE = 24 * 3600.0
# fullmatch, not match + '$': '$' also matches before a trailing newline ("ctx.onnx\n" passed).
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def safe_name(name: object) -> bool:
    """A plain file name inside an entry: no separators, no '..', no hidden or device names."""
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


class InsecureCache(PermissionError):
    """The cache folder can be written by another user: a context from it could be anyone's (like ssh
    refusing a key file others can write). The load bypasses the cache."""


class BrokenEntry(Exception):
    """An entry folder exists but cannot be used. ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Marker:
    """A crash marker held open (and flocked) while a context loads."""

    path: Path
    fd: int


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def context_path(self) -> Path:
        return self.path / CONTEXT

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return list(self.manifest["artifacts"])

    @property
    def size(self) -> int:
        return sum(int(a["size"]) for a in self.artifacts)

    @property
    def entry_id(self) -> str:
        return str(self.manifest.get("entry_id", ""))

    @property
    def compile_seconds(self) -> float:
        return float(self.manifest.get("compile_seconds", 0.0))

    @property
    def parts(self) -> dict[str, Any]:
        return {label: value for label, value in self.manifest.get("parts", [])}

    def last_used(self) -> float:
        try:
            return os.stat(self.path / MANIFEST).st_mtime
        except OSError:
            return float(self.manifest.get("created", 0.0))


def _check_manifest(data: Any, key: str) -> str | None:
    """``None`` when ``data`` is a manifest this version can use for ``key``, else what is wrong."""
    if not isinstance(data, dict):
        return "not a JSON object"
    fmt = data.get("format")
    if not isinstance(fmt, int):
        return "no format number"
    if fmt > MANIFEST_FORMAT:
        return f"written by a newer ctxcache (format {fmt} > {MANIFEST_FORMAT})"
    if data.get("key") != key:
        return "key does not match its folder"
    arts = data.get("artifacts")
    if not isinstance(arts, list) or not arts or len(arts) > 64:
        return "no artifact list"
    names = set()
    for a in arts:
        if not isinstance(a, dict) or not safe_name(a.get("name")):
            return "artifact with an unsafe or missing name"
        if not isinstance(a.get("size"), int) or not isinstance(a.get("xxh3"), str):
            return "artifact without size or digest"
        sig = a.get("sig")
        if not (isinstance(sig, list) and len(sig) == 4 and all(isinstance(x, int) for x in sig)):
            return "artifact without stat signature"
        names.add(a["name"])
    if CONTEXT not in names:
        return f"no {CONTEXT} artifact"
    parts = data.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in parts
    ):
        return "no key parts"
    # Fields a hit or a listing reads: a wrong type there must be a broken entry, not a TypeError
    # in the app (found by tests/test_reliability_hostile.py).
    for name in ("created", "compile_seconds"):
        if name in data and (not isinstance(data[name], (int, float)) or isinstance(data[name], bool)):
            return f"{name} is not a number"
    for name in ("entry_id", "provider", "ctxcache_version"):
        if name in data and not isinstance(data[name], str):
            return f"{name} is not a string"
    if "model" in data and not isinstance(data["model"], dict):
        return "model is not an object"
    compat = data.get("compat", {})
    if not isinstance(compat, dict) or not all(isinstance(v, str) for v in compat.values()):
        return "compat is not an object of strings"
    return None


def _private_group(gid: int, uid: int) -> bool:
    """Whether ``gid`` is ``uid``'s own user-private group (Debian/Ubuntu: umask 002 makes folders
    group-writable, harmlessly, when nobody else is in the group; Debian's ssh accepts it too)."""
    try:
        import grp
        import pwd

        user = pwd.getpwuid(uid)
        members = grp.getgrgid(gid).gr_mem
    except (ImportError, KeyError, OSError):
        return False
    return gid == user.pw_gid and all(m == user.pw_name for m in members)


class Store:
    def __init__(self, root: Path) -> None:
        self.base = root
        self.root = root / LAYOUT
        self.entries_dir = self.root / "entries"
        self.staging_dir = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        self.locks_dir = self.root / "locks"
        self.memo_dir = self.root / "memo"
        self.markers_dir = self.root / "markers"
        self.negative_dir = self.root / "negative"
        self.events_path = self.root / "events.log"

    # -- setup --------------------------------------------------------------------------------
    _ensured = False

    def ensure(self, *, force: bool = False) -> None:
        """Create the layout, owner-only (a cache others can write into could feed us contexts).

        After one success per Store, a hit only re-checks ``entries/`` (one stat on the hit path);
        the miss path forces the full check, so a cache folder deleted under a running app is rebuilt.
        """
        if self._ensured and not force and self.entries_dir.is_dir():
            return
        # The cache folder and v1/ are created owner-only too (mkdir(parents=True) would give them the
        # umask's 0755); folders above them are the app's business.
        for d in (self.base, self.root):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_owner()
        for d in (
            self.entries_dir,
            self.staging_dir,
            self.quarantine_dir,
            self.locks_dir,
            self.memo_dir,
            self.markers_dir,
            self.negative_dir,
        ):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ensured = True

    def _check_owner(self) -> None:
        """Refuse a cache another user owns or can write into (ssh's StrictModes for key files).

        Whoever can write the cache can hand this process any context to load. Root-owned folders are
        accepted (system-wide installs); group- or world-writable ones are not, whoever owns them.
        """
        if not hasattr(os, "getuid"):
            return  # Windows: ACLs, not mode bits; the per-user app-data folder is private already
        uid = os.getuid()
        for d in (self.base, self.root):
            st = os.stat(d)
            if st.st_uid not in (uid, 0):
                raise InsecureCache(
                    errno.EPERM, f"cache folder {d} is owned by uid {st.st_uid}, not by this user ({uid}); "
                    "use a cache folder of your own", str(d)
                )
            others = stat.S_IWOTH | (0 if _private_group(st.st_gid, uid) else stat.S_IWGRP)
            if st.st_mode & others:
                raise InsecureCache(
                    errno.EPERM, f"cache folder {d} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                    f"run: chmod go-w {d}", str(d)
                )

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK) if self.root.is_dir() else os.access(self.base.parent, os.W_OK)

    def lock_path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    # -- lookup -------------------------------------------------------------------------------
    def entry_path(self, key: str) -> Path:
        return self.entries_dir / key

    def lookup(self, key: str) -> Entry | None:
        """The committed entry for ``key``, ``None`` if there is none. Raises :class:`BrokenEntry`."""
        path = self.entries_dir / key
        mpath = path / MANIFEST
        # lstat first (one syscall, as many as before on a hit, fewer on a miss): an entry folder
        # replaced by a link must not even have its manifest read, let alone its context loaded by ORT.
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise BrokenEntry("entry_not_folder", f"{path} is not an entry folder (a link or a file)")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BrokenEntry("manifest_unreadable", f"cannot stat {path}: {e}") from None
        try:
            # Not a link, FIFO or device: those would read outside the cache or hang the launch.
            raw = _fs.read_regular(mpath, _MAX_MANIFEST)
        except FileNotFoundError:
            raise BrokenEntry("manifest_missing", f"entry {key[:12]} has no manifest") from None
        except OSError as e:
            raise BrokenEntry("manifest_unreadable", f"cannot read {mpath}: {e}") from None
        if len(raw) > _MAX_MANIFEST:
            raise BrokenEntry("manifest_corrupt", f"{mpath} is larger than {_MAX_MANIFEST} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: a nesting bomb ("[[[[...")
            raise BrokenEntry("manifest_corrupt", f"{mpath} is not valid JSON ({type(e).__name__})") from None
        problem = _check_manifest(data, key)
        if problem is not None:
            raise BrokenEntry("manifest_corrupt", f"{mpath}: {problem}")
        return Entry(key, path, data)

    def verify(self, entry: Entry, *, full: bool = False) -> tuple[str, str] | None:
        """Integrity of an entry's artifacts: ``None`` when intact, else ``(code, message)``.

        The quick check compares each artifact's stat signature with the one recorded at publish; a
        mismatch (or ``full=True``) re-hashes that artifact and compares digests. A one-byte flip in a
        QNN .bin loads and runs with silently wrong outputs (FIELD-NOTES), so a changed file is never
        trusted on its size alone. A file whose content still matches gets its new signature recorded,
        so copying a cache folder costs one re-hash, not one per launch.
        """
        refreshed = False
        for art in entry.artifacts:
            path = entry.path / art["name"]
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return ("artifact_missing", f"{path} is missing")
            except OSError as e:
                return ("artifact_unreadable", f"cannot stat {path}: {e}")
            if not stat.S_ISREG(st.st_mode):
                return ("artifact_not_regular", f"{path} is not a regular file (a link?)")
            if st.st_size != art["size"]:
                return ("artifact_size", f"{path} is {st.st_size} bytes, expected {art['size']}")
            if not full and list(signature(st)) == art["sig"]:
                continue
            try:
                digest = file_digest(path)
            except OSError as e:
                return ("artifact_unreadable", f"cannot read {path}: {e}")
            if digest != art["xxh3"]:
                return ("artifact_digest", f"{path} content changed (xxh3 {digest[:12]} != {art['xxh3'][:12]})")
            if list(signature(st)) != art["sig"]:
                art["sig"] = list(signature(st))
                refreshed = True
        problem = self._context_problem(entry)
        if problem is not None:
            return problem
        if refreshed:
            try:
                _fs.atomic_write(entry.path / MANIFEST, json.dumps(entry.manifest, indent=1).encode())
            except OSError as e:
                log.debug("could not refresh signatures of %s: %s", entry.path, e)
        return None

    def _context_problem(self, entry: Entry) -> tuple[str, str] | None:
        """Every file the context model makes ORT open must be one of the entry's verified artifacts.

        Checked at every hit, not only at publish: a digest check alone cannot stop someone who can
        write the cache and re-seal the manifest, and ORT follows a symlink (QNN refuses only absolute
        and '..' paths; other providers may refuse nothing). About 60 us for a context model.
        """
        names = {a["name"] for a in entry.artifacts} - {CONTEXT, MANIFEST}
        ctx = entry.context_path
        try:
            facts = read_facts(ctx, ep_context=True)
        except (WireError, OSError) as e:
            return ("artifact_unreadable", f"cannot read {ctx}: {e}")
        refs = set(facts.external_locations)
        for node in facts.ep_context_nodes:
            if node.embed_mode == 0:
                refs.add(node.cache_context.decode("utf-8", errors="replace"))
        for ref in sorted(refs):
            if ref not in names or not safe_name(ref):
                return ("unsafe_context", f"{ctx} refers to {ref!r}, which is not a verified file of its entry")
        return None

    def touch(self, entry: Entry) -> None:
        """Record a use (the manifest's mtime is the entry's last-used time for LRU pruning)."""
        try:
            os.utime(entry.path / MANIFEST, follow_symlinks=False)
        except (OSError, NotImplementedError):
            pass

    # -- publish ------------------------------------------------------------------------------
    def new_staging(self, key: str) -> Path:
        path = self.staging_dir / f"{key}.{os.getpid()}.{os.urandom(4).hex()}"
        path.mkdir(mode=0o700)
        return path

    def publish(self, staging: Path, key: str, manifest: dict[str, Any]) -> Entry:
        """Fill in artifact digests, write the manifest, fsync, and commit by one rename.

        The caller holds the key's lock. An entry already at the target (which the caller decided to
        replace) is moved aside first: POSIX cannot rename a folder onto a non-empty one.
        """
        artifacts = []
        for child in sorted(staging.iterdir()):
            if child.name == MANIFEST:
                continue
            if not child.is_file() or child.is_symlink() or not safe_name(child.name):
                raise BrokenEntry("compile_output", f"unexpected compiler output {child}")
            _fs.fsync_file(child)
            st = os.lstat(child)
            artifacts.append(
                {"name": child.name, "size": st.st_size, "xxh3": file_digest(child), "sig": list(signature(st))}
            )
        manifest = dict(manifest, format=MANIFEST_FORMAT, key=key, artifacts=artifacts)
        manifest.setdefault("entry_id", os.urandom(8).hex())
        problem = _check_manifest(manifest, key)
        if problem is not None:
            raise BrokenEntry("compile_output", f"compiled entry is unusable: {problem}")
        _fs.atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fs.fsync_dir(staging)
        target = self.entries_dir / key
        if target.exists():
            self._discard(target)
        os.rename(staging, target)
        _fs.fsync_dir(self.entries_dir)
        return Entry(key, target, manifest)

    # -- removal ------------------------------------------------------------------------------
    def _discard(self, path: Path) -> bool:
        """Remove a folder atomically from readers' view (rename), then delete it.

        Never raises: on a read-only cache the rename fails, and a cache fault must not become an app
        error (found by tests/test_reliability_disk.py). Junk that is a file, not a folder, goes too.
        """
        trash = self.staging_dir / f"trash.{path.name}.{os.urandom(4).hex()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e.strerror or e)
            return False
        _fs.remove_tree(trash)
        return True

    def quarantine(self, key: str, code: str, message: str, expect_id: str | None = None) -> bool:
        """Move ``key``'s entry out of the way, keeping it and the reason for a post-mortem.

        ``expect_id`` guards a race: the entry we judged broken may already have been replaced by a
        fresh one from another process; that one must not be thrown away.
        """
        src = self.entries_dir / key
        if expect_id is not None:
            try:
                current = json.loads(_fs.read_regular(src / MANIFEST, _MAX_MANIFEST)).get("entry_id")
            except (OSError, ValueError, AttributeError, RecursionError):
                current = None
            if current is not None and current != expect_id:
                return False
        if os.path.islink(src):
            # A link planted as an entry: nothing of ours to keep, and reason.json would be written
            # through it into the folder it points at.
            return self._discard(src)
        dst = self.quarantine_dir / f"{key}.{int(time.time())}.{os.urandom(3).hex()}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.debug("could not quarantine %s (%s); deleting it", src, e)
            return self._discard(src)
        try:
            (dst / "reason.json").write_text(json.dumps({"code": code, "message": message, "time": time.time()}))
        except OSError:
            pass
        self._trim_quarantine()
        return True

    def crash_count(self, key: str) -> int:
        """How many quarantined entries of ``key`` killed the process that loaded them."""
        n = 0
        try:
            names = [x for x in os.listdir(self.quarantine_dir) if x.startswith(key + ".")]
        except OSError:
            return 0
        for name in names:
            try:
                data = json.loads(_fs.read_regular(self.quarantine_dir / name / "reason.json", 1 << 16))
            except (OSError, ValueError, RecursionError):
                continue
            if isinstance(data, dict) and data.get("code") == "crashed_during_load":
                n += 1
        return n

    def _trim_quarantine(self) -> None:
        try:
            # lstat: one dangling link here must not stop the trimming for good (unbounded growth).
            items = sorted(self.quarantine_dir.iterdir(), key=lambda p: os.lstat(p).st_mtime, reverse=True)
        except OSError:
            return
        for old in items[_KEEP_QUARANTINED:]:
            _fs.remove_tree(old)

    def remove(self, key: str) -> bool:
        path = self.entries_dir / key
        if not os.path.lexists(path):  # lexists: a dangling link planted as an entry is removed too
            return False
        return self._discard(path)

    def clean_staging(self) -> int:
        """Delete staging folders left by dead processes (kill -9 mid-compile) and old trash."""
        removed = 0
        now = time.time()
        try:
            children = list(self.staging_dir.iterdir())
        except OSError:
            return 0
        for child in children:
            parts = child.name.split(".")
            dead = False
            if parts[0] == "trash":
                dead = True
            elif len(parts) == 3 and parts[1].isdigit():
                dead = not _fs.pid_alive(int(parts[1]))
                if not dead:
                    # Its compile is running: never judge it by age. A device that boots with its clock
                    # in 1970 and gets NTP time mid-compile makes a live folder look decades old
                    # (tests/test_reliability_concurrency.py).
                    continue
            try:
                old = now - os.lstat(child).st_mtime > _STAGING_MAX_AGE
            except OSError:
                continue
            if dead or old:
                _fs.remove_tree(child)
                removed += 1
        return removed

    # -- listing ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.entries_dir) if _KEY_RE.fullmatch(n))
        except OSError:
            return []

    def iter_entries(self) -> Iterator[Entry | tuple[str, BrokenEntry]]:
        for key in self.keys():
            try:
                entry = self.lookup(key)
            except BrokenEntry as e:
                yield (key, e)
                continue
            if entry is not None:
                yield entry

    # -- crash markers ------------------------------------------------------------------------
    # A marker is named <key>.<pid>.<rand> and, where flock exists, held under flock while the load runs
    # (content "flock"). The pid alone is not enough: a container's app is pid 1 at every start, so after
    # it died in a load the restarted app would see "pid 1 is alive" and load the killer context again,
    # forever (tests/test_reliability_kill.py). The kernel drops the flock when the holder dies, so a
    # marker whose lock can be taken is a dead loader's, whoever has that pid now.
    _MARKER_LOCKED = b"flock\n"

    def mark_loading(self, key: str) -> _Marker | None:
        """Leave a marker while a context loads; one that outlives its process means the load killed it."""
        path = self.markers_dir / f"{key}.{os.getpid()}.{os.urandom(3).hex()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            log.debug("could not write load marker %s: %s", path, e)
            return None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, self._MARKER_LOCKED)
        except (ImportError, OSError):
            pass  # the pid in the name still works where pids are not reused
        return _Marker(path, fd)

    def clear_marker(self, marker: _Marker | None) -> None:
        if marker is None:
            return
        # Unlink before closing: closed first, the marker would sit unlocked for a moment and read as
        # a dead loader's.
        try:
            os.unlink(marker.path)
        except OSError:
            pass
        try:
            os.close(marker.fd)
        except OSError:
            pass

    def _dead_marker(self, name: str) -> bool:
        parts = name.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return False
        if not _fs.pid_alive(int(parts[1])):
            return True
        try:
            import fcntl
        except ImportError:
            return False
        try:
            fd = os.open(self.markers_dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return False
        try:
            if os.read(fd, 16) != self._MARKER_LOCKED:
                return False  # not (yet) locked by its writer: its pid is all there is to go by
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return False  # its loader holds it: a load in progress
            return True  # nobody holds it: that loader is dead and its pid belongs to another process
        finally:
            os.close(fd)

    def poisoned(self, key: str) -> bool:
        """Whether a process died while loading this key's context (its marker survived it)."""
        prefix = key + "."
        found = False
        try:
            names = [n for n in os.listdir(self.markers_dir) if n.startswith(prefix)]
        except OSError:
            return False
        for name in names:
            if self._dead_marker(name):
                found = True
                try:
                    os.unlink(self.markers_dir / name)
                except OSError:
                    pass
        return found

    # -- negative cache -----------------------------------------------------------------------
    def remember_failure(self, key: str, code: str, message: str) -> None:
        try:
            _fs.atomic_write(
                self.negative_dir / f"{key}.json",
                json.dumps({"code": code, "message": message, "time": time.time()}).encode(),
                durable=False,
            )
        except OSError as e:
            log.debug("could not remember compile failure for %s: %s", key[:12], e)

    def failure(self, key: str, ttl: float) -> dict[str, Any] | None:
        path = self.negative_dir / f"{key}.json"
        try:
            data = json.loads(_fs.read_regular(path, 1 << 16))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("time"), (int, float)):
            return None
        if abs(time.time() - data["time"]) > ttl:
            return None
        return data

    def forget_failures(self) -> None:
        shutil.rmtree(self.negative_dir, ignore_errors=True)
