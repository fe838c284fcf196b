"""TUF (The Update Framework) over the remote tier: what a device checks before a remote byte is used.

Per-entry Ed25519 signatures prove who built an entry, not that it is the *current* one: whoever can
write to a store (a mirror, a leaked credential) could replay an older validly signed entry, withhold new
ones, or mix publications. With ``RemoteTier(url, tuf_root="root.json")`` a device reads a record only
through python-tuf's ``ngclient``: the store's ``timestamp`` (short-lived: a frozen store is detected),
``snapshot`` and ``targets`` metadata are verified against the shipped root (thresholds, keys rotated
through new root versions) and against the versions this device saw before (rollback), with consistent
snapshots (every file read belongs to one publication). The record is a TUF target; it lists the SHA-256
of every file of the entry, which :func:`~ctxcache.tiers._base.install` then checks as for any tier, so
no byte reaches the cache's own checks unless TUF vouched for the record that names it.

Store layout (beside the ``v1/<key>/...`` objects of the remote tier)::

    tuf/metadata/<N>.root.json     every root version (rotation chain), signed by old and new root keys
    tuf/metadata/timestamp.json    the only object ever overwritten
    tuf/metadata/<N>.snapshot.json, <N>.targets.json
    v1/<key>/<sha256>.record.json  the target "<key>/record.json" (hash-prefixed: consistent snapshots)

The device's view (the root chain and the last timestamp/snapshot/targets it verified) is kept under the
cache root, ``tuf/<store id>/``, written through the cache's guarded helpers; the entry's manifest records
which target it was installed from, so :func:`still_trusted` can answer on a hit, from local files, whether
the current metadata still lists it. python-tuf is imported only when a TUF-configured tier is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fs
from ._types import Reason
from .errors import TierError

if TYPE_CHECKING:
    from tuf.ngclient import Updater

log = logging.getLogger("ctxcache")

META = "tuf/metadata/"
TARGETS = "v1/"
#: ngclient asks for URLs; this prefix marks "an object of this store", read with the tier's own reads.
URL = "ctxcache-store:///"
STATE = "tuf"
#: What a device accepts per object (ngclient checks its own per-role maximum as well).
_LIMITS = {"timestamp": 64 << 10, "root": 512 << 10}
_MAX_META = 32 << 20
_NAME_RE = re.compile(r"(timestamp|snapshot|targets|root\.[0-9]{1,9})")


def target_path(key: str) -> str:
    """The TUF target name of an entry's record."""
    return f"{key}/record.json"


def target_object(key: str, sha256: str) -> str:
    """Where the record of a publication lives (hash-prefixed, never overwritten)."""
    return f"{TARGETS}{key}/{sha256}.record.json"


def store_id(url: str) -> str:
    """The name of a store's device state folder (``<cache root>/tuf/<id>``)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def state_folder(cache_root: str | os.PathLike[str], url: str) -> Path:
    return Path(cache_root) / STATE / store_id(url)


# -- the device's trusted metadata, kept with the cache's guarded helpers -----------------------------------
class State:
    """The metadata this device verified last (rollback floor), in memory and, when a cache root is
    known, in ``<root>/tuf/<id>/`` (best effort: a read-only cache keeps it for the process only)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._mem: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> bytes:
        with self._lock:
            if name in self._mem:
                return self._mem[name]
        if self.folder is None or not _NAME_RE.fullmatch(name):
            raise FileNotFoundError(name)
        data = _fs.read_small(self.folder / f"{name}.json", _MAX_META)
        if len(data) > _MAX_META:
            raise OSError(f"{self.folder / name}.json is too large")
        return data

    def write(self, name: str, data: bytes) -> None:
        with self._lock:
            self._mem[name] = data
        if self.folder is None:
            return
        try:
            # ngclient re-persists the bootstrap root at every refresh: an unchanged file costs no fsync.
            if _fs.read_small(self.folder / f"{name}.json", len(data)) == data:
                return
        except OSError:
            pass
        try:
            _fs.make_folder(self.folder.parent)
            _fs.make_folder(self.folder)
            _fs.atomic_write(self.folder / f"{name}.json", data)
        except OSError as e:  # a read-only image: the process keeps the floor, the next launch re-verifies
            log.debug("TUF state not saved in %s: %s", self.folder, e)

    def roots(self, after: int) -> Iterator[bytes]:
        """Saved root versions newer than ``after``, in order (each is verified by its predecessor)."""
        version = after + 1
        while True:
            try:
                yield self.read(f"root.{version}")
            except OSError:
                return
            version += 1


# -- ngclient plumbing ---------------------------------------------------------------------------------------
def _fetcher_class() -> type:
    from tuf.api import exceptions
    from tuf.ngclient import FetcherInterface

    class StoreFetcher(FetcherInterface):
        """Reads ``ctxcache-store:///<name>`` with the remote tier's own reads (its timeouts and whole-fetch
        deadline), so TUF adds no transport of its own; a missing object is a 404 to ngclient."""

        def __init__(self, read: Callable[[str, int], bytes | None], budget: float) -> None:
            self._read = read
            self._deadline = time.monotonic() + budget

        def _fetch(self, url: str) -> Iterator[bytes]:
            if not url.startswith(URL):
                raise exceptions.DownloadError(f"not an object of this store: {url}")
            if time.monotonic() > self._deadline:
                raise exceptions.SlowRetrievalError(f"TUF refresh ran past its deadline at {url}")
            name = url[len(URL):]
            base = name.rsplit("/", 1)[-1]
            limit = _LIMITS["timestamp"] if base == "timestamp.json" else (
                _LIMITS["root"] if base.endswith(".root.json") else _MAX_META)
            data = self._read(name, limit)
            if data is None:
                raise exceptions.DownloadHTTPError(f"{name} is not in the store", 404)
            return iter((data,))

    return StoreFetcher


def _updater(state: State, bootstrap: bytes, fetcher: Any) -> Updater:
    from tuf.api import exceptions
    from tuf.ngclient import Updater, UpdaterConfig

    class StateUpdater(Updater):
        """ngclient with its local metadata in :class:`State` (guarded reads and writes, no root.json link in
        the cache). These four hooks are ngclient's persistence points (tuf 5-7)."""

        def __init__(self) -> None:
            self._ctx_state = state
            # metadata_dir: ngclient only looks there for "root_history/<N>.root.json"; every other read and
            # write goes through the hooks below. os.devnull is never a folder, so that look-up finds nothing
            # (never the working directory's files).
            super().__init__(os.devnull, URL + META, None, URL + TARGETS, fetcher,
                             UpdaterConfig(targets_max_length=_MAX_META, snapshot_max_length=_MAX_META),
                             bootstrap=bootstrap)
            # The root chain this device verified before, re-verified link by link from the shipped root:
            # a rotation is fetched once, and a store that later hides the newer roots cannot undo it.
            for data in state.roots(self._trusted_set.root.version):
                try:
                    self._trusted_set.update_root(data)
                except exceptions.RepositoryError:
                    break

        def _load_local_metadata(self, rolename: str) -> bytes:
            return self._ctx_state.read(rolename)

        def _persist_metadata(self, rolename: str, data: bytes) -> None:
            self._ctx_state.write(rolename, data)

        def _persist_root(self, version: int, data: bytes) -> None:
            self._ctx_state.write(f"root.{version}", data)

        def _update_root_symlink(self) -> None:
            pass

    return StateUpdater()


@contextmanager
def refusals(what: str, *, target: bool = False) -> Iterator[None]:
    """ngclient's exceptions as the tier's reason codes (``TierError``)."""
    from tuf.api import exceptions as x

    try:
        yield
    except TierError:
        raise
    except x.ExpiredMetadataError as e:
        raise TierError(f"{what}: the store's TUF metadata has expired ({e}): the store is frozen or its publisher "
                        "stopped refreshing it (ctxcache tuf timestamp); nothing is taken from it",
                        code="tier_stale") from None
    except x.BadVersionNumberError as e:
        text = str(e)
        if "must be >=" in text or ".json version" in text:
            raise TierError(f"{what}: TUF metadata older than what this device already trusts ({text}): a rollback",
                            code="tier_rollback") from None
        raise TierError(f"{what}: TUF metadata from different publications ({text})", code="tier_mixed") from None
    except (x.LengthOrHashMismatchError, x.DownloadLengthMismatchError) as e:
        if target:
            raise TierError(f"{what}: the record is not the one the current TUF targets list ({e})",
                            code="tier_digest") from None
        raise TierError(f"{what}: TUF metadata that does not match its publication ({e})", code="tier_mixed") from None
    except x.UnsignedMetadataError as e:
        raise TierError(f"{what}: TUF metadata lacks the threshold of signatures by the keys the root names ({e})",
                        code="tier_untrusted") from None
    except x.DownloadError as e:
        cause = e.__cause__
        if isinstance(cause, Exception) and not isinstance(cause, x.DownloadError):
            raise cause from None  # the tier's own guard maps (and remembers) a transport failure
        raise TierError(f"{what}: {e}", code="tier_unreachable") from None
    except x.RepositoryError as e:
        raise TierError(f"{what}: TUF metadata refused ({type(e).__name__}: {e})", code="tier_record") from None
    except ValueError as e:  # a malformed metadata file (ngclient raises ValueError/KeyError/TypeError for those)
        raise TierError(f"{what}: malformed TUF metadata ({e})", code="tier_record") from None


@dataclass(frozen=True)
class Verified:
    """A record TUF vouched for, and what the entry's manifest keeps of it (``origin["tuf"]``)."""

    raw: bytes
    origin: dict[str, Any]
    #: the record's Ed25519 signature lines, from the same publication (``b""``: none)
    ed25519: bytes = b""


class Client:
    """A device's TUF client for one store: the shipped root, the saved state, the store's reads."""

    def __init__(self, url: str, root: str | os.PathLike[str], read: Callable[[str, int], bytes | None],
                 budget: float) -> None:
        self.url = url
        self.root_path = Path(os.fspath(root))
        self.state = State()
        self._read = read
        self._budget = budget

    def attach(self, cache_root: str | os.PathLike[str]) -> None:
        """Keep this device's trusted metadata under the cache root (done by the cache for its tiers)."""
        self.state.folder = state_folder(cache_root, self.url)

    def _bootstrap(self) -> bytes:
        try:
            data = _fs.read_small(self.root_path, _LIMITS["root"])
        except OSError as e:
            raise TierError(f"cannot read the TUF root {self.root_path}: {e}; ship the publisher's root.json with the app",
                            code="tier_unreachable") from None
        if len(data) > _LIMITS["root"]:
            raise TierError(f"{self.root_path} is too large for a TUF root", code="tier_record")
        return data

    def refresh(self) -> Updater:
        """Verify the store's current metadata (root rotations, timestamp, snapshot, targets)."""
        what = f"TUF metadata of {self.url}"
        fetcher = _fetcher_class()(self._read, self._budget)
        with refusals(what):
            up = _updater(self.state, self._bootstrap(), fetcher)
            up.refresh()
        return up

    def record(self, key: str, up: Updater | None = None) -> Verified | None:
        """The record of ``key`` as the current targets list it (``None``: not published)."""
        up = up if up is not None else self.refresh()
        what = f"{self.url}:{key[:12]}"
        with refusals(what):
            info = up.get_targetinfo(target_path(key))
        if info is None:
            return None
        sha = info.hashes.get("sha256")
        if not isinstance(sha, str):
            raise TierError(f"{what}: the TUF target has no sha256", code="tier_record")
        fetcher = _fetcher_class()(self._read, self._budget)
        with refusals(what, target=True):
            raw = fetcher.download_bytes(URL + target_object(key, sha), info.length)
            info.verify_length_and_hashes(raw)
        version = up._trusted_set.targets.version
        origin = {"target": info.path, "sha256": sha, "length": info.length, "targets_version": version,
                  "store": store_id(self.url)}
        custom = info.custom if isinstance(info.custom, dict) else {}
        lines = custom.get("ed25519")
        return Verified(raw, origin, lines.encode("ascii", "replace")[:65536] if isinstance(lines, str) else b"")


# -- revocation on a hit ---------------------------------------------------------------------------------------
_memo: dict[Path, tuple[tuple[int, int, int], dict[str, str] | None]] = {}
_memo_lock = threading.Lock()


def _current_targets(folder: Path) -> dict[str, str] | None:
    """Target name -> sha256 from the device's last verified targets (``None``: no such state). Parsed once
    per change of the file (one ``lstat`` per hit)."""
    path = folder / "targets.json"
    try:
        st = _fs.lstat(path)
    except OSError:
        return None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _memo_lock:
        hit = _memo.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    table: dict[str, str] | None
    try:
        doc = json.loads(_fs.read_small(path, _MAX_META))
        targets = doc["signed"]["targets"]
        table = {str(name): str(info["hashes"]["sha256"]) for name, info in targets.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        table = None
    with _memo_lock:
        _memo[path] = (stamp, table)
    return table


def still_trusted(origin: Mapping[str, Any] | None, cache_root: str | os.PathLike[str]) -> Reason | None:
    """Whether an entry installed through TUF may still be served, from what its manifest recorded at install
    (``entry.origin``) and the device's current verified targets (``<cache_root>/tuf/<store>/targets.json``).

    ``None``: serve it (not a TUF entry, or its target is still listed with the same hash). A
    :class:`Reason` ``tuf_revoked``: its target was removed from the current targets (revoked, or published
    by a key that root no longer trusts: a rotation re-signs only what stays), or replaced by another build;
    ``tuf_unverifiable``: the device's TUF state is gone or unreadable. Cheap: one ``lstat`` when unchanged.
    The verified metadata is only as new as the device's last refresh (any remote miss, or
    ``RemoteTier.tuf_refresh()``); a frozen store keeps serving what was installed. ``cache_root`` is the
    cache folder (``ContextCache.root``, ``Store.base``), where the cache's tiers keep their TUF state.
    """
    tuf = origin.get("tuf") if isinstance(origin, Mapping) else None
    if not isinstance(tuf, Mapping):
        return None
    name, sha, store = tuf.get("target"), tuf.get("sha256"), tuf.get("store")
    if not (isinstance(name, str) and isinstance(sha, str) and isinstance(store, str) and re.fullmatch(r"[0-9a-f]{16}", store)):
        return Reason("tuf_unverifiable", "the entry's TUF record in its manifest is malformed")
    current = _current_targets(Path(cache_root) / STATE / store)
    if current is None:
        return Reason("tuf_unverifiable", f"no verified TUF targets for store {store} in this cache; the entry came "
                                          "through TUF and cannot be checked against the current publication")
    now = current.get(name)
    if now is None:
        return Reason("tuf_revoked", f"{name} is no longer in the store's current TUF targets (revoked)")
    if now != sha:
        return Reason("tuf_revoked", f"{name} was replaced by another build in the store's current TUF targets")
    return None
