"""What housekeeping may delete: everything a cache keeps besides its entries (quarantined copies, dead
compiles' staging, memos of deleted files, free locks, dead markers, expired records, orphan provider
caches), each judged again just before it goes."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import NamedTuple

from . import _fs, _manifest
from ._storebase import StoreBase


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


class Housekeeping(StoreBase):
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
