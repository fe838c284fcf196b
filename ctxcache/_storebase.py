"""The store's layout and the small helpers every part of it shares: where things are, the folder rule,
reading an entry's id, and taking a folder out of readers' view (rename into staging, or, where Windows
holds it open, a tombstone)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import _fs, _manifest
from ._log import log
from ._manifest import MANIFEST

LAYOUT = "v1"
_SUBFOLDERS = ("entries", "staging", "quarantine", "locks", "memo", "markers", "negative", "side")


class InsecureCache(PermissionError):
    """A cache folder is a link, or can be written by another user: a context from it could be anyone's
    (like ssh refusing a key file others can write). The load bypasses the cache."""


class StoreBase:
    """Where one cache folder keeps what (layout ``v1``)."""

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

    def list_keys(self) -> list[str]:
        return sorted(n for n in _fs.names(self.entries_dir) if _manifest.is_key(n))

    def current_id(self, key: str) -> str | None:
        """The committed entry_id of ``key`` (``None``: absent or unreadable)."""
        try:
            data = json.loads(_fs.read_small(self.entries_dir / key / MANIFEST, _manifest.MAX_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        value = data.get("entry_id") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

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
