"""On-disk layout, lookup, integrity checks, atomic publish, and removal of entries.

Layout under the cache root (one folder per layout version, so an older ctxcache never misreads a
newer one)::

    v1/
      entries/<key>/        manifest.json, ctx.onnx, ctx_<ep>.bin ...   (one committed entry)
      staging/<key>.<pid>.<rand>/                                      (an entry being built)
      quarantine/<key>.<time>.<rand>/  + reason.json                   (invalidated, kept for a post-mortem)
      locks/<key>.lock      memo/<hash>.json      markers/<key>.<pid>.<rand>
      negative/<key>.json   (keys that cannot compile or load here)    events.log (stats)
      side/<key>/openvino/, tensorrt_engines/ ...  (a provider's own cache for that key: see side_dir)

An entry is staged in its own folder, fsynced, and committed by ONE rename of that folder: a reader
sees a whole entry or none. The manifest is written inside the staging folder before the rename, so a
committed entry always has one. Every folder is checked with :func:`_fs.check_folder` before it is
read from or written into, and every file goes through :mod:`._fs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from . import _fs, _manifest
from ._hashing import file_digest, signature
from ._log import log
from ._manifest import CONTEXT, MANIFEST, Entry
from ._onnxproto import WireError, read_facts

LAYOUT = "v1"
_KEEP_QUARANTINED = 8
_SUBFOLDERS = ("entries", "staging", "quarantine", "locks", "memo", "markers", "negative", "side")


class InsecureCache(PermissionError):
    """A cache folder is a link, or can be written by another user: a context from it could be anyone's
    (like ssh refusing a key file others can write). The load bypasses the cache."""


class BrokenEntry(Exception):
    """An entry folder exists but cannot be used. ``code`` is a reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Junk(NamedTuple):
    """Something the cache keeps that is not an entry, and may go (see :meth:`Store.junk`)."""

    kind: str
    path: Path
    size: int
    mtime: float


def _memo_alive(path: Path) -> bool:
    """A memo whose files all still exist (the memo of a deleted model is junk)."""
    try:
        data = json.loads(_fs.read_small(path, 1 << 20))
        files = data["files"]
        return bool(files) and all(os.path.exists(f[0]) for f in files)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, IndexError):
        return False


class Problem(NamedTuple):
    """Why an entry's files cannot be served: a reason code and a message."""

    code: str
    message: str


def context_problem(folder: Path, names: set[str]) -> Problem | None:
    """Every file a context model in ``folder`` makes ORT open must be one of ``names`` (plain file names).

    The one EPContext path rule, for a compile's output, a tier's entry and every hit: a context whose
    ``ep_cache_context`` (or external data) is absolute, climbs out with '..', or names anything but a
    verified file of its entry would make ONNX Runtime read files elsewhere. ORT follows a symlink (QNN
    refuses only absolute and '..' paths; other providers may refuse nothing). About 60 us.
    """
    ctx = folder / CONTEXT
    try:
        facts = read_facts(ctx, ep_context=True, opener=_fs.open_regular)
    except (WireError, OSError) as e:
        return Problem("artifact_unreadable", f"cannot read {ctx}: {e}")
    if not facts.ep_context_nodes:
        return Problem("unsafe_context", f"{ctx} has no EPContext node")
    refs = set(facts.external_locations)
    for node in facts.ep_context_nodes:
        # A further partition (main_context=0) naming no file reads the main node's binary: a model
        # that leaves some nodes to CPU compiles into several EPContext nodes and one .bin.
        if node.embed_mode == 0 and (node.main_context != 0 or node.cache_context):
            refs.add(node.cache_context.decode("utf-8", errors="replace"))
    for ref in sorted(refs):
        if ref not in names or not _manifest.safe_name(ref) or ref in (CONTEXT, MANIFEST):
            return Problem("unsafe_context", f"{ctx} refers to {ref!r}, which is not a verified file of its entry")
    return None


class Store:
    """One cache folder's entries. Knows where things are and how to change them safely; no policy."""

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
        self.side_root = self.root / "side"
        self.events_path = self.root / "events.log"

    def __repr__(self) -> str:
        return f"Store({str(self.base)!r})"

    # -- setup --------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the layout, owner-only, and check every folder of it (:func:`_fs.check_folder`).

        At every load, not once per process: the root being safe says nothing about a subfolder someone
        replaced by a link or opened to other users since (``markers/``, ``memo/``, ``negative/``... are
        written into at every launch), and a cache folder deleted under a running app is rebuilt. One
        ``lstat`` per folder when all is well. Raises :class:`InsecureCache` or another ``OSError``.
        """
        try:
            # Folders above the cache root are the app's business; the root and everything in it are ours.
            if not _fs.exists(self.base):
                self.base.parent.mkdir(parents=True, exist_ok=True)
            _fs.make_folder(self.base)
            _fs.make_folder(self.root)
            for name in _SUBFOLDERS:
                _fs.make_folder(self.root / name)
        except _fs.UnsafeFolder as e:
            raise InsecureCache(*e.args) from None

    def check_existing(self) -> None:
        """:meth:`ensure`'s checks on the folders that exist, creating nothing (explain, key: read-only)."""
        for folder in (self.base, self.root, *(self.root / name for name in _SUBFOLDERS)):
            try:
                _fs.check_folder(folder)
            except FileNotFoundError:
                continue
            except _fs.UnsafeFolder as e:
                raise InsecureCache(*e.args) from None

    def writable(self) -> bool:
        """Whether an entry could be compiled into this store: its folder really takes a new file (an
        anonymous one; permission bits say nothing for root or a read-only mount). A store not made yet
        is writable when its nearest existing ancestor is (asked with ``access``: nothing is made there)."""
        if _fs.is_folder(self.root):
            return _fs.can_write(self.root)
        ancestor = self.root
        while not _fs.exists(ancestor) and ancestor.parent != ancestor:
            ancestor = ancestor.parent
        return _fs.is_folder(ancestor) and os.access(ancestor, os.W_OK)

    def longest_path(self) -> int:
        """The longest path this store writes (a staging folder's binary): checked against MAX_PATH."""
        return len(str(self.staging_dir / f"{'0' * 32}.{'0' * 10}.{'0' * 8}" / ("x" * 48)))

    def check(self, folder: Path) -> None:
        """The folder rule for one folder of this store (``InsecureCache`` when it fails)."""
        try:
            _fs.check_folder(folder)
        except _fs.UnsafeFolder as e:
            raise InsecureCache(*e.args) from None

    def lock_path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    def entry_path(self, key: str) -> Path:
        return self.entries_dir / key

    def side_dir(self, key: str) -> Path:
        """Where the providers' own caches for ``key`` live (OpenVINO's blobs, TensorRT's engines and
        timing cache), written by the provider while a session is created, not by ctxcache.

        Beside the entry, not in it: an entry is immutable once published (its manifest lists every file),
        and a provider cache is wanted even when the context is not (served on the original model). It
        goes with its entry (removed, pruned, quarantined together) and is junk once the key has none.
        """
        return self.side_root / key

    def side_size(self, key: str) -> int:
        return _fs.tree_size(self.side_dir(key))

    # -- lookup -------------------------------------------------------------------------------
    def lookup(self, key: str) -> Entry | None:
        """The committed entry for ``key``, ``None`` if there is none. Raises :class:`BrokenEntry`."""
        path = self.entries_dir / key
        mpath = path / MANIFEST
        # lstat first (one syscall): an entry folder replaced by a link must not even have its manifest
        # read, let alone its context loaded by ORT; one others can write into is not ours to trust.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise BrokenEntry("manifest_unreadable", f"cannot stat {path}: {e}") from None
        problem = _fs.folder_problem(st, path)
        if problem is not None:
            raise BrokenEntry("entry_not_folder", problem)
        try:
            raw = _fs.read_small(mpath, _manifest.MAX_BYTES)
        except FileNotFoundError:
            raise BrokenEntry("manifest_missing", f"entry {key[:12]} has no manifest") from None
        except OSError as e:
            raise BrokenEntry("manifest_unreadable", f"cannot read {mpath}: {e}") from None
        try:
            data = _manifest.parse(raw, key, mpath)
        except ValueError as e:
            raise BrokenEntry("manifest_corrupt", str(e)) from None
        if "gone" in data:
            return None  # hidden: removed while another process held its files (see _hide)
        return Entry(key, path, data)

    def verify(self, entry: Entry, *, full: bool = False) -> Problem | None:
        """Integrity of an entry: :meth:`check_files`, then :meth:`check_digests` (every artifact with
        ``full``, else only those whose stat signature changed). ``None`` when intact."""
        return self.check_files(entry) or self.check_digests(entry, only_changed=not full)

    def check_files(self, entry: Entry) -> Problem | None:
        """The cheap part (a few syscalls): every artifact is there, a regular file of its recorded
        size, and the context refers to nothing but them (:func:`context_problem`)."""
        for art in entry.artifacts:
            path = entry.path / art["name"]
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return Problem("artifact_missing", f"{path} is missing")
            except OSError as e:
                return Problem("artifact_unreadable", f"cannot stat {path}: {e}")
            if not stat.S_ISREG(st.st_mode):
                return Problem("artifact_not_regular", f"{path} is not a regular file (a link?)")
            if st.st_size != art["size"]:
                return Problem("artifact_size", f"{path} is {st.st_size} bytes, expected {art['size']}")
        return context_problem(entry.path, {a["name"] for a in entry.artifacts})

    def check_digests(self, entry: Entry, *, only_changed: bool) -> Problem | None:
        """Re-hash the artifacts (all, or with ``only_changed`` those whose stat signature differs from
        the recorded one) and compare with the manifest.

        Stat signatures are a shortcut for deciding what to re-hash, never proof: block-level damage
        (bit rot, a bad flash page, a restored image) changes bytes and no stat field, and one flipped
        byte in a QNN .bin runs with silently wrong outputs. A file whose content still matches gets its
        new signature recorded, so a copied cache costs one re-hash, not one per launch.
        """
        refreshed = False
        for art in entry.artifacts:
            path = entry.path / art["name"]
            try:
                st = os.lstat(path)
                if only_changed and list(signature(st)) == art["sig"]:
                    continue
                digest = file_digest(path)
            except FileNotFoundError:
                return Problem("artifact_missing", f"{path} is missing")
            except OSError as e:
                return Problem("artifact_unreadable", f"cannot read {path}: {e}")
            if digest != art["xxh3"]:
                return Problem("artifact_digest", f"{path} content changed (xxh3 {digest[:12]} != {art['xxh3'][:12]})")
            if list(signature(st)) != art["sig"]:
                art["sig"] = list(signature(st))
                refreshed = True
        if refreshed:
            try:
                _fs.atomic_write(entry.path / MANIFEST, _manifest.dumps(entry.manifest))
            except OSError as e:
                log.debug("could not refresh signatures of %s: %s", entry.path, e)
        return None

    def touch(self, entry: Entry) -> None:
        """Record a use (the manifest's mtime is the entry's last-used time for LRU pruning)."""
        _fs.touch(entry.path / MANIFEST)

    # -- publish ------------------------------------------------------------------------------
    def new_staging(self, key: str) -> Path:
        self.check(self.staging_dir)
        path = self.staging_dir / f"{key}.{os.getpid()}.{os.urandom(4).hex()}"
        os.mkdir(path, 0o700)
        return path

    def discard_staging(self, staging: Path) -> None:
        _fs.remove_tree(staging)

    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        """A private staging folder for one new entry, removed on the way out (whatever was not published
        from it). The one way an entry is made, by a compile or from a tier: fill it, then :meth:`publish`."""
        path = self.new_staging(key)
        try:
            yield path
        finally:
            self.discard_staging(path)

    def publish(self, staging: Path, key: str, manifest: dict[str, Any]) -> Entry:
        """Fill in artifact digests, write the manifest, fsync, and commit by one rename.

        The caller holds the key's lock. An entry already at the target (which the caller decided to
        replace) is moved aside first: POSIX cannot rename a folder onto a non-empty one.
        """
        artifacts = []
        for name, st in sorted(_fs.iter_children(staging)):
            if name == MANIFEST:
                continue
            if not stat.S_ISREG(st.st_mode) or not _manifest.safe_name(name):
                raise BrokenEntry("publish_failed", f"unexpected compiler output {staging / name}")
            _fs.fsync_file(staging / name)
            st = os.lstat(staging / name)
            artifacts.append({"name": name, "size": st.st_size, "xxh3": file_digest(staging / name),
                              "sig": list(signature(st))})
        manifest = dict(manifest, format=_manifest.FORMAT, key=key, artifacts=artifacts)
        manifest.setdefault("entry_id", os.urandom(8).hex())
        # The order entries of one key were published in, for choosing among entries published beside a
        # held one (names are random; a clock step back is harmless: the newest is a tie-break, not a rule).
        manifest["published_ns"] = time.time_ns()
        problem = _manifest.check(manifest, key)
        if problem is not None:
            raise BrokenEntry("publish_failed", f"compiled entry is unusable: {problem}")
        _fs.atomic_write(staging / MANIFEST, _manifest.dumps(manifest))
        _fs.fsync_dir(staging)
        self.check(self.entries_dir)
        target = self.entries_dir / key
        if _fs.exists(target):
            self._discard(target)  # moved away, or (Windows, held open) hidden and still there
        if _fs.exists(target):
            # Windows: the old entry's files are held open by a running session, and a folder holding
            # one cannot be moved. Publish beside it, hidden from plain lookups; the next launch that
            # takes the key's lock serves it from there and promotes it once the old one can go.
            ready = self.staging_dir / f"{key}.ready.{os.urandom(4).hex()}"
            _fs.rename(staging, ready)
            _fs.fsync_dir(self.staging_dir)
            log.info("published %s beside a held entry (%s); it is promoted later", key[:12], ready.name)
            return Entry(key, ready, manifest)
        _fs.rename(staging, target)
        _fs.fsync_dir(self.entries_dir)
        return Entry(key, target, manifest)

    def _ready(self, key: str) -> list[Path]:
        return sorted(self.staging_dir / n for n in _fs.names(self.staging_dir) if n.startswith(f"{key}.ready."))

    def look_again(self, key: str) -> Entry | None:
        """Under the key's lock: the committed entry, or one published beside a held entry (promoted now
        when the old one can finally go, else served from where it is). Raises :class:`BrokenEntry`."""
        ready: list[tuple[int, Path, dict[str, Any]]] = []
        for path in self._ready(key):
            try:
                data = _manifest.parse(_fs.read_small(path / MANIFEST, _manifest.MAX_BYTES), key, path / MANIFEST)
            except (OSError, ValueError):
                _fs.remove_tree(path)  # never committed whole: what the publish left when it died
                continue
            seq = data.get("published_ns")
            ready.append((seq if isinstance(seq, int) and not isinstance(seq, bool) else 0, path, data))
        if ready:
            ready.sort(key=lambda r: (r[0], r[1].name))
            _, newest, data = ready[-1]
            target = self.entries_dir / key
            if _fs.exists(target):
                self._discard(target)
            if not _fs.exists(target):
                try:
                    _fs.rename(newest, target)
                    _fs.fsync_dir(self.entries_dir)
                    for _, stale, _ in ready[:-1]:
                        _fs.remove_tree(stale)
                    return Entry(key, target, data)
                except OSError as e:
                    log.debug("could not promote %s: %s", newest, e)
            return Entry(key, newest, data)
        return self.lookup(key)

    # -- removal ------------------------------------------------------------------------------
    def _discard(self, path: Path) -> bool:
        """Remove a folder atomically from readers' view (rename into staging), then delete it.

        Never raises: on a read-only cache the rename fails, and a cache fault must not become an app
        error. Junk that is a file or a link, not a folder, goes too (never followed).
        """
        trash = self.staging_dir / f"trash.{path.name}.{os.urandom(4).hex()}"
        try:
            self.check(self.staging_dir)
            _fs.rename(path, trash)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _fs.sharing_violation(e) and path.parent == self.entries_dir:
                return self._hide(path, "removed")
            log.warning("cannot remove %s: %s", path, e.strerror or e)
            return False
        _fs.remove_tree(trash)
        return True

    def _hide(self, path: Path, why: str) -> bool:
        """Windows: an entry whose folder cannot be moved (a session holds its files) is hidden at once by
        a tombstone in its manifest (rewritten: the manifest itself is never held open), so no lookup
        returns it; its files go at a later housekeeping, when they are no longer held."""
        try:
            data = json.loads(_fs.read_small(path / MANIFEST, _manifest.MAX_BYTES))
            if not isinstance(data, dict):
                raise ValueError("not a manifest")
            data["gone"] = {"why": why, "time": time.time()}
            _fs.atomic_write(path / MANIFEST, _manifest.dumps(data))
        except (OSError, ValueError, RecursionError) as e:
            try:  # no manifest to rewrite: without one the folder is no entry either
                _fs.ops.unlink(str(path / MANIFEST))
            except FileNotFoundError:
                pass
            except OSError:
                log.warning("cannot hide %s: %s", path, e)
                return False
        log.info("%s is held open by another process; hidden now, deleted later", path)
        return True

    def current_id(self, key: str) -> str | None:
        """The committed entry_id of ``key`` (``None``: absent or unreadable)."""
        try:
            data = json.loads(_fs.read_small(self.entries_dir / key / MANIFEST, _manifest.MAX_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        value = data.get("entry_id") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def quarantine(self, key: str, code: str, message: str, expect_id: str | None = None) -> bool:
        """Move ``key``'s entry out of the way, keeping it and the reason for a post-mortem.

        ``expect_id`` guards a race: the entry judged broken may already have been replaced by a fresh
        one from another process; that one must not be thrown away. The caller holds the key's lock
        (see :meth:`evict`).
        """
        src = self.entries_dir / key
        if expect_id is not None:
            current = self.current_id(key)
            if current is not None and current != expect_id:
                return False
        try:
            st = os.lstat(src)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            # A link or file planted as an entry: nothing of ours to keep, and reason.json would be
            # written through it into the folder it points at.
            return self._discard(src)
        dst = self.quarantine_dir / f"{key}.{int(time.time())}.{os.urandom(3).hex()}"
        try:
            self.check(self.quarantine_dir)
            _fs.rename(src, dst)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _fs.sharing_violation(e):
                return self._hide(src, f"quarantined: {code}")
            log.debug("could not quarantine %s (%s); deleting it", src, e)
            return self._discard(src)
        try:
            note = {"code": code, "message": message, "time": time.time()}
            _fs.write_new(dst / "reason.json", json.dumps(note).encode())
        except OSError:
            pass
        self._quarantine_side(key, dst)
        self._trim_quarantine()
        return True

    def _quarantine_side(self, key: str, dst: Path) -> None:
        """The provider caches of a quarantined entry go with it (they may be why it failed to load)."""
        side = self.side_dir(key)
        try:
            st = os.lstat(side)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                self.check(dst)
                _fs.rename(side, dst / "side")
                return
            except OSError as e:
                log.debug("could not quarantine %s (%s); deleting it", side, e)
        self._discard(side)

    def remove(self, key: str) -> bool:
        path = self.entries_dir / key
        if not _fs.exists(path):  # lexists: a dangling link planted as an entry is removed too
            return False
        gone = self._discard(path)
        if gone:
            self._discard_side(key)
        return gone

    def _discard_side(self, key: str) -> None:
        if _fs.exists(self.side_dir(key)):
            self._discard(self.side_dir(key))

    def evict(self, key: str, code: str, message: str, *, expect_id: str | None = None, keep: bool = True,
              even_if_locked: bool = False) -> bool:
        """Take ``key``'s entry out of the cache: the one rule for who may delete an entry.

        Under the key's lock when it is free: a compiler holding it may be replacing this very entry
        (it finds and handles a broken one itself), so a busy lock means "leave it" unless
        ``even_if_locked`` (a context that killed its loader: left in place, the lock holder or the
        next launch would load it and die again). ``expect_id`` spares an entry replaced meanwhile.
        ``keep`` quarantines (kept for a post-mortem) instead of deleting. Returns whether it went.
        """
        from ._locking import release, try_lock

        try:
            self.check(self.locks_dir)  # filelock creates its file through whatever the folder is
            handle = try_lock(self.lock_path(key))
        except OSError:
            handle = None
        if handle is None and not even_if_locked:
            log.info("entry %s is being rebuilt by another process; leaving it to that process", key[:12])
            return False
        try:
            if keep:
                return self.quarantine(key, code, message, expect_id=expect_id)
            if expect_id is not None and self.current_id(key) not in (None, expect_id):
                return False
            return self.remove(key)
        finally:
            if handle is not None:
                release(handle)

    def crash_count(self, key: str, since: float = 0.0) -> int:
        """How many quarantined entries of ``key`` killed the process that loaded them (after ``since``)."""
        n = 0
        for name in _fs.names(self.quarantine_dir):
            if not name.startswith(key + "."):
                continue
            try:
                data = json.loads(_fs.read_small(self.quarantine_dir / name / "reason.json", 1 << 16))
            except (OSError, ValueError, RecursionError):
                continue
            if (isinstance(data, dict) and data.get("code") == "crashed_during_load"
                    and isinstance(data.get("time"), (int, float)) and data["time"] >= since):
                n += 1
        return n

    def _trim_quarantine(self) -> None:
        items = sorted(_fs.iter_children(self.quarantine_dir), key=lambda c: c[1].st_mtime, reverse=True)
        for name, _st in items[_KEEP_QUARANTINED:]:
            _fs.remove_tree(self.quarantine_dir / name)

    def _staging_dead(self, name: str, holding: str | None) -> bool:
        """Whether a staging folder belongs to a compile that is over (its process died or let go).

        A staging folder only exists while its creator holds the key's lock, and the kernel drops that
        lock when the process dies: a lock that can be taken means a dead compile, whichever process
        has that pid now (pids are reused; a container's app is pid 1 at every start). Never judged by
        age either: a device that boots with its clock in 1970 and gets NTP time mid-compile makes a
        live folder look decades old.
        """
        parts = name.split(".")
        if parts[0] == "trash":
            return True
        if len(parts) == 3 and parts[1] == "ready" and _manifest.is_key(parts[0]):
            # Published beside a held entry: needed until it is promoted, unless a newer entry took its place.
            return self.current_id(parts[0]) not in (None, *self._hidden_ids(parts[0]))
        if len(parts) != 3 or not _manifest.is_key(parts[0]) or not parts[1].isdigit():
            return True  # not a name this store gives: nobody's
        if parts[0] == holding:
            return int(parts[1]) != os.getpid()  # this process holds that key's lock: the folder is not its own
        from ._locking import release, try_lock

        handle = try_lock(self.lock_path(parts[0]))
        if handle is None:
            return False
        release(handle)
        return True

    def clean_staging(self, *, holding: str | None = None) -> int:
        """Delete staging folders of compiles that are over (kill -9 mid-compile) and trash.

        ``holding``: the key whose lock the caller holds (its own leftovers are judged by pid)."""
        removed = 0
        for name, _st in list(_fs.iter_children(self.staging_dir)):
            if self._staging_dead(name, holding) and _fs.remove_tree(self.staging_dir / name):
                removed += 1
        return removed

    # -- junk: everything the cache keeps besides its entries ------------------------------------
    def junk(self, *, negative_ttl: float, lock_age: float = 3600.0, keep_quarantined: int = 0) -> list[Junk]:
        """What housekeeping may delete: quarantined copies (all but the ``keep_quarantined`` newest),
        staging folders of compiles that are over, memos of files that no longer exist, lock files and
        heartbeats of keys without an entry that nobody holds (older than ``lock_age``), dead crash
        markers and death notes of keys without an entry, expired negative records, provider caches
        (:meth:`side_dir`) of keys without an entry."""
        from . import _negative
        from ._markers import _dead

        keys = set(self.list_keys())
        now = time.time()
        out: list[Junk] = []
        quarantined = sorted(_fs.iter_children(self.quarantine_dir), key=lambda c: c[1].st_mtime, reverse=True)
        for name, st in quarantined[keep_quarantined:]:
            out.append(Junk("quarantined", self.quarantine_dir / name, _fs.tree_size(self.quarantine_dir / name), st.st_mtime))
        for name, st in _fs.iter_children(self.entries_dir):
            if _manifest.is_key(name) and stat.S_ISDIR(st.st_mode) and self._hidden(name):
                out.append(Junk("hidden", self.entries_dir / name, _fs.tree_size(self.entries_dir / name), st.st_mtime))
        for name, st in _fs.iter_children(self.staging_dir):
            if self._staging_dead(name, None):
                out.append(Junk("staging", self.staging_dir / name, _fs.tree_size(self.staging_dir / name), st.st_mtime))
        for name, st in _fs.iter_children(self.memo_dir):
            if name.startswith("verdict-"):
                if name.split("-")[1] not in keys:  # the verdict of an entry that is gone
                    out.append(Junk("memo", self.memo_dir / name, st.st_size, st.st_mtime))
            elif not _memo_alive(self.memo_dir / name):
                out.append(Junk("memo", self.memo_dir / name, st.st_size, st.st_mtime))
        for name, st in _fs.iter_children(self.locks_dir):
            key = name.split(".", 1)[0]
            if key in keys or not _manifest.is_key(key) or now - st.st_mtime < lock_age:
                continue
            if name.endswith(".lock.beat") or self._lock_free(key):
                out.append(Junk("lock", self.locks_dir / name, st.st_size, st.st_mtime))
        for name, st in _fs.iter_children(self.markers_dir):
            key = name.split(".", 1)[0]
            if key not in keys and (name.endswith(".deaths") or _dead(self.markers_dir, name)):
                out.append(Junk("marker", self.markers_dir / name, st.st_size, st.st_mtime))
        for name, st in _fs.iter_children(self.negative_dir):
            if not _negative.alive(self.negative_dir / name, negative_ttl):
                out.append(Junk("negative", self.negative_dir / name, st.st_size, st.st_mtime))
        for name, st in _fs.iter_children(self.side_root):
            if name not in keys:
                out.append(Junk("side", self.side_root / name, _fs.tree_size(self.side_root / name), st.st_mtime))
        return out

    def _hidden_ids(self, key: str) -> tuple[str, ...]:
        """The entry_id of ``key``'s committed manifest when it is hidden (a tombstone), else nothing."""
        return (str(self.current_id(key)),) if self._hidden(key) else ()

    def _hidden(self, key: str) -> bool:
        try:
            data = json.loads(_fs.read_small(self.entries_dir / key / MANIFEST, _manifest.MAX_BYTES))
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and "gone" in data

    def _lock_free(self, key: str) -> bool:
        from ._locking import release, try_lock

        handle = try_lock(self.lock_path(key))
        if handle is None:
            return False
        release(handle)
        return True

    def remove_junk(self, item: Junk) -> bool:
        """Delete one junk item (a staging folder or lock is re-judged first: it may have come alive)."""
        if item.kind == "staging" and not self._staging_dead(item.path.name, None):
            return False
        if item.kind == "hidden":
            return self._discard(item.path) and not _fs.exists(item.path)
        if item.kind == "lock" and item.path.name.endswith(".lock") and not self._lock_free(item.path.name[:-5]):
            return False
        if item.kind == "side" and _fs.exists(self.entries_dir / item.path.name):
            return False  # its key got an entry since the plan: the cache belongs to it now
        return _fs.remove_tree(item.path)

    # -- listing ------------------------------------------------------------------------------
    def list_keys(self) -> list[str]:
        return sorted(n for n in _fs.names(self.entries_dir) if _manifest.is_key(n))

    def iter_entries(self) -> Iterator[Entry | tuple[str, BrokenEntry]]:
        for key in self.list_keys():
            try:
                entry = self.lookup(key)
            except BrokenEntry as e:
                yield (key, e)
                continue
            if entry is not None:
                yield entry
