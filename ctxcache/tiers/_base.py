"""What every tier is, and the one way a tier's bytes enter the cache.

Lookup order on a load: the local cache, then each tier in the order given (bundles, model packages, a
remote store), and only then a compile. A tier never hands a session its own files: it *offers* an
entry (:class:`Offer`: a record and a way to open its files), and :func:`install` copies it into a
private staging folder, checks everything (sizes, SHA-256 of each file, the signature over the record
when one is required, key parts that hash to the key, EPContext paths that stay inside the entry) and
commits it through :meth:`Store.publish`, so a tier-filled entry has the same atomicity and integrity
as a compiled one and every later launch is a plain local hit. :func:`fill` (the loader, holding the
key's lock) and :func:`bring_in` (import / pull: lock, look again, install) are the only callers.

A *record* describes one entry, identically in a bundle's index, a model package and a remote store::

    {"format": 1, "key": "<32 hex>", "provider": "QNNExecutionProvider", "model": {"name": ..., "size": ...},
     "parts": [[label, value], ...],
     "files": {"manifest.json": {"size": n, "sha256": hex}, "ctx.onnx": {...}, "ctx_qnn.bin": {...}}}

xxh3 (the local digests) is fast but not collision-resistant; bytes that cross a trust boundary are
checked with SHA-256 so that a signature over the record also covers every file's content.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol, runtime_checkable

from .. import _fs, _manifest
from .._compile import CompileFailed, check_output
from .._fingerprint import canonical_json
from .._key import portable_key
from .._manifest import MANIFEST, Entry
from .._store import BrokenEntry, Store
from .._trust import (
    SigningKeyArg,
    Trust,
)
from ..errors import CacheFaultError, LockTimeoutError, TierError
from ._records import _CHUNK, _copy_checked
from ._records import RECORD_FORMAT as RECORD_FORMAT
from ._records import check_record as check_record
from ._records import make_record as make_record
from ._records import parse_json as parse_json
from ._records import sha256_file as sha256_file
from ._signing import UNSIGNED as UNSIGNED
from ._signing import Signer as Signer
from ._signing import SignerStatus as SignerStatus
from ._signing import admit as admit
from ._signing import check_signature as check_signature
from ._signing import read_signer as read_signer
from ._signing import read_signer_or_refuse as read_signer_or_refuse
from ._signing import resolve_signing_keys as resolve_signing_keys
from ._signing import sign as sign
from ._signing import sign_ed25519 as sign_ed25519
from ._signing import still_admitted as still_admitted

log = logging.getLogger("ctxcache")


#: Why a tier's entry was refused (``TierError.code``; ``CacheFaultError.code`` in strict mode), and
#: whether strict mode raises for it (the bytes or their signer were wrong, not the tier absent or down).
TIER_CODES: dict[str, tuple[bool, str]] = {
    "tier_digest": (True, "a file's size or SHA-256 differs from its record"),
    "tier_signature": (True, "a signature does not match: an HMAC with the configured secret, or an Ed25519 "
                             "signature by a trusted key (tampered after signing)"),
    "tier_untrusted": (True, "no valid signature from a trusted key where one is required (unsigned, HMAC only, "
                             "an unknown key), or a signature by a revoked key"),
    "tier_record": (True, "the index, record or manifest is malformed, or is for another key (relabelled)"),
    "tier_unsafe": (True, "a link, device, climbing path or unexpected member in the tier"),
    "tier_bad_context": (True, "the context model refers to files outside its entry"),
    "tier_unreachable": (False, "the tier is absent, down, or lacks a library it needs"),
    # TUF (RemoteTier(tuf_root=...), ctxcache._tuf):
    "tier_stale": (False, "the store's TUF metadata has expired: a frozen store, or a publisher that stopped "
                          "refreshing its timestamp"),
    "tier_rollback": (True, "TUF metadata older than what this device already verified (a rollback)"),
    "tier_mixed": (True, "TUF metadata from different publications (mix-and-match), or not matching its snapshot"),
}
#: Codes that mean the bytes (or who signed them) were wrong, as opposed to a tier being absent or down.
INTEGRITY_CODES = frozenset(c for c, (fault, _) in TIER_CODES.items() if fault)

Match = Literal["exact", "portable"]
Opener = Callable[[str], AbstractContextManager[IO[bytes]]]
Parts = Sequence[tuple[str, Any]]




@dataclass(frozen=True)
class Offer:
    """An entry a tier has for a key: its record, a way to open each file it lists, where it is from, and
    who signed it (``UNSIGNED`` for a tier that knows no signatures)."""

    record: dict[str, Any]
    opener: Opener
    origin: dict[str, Any]
    signer: Signer = UNSIGNED


@runtime_checkable
class Tier(Protocol):
    """What ctxcache needs from a tier. ``kind`` names it in ``LoadResult.tier``; ``match`` is
    ``"exact"`` or ``"portable"`` (also an entry built on another host, see :func:`portable_key`).

    A tier may have ``require_signature`` (``True``/``False``; ``None`` or absent: the default of
    :func:`signature_required`). Its offers carry a :class:`Signer` computed with :func:`read_signer`
    and the ``trust`` passed in; :func:`install` admits an offer only through :func:`admit`.
    """

    kind: str
    match: Match

    def describe(self) -> str: ...

    def lookup(self, key: str, parts: Parts = ()) -> Match | None:
        """Read-only: whether the tier holds an entry for ``key`` exactly, built elsewhere (portable), or not.
        Raises :class:`TierError` when the tier cannot be read."""
        ...

    def offer(self, key: str, parts: Parts = (), *, trust: Trust | None = None) -> AbstractContextManager[Offer | None]:
        """The entry for ``key`` (by this tier's ``match`` rule) while the context is open, else ``None``,
        with its signer as ``trust`` sees it. Raises :class:`TierError` when the tier has it but it is
        unreadable or malformed (whether its signer is good enough is :func:`admit`'s call)."""
        ...


@runtime_checkable
class WritableTier(Tier, Protocol):
    """A tier that takes entries compiled here (a remote with ``write_back=True``)."""

    write_back: bool

    def push(self, entry: Entry, *, overwrite: bool = False) -> bool:
        """Upload one verified entry; ``False`` when the tier already has it."""
        ...


class LocalTier:
    """Shared by the read-only tiers that live in a folder or a file (a bundle, a model package)."""

    kind = "local"

    def __init__(self, location: str | os.PathLike[str], *, signing_key: SigningKeyArg = None,
                 match: Match = "exact", require_signature: bool | None = None) -> None:
        self.match: Match = check_match(match)
        self.location = Path(os.path.abspath(os.fspath(location)))
        self._signing_key = signing_key
        self.require_signature = require_signature

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.location)!r})"


def find_record(records: dict[str, Any], key: str, parts: Parts, match: Match) -> tuple[str, Any] | None:
    """The record for ``key`` (exact), or with ``match="portable"`` one whose portable key matches."""
    if key in records:
        return key, records[key]
    if match != "portable" or not parts:
        return None
    want = portable_key(parts)
    for rkey, rec in sorted(records.items()):
        rparts = rec.get("parts") if isinstance(rec, dict) else None
        if isinstance(rparts, list) and all(isinstance(p, list) and len(p) == 2 for p in rparts):
            try:
                if portable_key(rparts) == want:
                    return rkey, rec
            except (TypeError, ValueError):  # unhashable junk in an untrusted index: not a match
                continue
    return None


def check_match(match: str) -> Match:
    if match not in ("exact", "portable"):
        raise ValueError(f"match must be 'exact' or 'portable', not {match!r}")
    return match  # type: ignore[return-value]


def signature_required(tier: object, trust: Trust) -> bool:
    """The one rule for where a trusted signature is required: the tier's own ``require_signature`` when
    set; else not for a bundle or package inside one of the app's own folders (``trusted_dirs``), and
    yes everywhere else (a remote store, any other folder, a tier of the app's own kind)."""
    explicit = getattr(tier, "require_signature", None)
    if explicit is not None:
        return bool(explicit)
    return not (isinstance(tier, LocalTier) and trust.covers(tier.location))


# -- the one install path ---------------------------------------------------------------------------------
def install(store: Store, key: str, offer: Offer, local_parts: Parts = (), *, required: bool = True,
            trust: Trust | None = None) -> Entry:
    """Admit an offered entry (its signer, where ``required``), copy it into staging, verify everything,
    publish by one rename. Caller holds the lock.

    The record may be for another key that matched portably (built on another host): it is verified
    against its own key, then published under ``key`` with ``local_parts``; its own key and parts are
    kept in the manifest's ``origin``. An exact record's parts must be this load's parts, literally (not
    only by their xxh3 key): a signature vouches for the parts it covers, and nothing else.
    """
    admit(offer.signer, required, f"{offer.origin.get('location', '?')}:{key[:12]}", trust)
    record = offer.record
    rkey = record.get("key") if isinstance(record, dict) else None
    portable = isinstance(rkey, str) and rkey != key
    if portable:
        try:
            same = bool(local_parts) and portable_key(record.get("parts") or []) == portable_key(local_parts)
        except (TypeError, IndexError, KeyError, ValueError):
            same = False  # malformed parts: check_record would refuse them anyway
        if not same:
            raise TierError("record is for another key", code="tier_record")
    files = check_record(record, str(rkey) if portable else key)
    if not portable and local_parts and canonical_json([list(p) for p in local_parts]) != canonical_json(record["parts"]):
        raise TierError("record's key parts are not this load's (relabelled)", code="tier_record")
    store.ensure()
    free = shutil.disk_usage(store.staging_dir).free if _fs.is_folder(store.staging_dir) else None
    need = sum(int(s["size"]) for s in files.values())
    if free is not None and need + (16 << 20) > free:
        raise TierError(f"{offer.origin.get('location', '?')}: the entry needs {need} bytes, {free} are free in "
                        f"{store.staging_dir}; free some space", code="tier_unreachable")
    with store.staging(key) as staging:
        for name, spec in sorted(files.items()):
            where = f"{offer.origin.get('location', '?')}:{key[:12]}/{name}"
            try:
                with offer.opener(name) as src:
                    _copy_checked(src, staging / name, spec["size"], spec["sha256"], where)
            except FileNotFoundError:
                raise TierError(f"{where} is listed but missing", code="tier_record") from None
        manifest = parse_json(_fs.read_small(staging / MANIFEST, _manifest.MAX_BYTES), "entry manifest")
        if not isinstance(manifest, dict) or manifest.get("key") != record["key"] or manifest.get("parts") != record["parts"]:
            raise TierError("entry manifest does not match its record", code="tier_record")
        try:
            check_output(staging)  # EPContext paths must stay inside the entry, as for a compile
        except CompileFailed as e:
            raise TierError(str(e), code="tier_bad_context") from None
        _fs.remove_file(staging / MANIFEST)
        clean = _manifest.from_portable(manifest)
        location = str(offer.origin.get("location", ""))
        # How it was admitted, so that every later hit can ask again whether it still would be
        # (still_admitted): a key revoked or no longer trusted, a folder no longer the app's own.
        admitted = ("signature" if offer.signer.status == "trusted" else
                    "trusted_dir" if trust is not None and location and trust.covers(location) else "not_required")
        clean["origin"] = dict(offer.origin, time=time.time(), signature=offer.signer.status,
                               signed_by=offer.signer.key_id, admitted=admitted)
        if portable:
            # The entry now answers to this machine's key; where it was built stays on record.
            clean["origin"].update(key=record["key"], parts=record["parts"])
            clean["parts"] = [list(p) for p in local_parts]
        try:
            return store.publish(staging, key, clean)
        except BrokenEntry as e:
            raise TierError(e.message, code="tier_record") from None


def fill(store: Store, key: str, parts: Parts, tiers: Iterable[Tier], *, strict: bool,
         trust: Trust | None = None) -> tuple[Entry, Tier] | None:
    """Ask each tier for ``key`` and install the first verified and admitted offer (caller holds the
    key's lock). ``trust`` is the cache's policy (``None``: no key trusted, no own folder).

    Never raises, except in strict mode for bytes (or signers) that failed verification.
    """
    trust = trust if trust is not None else Trust()
    for tier in tiers:
        start = time.perf_counter()
        try:
            with tier.offer(key, parts, trust=trust) as offer:
                if offer is None:
                    continue
                entry = install(store, key, offer, parts, required=signature_required(tier, trust), trust=trust)
        except TierError as e:
            log.warning("tier %s refused for %s (%s); trying the next tier or compiling", tier.describe(), key[:12], e)
            if strict and e.code in INTEGRITY_CODES:
                raise CacheFaultError(f"tier fault ({e}); strict mode is on", code=e.code, key=key) from None
            continue
        except Exception as e:  # noqa: BLE001 - a tier must never break the app
            log.warning("tier %s failed for %s (%s: %s); compiling locally", tier.describe(), key[:12], type(e).__name__, e)
            continue
        log.info("filled %s from %s in %.3f s", key[:12], tier.describe(), time.perf_counter() - start)
        return entry, tier
    return None


def bring_in(store: Store, key: str, tier: Tier, *, force: bool, lock_timeout: float | None,
             stall_after: float | None = None, parts: Parts = (),
             trust: Trust | None = None) -> Literal["installed", "present", "absent"]:
    """Install ``tier``'s entry for ``key`` by hand (import, pull): lock, look again, install.

    ``present`` when an intact entry is already there (and not ``force``). Admission follows ``trust``
    as for a load. Raises :class:`TierError` for a refused entry and
    :class:`~ctxcache.errors.LockTimeoutError` when another process keeps the key's lock past ``lock_timeout``.
    """
    import filelock

    from .._locking import LockStalled, key_lock

    trust = trust if trust is not None else Trust()
    lock = store.lock_path(key)
    try:
        with key_lock(lock, lock_timeout, key[:12], stall_after=stall_after):
            try:
                present = store.lookup(key)
            except BrokenEntry:
                present = None
            if present is not None and not force and store.verify(present) is None:
                return "present"
            with tier.offer(key, parts, trust=trust) as offer:
                if offer is None:
                    return "absent"
                install(store, key, offer, parts, required=signature_required(tier, trust), trust=trust)
                return "installed"
    except LockStalled as e:
        raise LockTimeoutError(f"the process holding the lock of entry {key[:12]} ({e.holder}) makes no progress "
                               f"({lock}); retry later", lock_path=str(lock), timeout=e.seconds) from None
    except filelock.Timeout:
        raise LockTimeoutError(
            f"another process kept the lock of entry {key[:12]} ({lock}) for over {lock_timeout} s; "
            "retry when it has finished compiling, or pass a longer lock timeout",
            lock_path=str(lock), timeout=float(lock_timeout or 0)) from None


def write_back(tiers: Iterable[Tier], entry: Entry) -> None:
    """Offer an entry compiled here to every tier that takes writes. Runs after the key's lock is
    released (an injected post-publish job): an upload never holds up the launch that compiled."""
    if entry.origin is not None:
        return
    for tier in tiers:
        if not isinstance(tier, WritableTier) or not tier.write_back:
            continue
        try:
            tier.push(entry)
        except Exception as e:  # noqa: BLE001 - an upload failure costs the fleet a compile, never this app its session
            log.warning("write-back of %s to %s failed: %s: %s", entry.key[:12], tier.describe(), type(e).__name__, e)


# -- the one export loop ------------------------------------------------------------------------------------
def export_files(entry: Entry, dest: Path, *, manifest_name: str = MANIFEST) -> dict[str, dict[str, Any]]:
    """Copy an entry's artifacts into ``dest`` (a new folder), each checked against its xxh3 after the
    copy (the copy is what ships), plus its portable manifest; returns the record's file table."""
    os.makedirs(dest)
    files: dict[str, dict[str, Any]] = {}
    for art in entry.artifacts:
        dst = dest / art["name"]
        fd = _fs.open_regular(entry.path / art["name"])
        with os.fdopen(fd, "rb") as src, open(dst, "xb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        from .._hashing import file_digest

        if file_digest(dst) != art["xxh3"]:
            raise OSError(f"{art['name']} changed while being copied")
        files[art["name"]] = {"size": dst.stat().st_size, "sha256": sha256_file(dst)}
    raw = _manifest.portable(entry)
    (dest / manifest_name).write_bytes(raw)
    files[MANIFEST] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return dict(sorted(files.items()))


@contextmanager
def open_plain(path: Path) -> Iterator[IO[bytes]]:
    """Open a tier's file for reading: a regular file, not a link (at its last component), FIFO or device."""
    try:
        fd = _fs.open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise TierError(f"cannot open {path} as a plain file: {e}", code="tier_unsafe") from None
    with os.fdopen(fd, "rb") as f:
        yield f
