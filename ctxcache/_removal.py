"""Taking an entry out of the cache: quarantine (kept with its reason for a post-mortem) or removal, under
the one rule for who may delete an entry (:meth:`Removal.evict`)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from . import _fs
from ._log import log
from ._storebase import StoreBase

_KEEP_QUARANTINED = 8


class Removal(StoreBase):
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
