"""On-disk layout, lookup, integrity checks and atomic publish of entries (taking them out: ``_removal``;
what housekeeping may delete: ``_housekeeping``; paths and shared helpers: ``_storebase``).

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
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from . import _fs, _manifest
from ._hashing import file_digest, signature
from ._housekeeping import Housekeeping
from ._log import log
from ._manifest import CONTEXT, MANIFEST, Entry
from ._onnxproto import WireError, read_facts
from ._removal import Removal
from ._storebase import _SUBFOLDERS, InsecureCache


class BrokenEntry(Exception):
    """An entry folder exists but cannot be used. ``code`` is a reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class Store(Removal, Housekeeping):
    """One cache folder's entries. Knows where things are and how to change them safely; no policy.

    Paths and the small shared helpers are :class:`~ctxcache._storebase.StoreBase`; taking entries out
    is :class:`~ctxcache._removal.Removal`; what housekeeping may delete, :class:`~ctxcache._housekeeping.Housekeeping`.
    """

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

    # -- listing ------------------------------------------------------------------------------
    def iter_entries(self) -> Iterator[Entry | tuple[str, BrokenEntry]]:
        for key in self.list_keys():
            try:
                entry = self.lookup(key)
            except BrokenEntry as e:
                yield (key, e)
                continue
            if entry is not None:
                yield entry
