"""The publisher's side of TUF over a remote store: keys, the first root, publications, rotations.

A publication adds (or removes) records in ``targets``, then writes new ``targets`` and ``snapshot``
versions under new names (``<N>.targets.json``: never overwritten, consistent snapshots) and the
``timestamp`` last, so a device sees the previous publication or this one, never a mix. The store's current
metadata is verified against the publisher's own root before it is built upon: a store someone else wrote
into is refused, not re-signed.

Keys live in a folder (``--keys DIR``): ``<role>-<n>.key`` (Ed25519, PKCS#8 PEM, mode 0600) and ``root.json``
(public, the file the app ships). A key file renamed away (``.revoked``) is no longer used. Root keys
should stay offline: only ``init`` and ``rotate`` need them; ``push`` needs targets, snapshot and timestamp.

Several publishers may work on one store (a farm's workers in separate processes): those in one process
are serialised here; across processes a version name is taken by a create that never overwrites, a
publisher builds on the newest complete publication (waiting up to a few seconds for one another process
is writing; a version that stays incomplete, left by a publisher that died, is skipped), and the timestamp
is read back after writing and rewritten while an older publication's writer put its own over it.
A publisher stalled for longer than that wait between its targets and its snapshot can still lose its
entries to a concurrent publication (they are uploaded, only not listed: the next push lists them).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from . import _fs
from ._tuf import META, target_object, target_path
from .errors import TierError

log = logging.getLogger("ctxcache")

ROLES = ("root", "targets", "snapshot", "timestamp")
#: Seconds each role's metadata stays valid; the timestamp is what a frozen store is detected by.
EXPIRY = {"root": 365 * 86400.0, "targets": 365 * 86400.0, "snapshot": 365 * 86400.0, "timestamp": 86400.0}
CONFIG = "tuf.json"
_MAX = 32 << 20
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class Objects(Protocol):
    """What the publisher needs from a store (the remote tier's backend gives it)."""

    def get(self, name: str, limit: int | None = None) -> bytes | None: ...

    def put(self, name: str, data: bytes) -> None: ...

    def put_new(self, name: str, data: bytes) -> bool:
        """Create ``name``; ``False`` when it exists already (another publisher took this version)."""
        ...


def _refuse(message: str) -> TierError:
    return TierError(message, code="tier_untrusted")


# -- keys ------------------------------------------------------------------------------------------------------
@dataclass
class Keys:
    """A publisher's key folder: the signers found there, and its settings."""

    folder: Path
    signers: dict[str, Any]  # keyid -> securesystemslib CryptoSigner
    config: dict[str, Any]

    def for_role(self, root: Any, role: str) -> list[Any]:
        return [self.signers[k] for k in root.roles[role].keyids if k in self.signers]

    def expiry(self, role: str) -> datetime:
        seconds = float(self.config.get("expiry", {}).get(role, EXPIRY[role]))
        return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


def load_keys(folder: str | os.PathLike[str]) -> Keys:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    path = Path(os.fspath(folder))
    signers: dict[str, Any] = {}
    try:
        names = sorted(_fs.names(path))
    except OSError as e:
        raise TierError(f"cannot read the TUF key folder {path}: {e}", code="tier_untrusted") from None
    for name in names:
        if not name.endswith(".key"):
            continue
        try:
            key = load_pem_private_key(_fs.read_small(path / name, 64 << 10), None)
            signer = CryptoSigner(key)
        except (OSError, ValueError, TypeError) as e:
            raise TierError(f"{path / name} is not a TUF private key (PKCS#8 PEM): {e}", code="tier_untrusted") from None
        signers[signer.public_key.keyid] = signer
    config: dict[str, Any] = {}
    try:
        loaded = json.loads(_fs.read_small(path / CONFIG, 1 << 20))
        config = loaded if isinstance(loaded, dict) else {}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise TierError(f"{path / CONFIG} is unreadable: {e}", code="tier_untrusted") from None
    return Keys(path, signers, config)


def new_key(folder: Path, role: str) -> Any:
    """A new Ed25519 key for ``role``, saved as the first free ``<role>-<n>.key`` (owner-only)."""
    from securesystemslib.signer import CryptoSigner

    signer = CryptoSigner.generate_ed25519()
    n = 1
    while _fs.exists(folder / f"{role}-{n}.key") or _fs.exists(folder / f"{role}-{n}.key.revoked"):
        n += 1
    _fs.write_new(folder / f"{role}-{n}.key", signer.private_bytes)
    return signer


def _key_id(path: Path) -> str | None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    try:
        return str(CryptoSigner(load_pem_private_key(_fs.read_small(path, 64 << 10), None)).public_key.keyid)
    except (OSError, ValueError, TypeError):
        return None


def retire_key(folder: Path, keyid: str) -> None:
    """Rename the key file of ``keyid`` to ``.revoked``: it signs nothing any more."""
    for name in _fs.names(folder):
        if name.endswith(".key") and _key_id(folder / name) == keyid:
            _fs.rename(folder / name, folder / f"{name}.revoked")


# -- reading the store's current publication ------------------------------------------------------------------
@dataclass
class Publication:
    root: Any
    timestamp: Any
    snapshot: Any
    targets: Any


def _read_md(objects: Objects, name: str) -> Any:
    from tuf.api.metadata import Metadata

    raw = objects.get(META + name, _MAX)
    if raw is None:
        raise TierError(f"the store has no TUF {name}; run ctxcache tuf init", code="tier_record")
    try:
        return Metadata.from_bytes(raw)
    except Exception as e:  # noqa: BLE001 - any parse failure of store bytes is one refusal
        raise TierError(f"TUF {name} in the store is malformed: {e}", code="tier_record") from None


def own_root(keys: Keys) -> Any:
    from tuf.api.metadata import Metadata

    try:
        return Metadata.from_bytes(_fs.read_small(keys.folder / "root.json", 512 << 10))
    except Exception as e:  # noqa: BLE001
        raise TierError(f"{keys.folder / 'root.json'} is missing or malformed ({e}); run ctxcache tuf init",
                        code="tier_untrusted") from None


def _verified(root: Any, previous: Any, role: str, md: Any) -> None:
    try:
        try:
            root.verify_delegate(role, md)
        except Exception:
            if previous is None:
                raise
            previous.verify_delegate(role, md)
    except Exception as e:  # noqa: BLE001
        raise _refuse(f"the store's TUF {role} is not signed by this publisher's keys ({e}): someone else wrote "
                      "it, or the store was rotated elsewhere; nothing was published") from None


def _targets_of(objects: Objects, root: Any, previous: Any, snap: Any) -> Any:
    tmeta = snap.signed.meta.get("targets.json")
    if tmeta is None:
        raise TierError("the store's TUF snapshot lists no targets", code="tier_record")
    targets = _read_md(objects, f"{tmeta.version}.targets.json")
    _verified(root, previous, "targets", targets)
    return targets


def current(objects: Objects, root: Any, previous: Any = None, *, newest: bool = False) -> Publication:
    """The store's current publication, each role verified against ``root`` (the publisher's own), or
    against ``previous`` (the root before a rotation, whose keys signed what is being re-signed).

    ``newest``: the newest complete publication, which may be ahead of the timestamp while another
    publisher is between its snapshot and its timestamp (building on it loses none of its entries).
    """
    ts = _read_md(objects, "timestamp.json")
    _verified(root, previous, "timestamp", ts)
    snap = _read_md(objects, f"{ts.signed.snapshot_meta.version}.snapshot.json")
    _verified(root, previous, "snapshot", snap)
    targets = _targets_of(objects, root, previous, snap)
    while newest:
        raw = objects.get(f"{META}{snap.signed.version + 1}.snapshot.json", _MAX)
        if raw is None:
            break
        from tuf.api.metadata import Metadata

        try:
            ahead = Metadata.from_bytes(raw)
        except Exception:  # noqa: BLE001 - a torn or foreign file: not a publication to build on
            break
        _verified(root, previous, "snapshot", ahead)
        snap, targets = ahead, _targets_of(objects, root, previous, ahead)
    return Publication(root, ts, snap, targets)


# -- writing --------------------------------------------------------------------------------------------------
def _signed(md: Any, signers: list[Any], threshold: int, role: str) -> bytes:
    from tuf.api.serialization.json import JSONSerializer

    if len(signers) < threshold:
        raise _refuse(f"the TUF {role} role needs {threshold} signature(s); the key folder has {len(signers)} of its keys")
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return bytes(JSONSerializer(compact=True).serialize(md))


def _lock(url: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(url, threading.Lock())


def publish(objects: Objects, keys: Keys, url: str, *, add: Mapping[str, bytes] = {}, remove: Iterable[str] = (),
            signatures: Mapping[str, bytes] = {}, tries: int = 16, previous: Any = None) -> int:
    """A new publication: ``add`` maps entry keys to their record bytes (uploaded under their hash), ``remove``
    drops entries' targets; ``signatures``: each record's Ed25519 lines, kept in its target's ``custom``
    field (so they belong to the publication too). Returns the new targets version."""
    from tuf.api.metadata import MetaFile, TargetFile

    root = own_root(keys)
    gone = set(remove)
    for key, raw in add.items():
        info = TargetFile.from_data(target_path(key), raw, ["sha256"])
        objects.put(target_object(key, info.hashes["sha256"]), raw)  # content-addressed: before it is listed
    wanted = {target_path(k): TargetFile.from_data(target_path(k), raw, ["sha256"]).hashes["sha256"] for k, raw in add.items()}
    with _lock(url):
        skip = 0
        for attempt in range(tries):
            try:
                pub = current(objects, root, previous, newest=True)
            except TierError as e:
                if e.code != "tier_record" or attempt == tries - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))  # an object store without atomic overwrite: a torn read, retry
                continue
            if attempt and _listed(pub, wanted, gone):  # what an earlier attempt of ours published is current
                return int(pub.targets.signed.version)
            t = pub.targets.signed
            for key, raw in add.items():
                info = TargetFile.from_data(target_path(key), raw, ["sha256"])
                if key in signatures:
                    info.unrecognized_fields["custom"] = {"ed25519": signatures[key].decode("ascii")}
                t.targets[target_path(key)] = info
            for key in gone:
                t.targets.pop(target_path(key), None)
            t.version += 1 + skip
            t.expires = keys.expiry("targets")
            tbytes = _signed(pub.targets, keys.for_role(pub.root.signed, "targets"), pub.root.signed.roles["targets"].threshold,
                             "targets")
            s = pub.snapshot.signed
            s.meta["targets.json"] = MetaFile(t.version, len(tbytes), {"sha256": _sha(tbytes)})
            s.version += 1 + skip
            s.expires = keys.expiry("snapshot")
            sbytes = _signed(pub.snapshot, keys.for_role(pub.root.signed, "snapshot"),
                             pub.root.signed.roles["snapshot"].threshold, "snapshot")
            if not (objects.put_new(f"{META}{t.version}.targets.json", tbytes)
                    and objects.put_new(f"{META}{s.version}.snapshot.json", sbytes)):
                # Another publisher is writing this version: wait for its snapshot and build on it (building on
                # the older base would drop its entries). Only a version that stays incomplete (a publisher
                # that died between its two writes) is skipped.
                if _appears(objects, f"{META}{s.version}.snapshot.json", _WAIT):
                    skip = 0
                else:
                    skip += 1
                continue
            skip = 0
            _settle(objects, keys, pub, s.version, sbytes)
            if _listed(current(objects, root, previous), wanted, gone):
                log.info("TUF publication %d on %s (+%d, -%d targets)", t.version, url, len(add), len(gone))
                return int(t.version)
            # A later publication built on an older base (past a version it took for abandoned) is current
            # without ours: publish again on top of it.
    raise TierError(f"another publisher kept taking the next TUF versions of {url}; retry", code="tier_unreachable")


_WAIT = 3.0


def _appears(objects: Objects, name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if objects.get(name, 1) is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _listed(pub: Publication, wanted: Mapping[str, str], gone: set[str]) -> bool:
    targets = pub.targets.signed.targets
    return (all(p in targets and targets[p].hashes.get("sha256") == sha for p, sha in wanted.items())
            and not any(target_path(k) in targets for k in gone))


def _settle(objects: Objects, keys: Keys, pub: Publication, snapshot_version: int, sbytes: bytes) -> None:
    """Point the timestamp at the newest complete snapshot (ours, or a later one built meanwhile).

    The timestamp is the one object every publication overwrites. Every writer reads it back after writing
    and moves it forward again while someone put an older one over it, so the last re-check of the last
    writer leaves it at the newest publication. Devices that saw a newer one meanwhile refuse an older
    (``tier_rollback``) and compile; it heals here or at the next publication.
    """
    newest, nbytes = snapshot_version, sbytes
    for _ in range(8):
        while True:
            ahead = objects.get(f"{META}{newest + 1}.snapshot.json", _MAX)
            if ahead is None or not _signed_by(pub.root, "snapshot", ahead):
                break  # none, or not (yet) a whole snapshot of ours: never point the timestamp at it
            newest, nbytes = newest + 1, ahead
        now = _read_md(objects, "timestamp.json")
        if int(now.signed.snapshot_meta.version) >= newest:
            return
        _write_timestamp(objects, keys, Publication(pub.root, now, pub.snapshot, pub.targets), newest, nbytes)


def _signed_by(root: Any, role: str, raw: bytes) -> bool:
    from tuf.api.metadata import Metadata

    try:
        root.verify_delegate(role, Metadata.from_bytes(raw))
        return True
    except Exception:  # noqa: BLE001 - torn, foreign or malformed
        return False


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _write_timestamp(objects: Objects, keys: Keys, pub: Publication, snapshot_version: int, sbytes: bytes) -> int:
    from tuf.api.metadata import MetaFile

    ts = pub.timestamp.signed
    ts.snapshot_meta = MetaFile(snapshot_version, len(sbytes), {"sha256": _sha(sbytes)})
    ts.version += 1
    ts.expires = keys.expiry("timestamp")
    objects.put(META + "timestamp.json", _signed(pub.timestamp, keys.for_role(pub.root.signed, "timestamp"),
                                                 pub.root.signed.roles["timestamp"].threshold, "timestamp"))
    return int(ts.version)


def refresh_timestamp(objects: Objects, keys: Keys, url: str) -> int:
    """A new timestamp over the current snapshot (run it more often than the timestamp expires)."""
    root = own_root(keys)
    with _lock(url):
        pub = current(objects, root)
        raw = objects.get(f"{META}{pub.timestamp.signed.snapshot_meta.version}.snapshot.json", _MAX) or b""
        version = _write_timestamp(objects, keys, pub, pub.snapshot.signed.version, raw)
        _settle(objects, keys, pub, pub.snapshot.signed.version, raw)  # a publication landed meanwhile: point at it
        return version


def init(objects: Objects, folder: str | os.PathLike[str], url: str, *, thresholds: Mapping[str, int] | None = None,
         expiry: Mapping[str, float] | None = None) -> Path:
    """New keys (``threshold`` keys per role), root v1 and an empty first publication. Returns the root.json
    to ship with the app."""
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

    path = Path(os.fspath(folder))
    _fs.make_folder(path)
    if _fs.exists(path / "root.json") or objects.get(META + "1.root.json", 1 << 20) is not None:
        raise TierError(f"{url} or {path} already has a TUF root; use ctxcache tuf rotate", code="tier_record")
    config = {"expiry": {r: float((expiry or {}).get(r, EXPIRY[r])) for r in ROLES}}
    _fs.write_new(path / CONFIG, json.dumps(config, indent=1).encode())
    keys = Keys(path, {}, config)
    root = Metadata(Root(expires=keys.expiry("root"), consistent_snapshot=True))
    for role in ROLES:
        n = int((thresholds or {}).get(role, 1))
        if n < 1:
            raise ValueError(f"the {role} threshold must be >= 1")
        for _ in range(n):
            signer = new_key(path, role)
            keys.signers[signer.public_key.keyid] = signer
            root.signed.add_key(signer.public_key, role)
        root.signed.roles[role].threshold = n
    rbytes = _signed(root, keys.for_role(root.signed, "root"), root.signed.roles["root"].threshold, "root")
    targets = Metadata(Targets(expires=keys.expiry("targets")))
    tbytes = _signed(targets, keys.for_role(root.signed, "targets"), root.signed.roles["targets"].threshold, "targets")
    snap = Metadata(Snapshot(expires=keys.expiry("snapshot")))
    snap.signed.meta["targets.json"] = MetaFile(1, len(tbytes), {"sha256": _sha(tbytes)})
    sbytes = _signed(snap, keys.for_role(root.signed, "snapshot"), root.signed.roles["snapshot"].threshold, "snapshot")
    ts = Metadata(Timestamp(expires=keys.expiry("timestamp")))
    ts.signed.snapshot_meta = MetaFile(1, len(sbytes), {"sha256": _sha(sbytes)})
    tsbytes = _signed(ts, keys.for_role(root.signed, "timestamp"), root.signed.roles["timestamp"].threshold, "timestamp")
    objects.put(META + "1.root.json", rbytes)
    objects.put(META + "1.targets.json", tbytes)
    objects.put(META + "1.snapshot.json", sbytes)
    objects.put(META + "timestamp.json", tsbytes)
    _fs.atomic_write(path / "root.json", rbytes)
    return path / "root.json"


def rotate(objects: Objects, folder: str | os.PathLike[str], url: str, role: str, *, add: int = 1,
           revoke: Iterable[str] = (), threshold: int | None = None) -> int:
    """Root version N+1: ``add`` new keys for ``role``, ``revoke`` key ids (their files renamed ``.revoked``),
    a new threshold. Signed by the old root's threshold and the new one's; then a publication re-signed by
    the new keys (what stays listed is re-vouched for; nothing a revoked key alone signed survives unless
    listed). Returns the new root version."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    keys = load_keys(folder)
    old = own_root(keys)
    new = own_root(keys)
    r = new.signed
    for _ in range(add):
        signer = new_key(keys.folder, role)
        keys.signers[signer.public_key.keyid] = signer
        r.add_key(signer.public_key, role)
    for kid in revoke:
        matches = [k for k in r.roles[role].keyids if k.startswith(kid)]
        if len(matches) != 1:
            raise ValueError(f"key id {kid!r} names {len(matches)} keys of the {role} role")
        r.revoke_key(matches[0], role)
    if threshold is not None:
        r.roles[role].threshold = threshold
    if len(r.roles[role].keyids) < r.roles[role].threshold:
        raise ValueError(f"the {role} role would have {len(r.roles[role].keyids)} keys for a threshold of "
                         f"{r.roles[role].threshold}")
    r.version += 1
    r.expires = keys.expiry("root")
    signers = {k: keys.signers[k] for k in old.signed.roles["root"].keyids + r.roles["root"].keyids if k in keys.signers}
    have_old = sum(1 for k in old.signed.roles["root"].keyids if k in signers)
    if have_old < old.signed.roles["root"].threshold:
        raise _refuse(f"rotating needs {old.signed.roles['root'].threshold} of the current root keys; "
                      f"{have_old} are in {keys.folder}")
    rbytes = _signed(new, list(signers.values()), r.roles["root"].threshold, "root")
    with _lock(url):
        if not objects.put_new(f"{META}{r.version}.root.json", rbytes):
            raise TierError(f"{url} already has root version {r.version}; the key folder is behind the store",
                            code="tier_record")
    _fs.atomic_write(keys.folder / "root.json", rbytes)
    revoked = set(old.signed.keys) - set(r.keys)
    for kid in revoked:
        retire_key(keys.folder, kid)
    if role != "root":
        publish(objects, load_keys(keys.folder), url, previous=old)
    return int(r.version)
