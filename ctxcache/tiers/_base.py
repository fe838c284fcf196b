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

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
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
from .._key import key_of, portable_key
from .._manifest import CONTEXT, MANIFEST, Entry
from .._store import BrokenEntry, Store
from .._trust import (
    SigningKey,
    SigningKeyArg,
    Trust,
    ed25519_keys,
    ed25519_sign,
    ed25519_verify,
    signing_keys,
)
from ..errors import CacheFaultError, LockTimeoutError, TierError

log = logging.getLogger("ctxcache")

RECORD_FORMAT = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
_MAX_FILES = 64
_CHUNK = 1 << 20

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


SignerStatus = Literal["trusted", "invalid", "revoked", "untrusted", "hmac", "unsigned"]


@dataclass(frozen=True)
class Signer:
    """Who signed what a tier offers, as this device sees it.

    ``trusted``: a valid Ed25519 signature by a trusted key (``key_id``). ``invalid``: a signature that
    names a trusted key does not verify (tampered). ``revoked``: signed only by a revoked key.
    ``untrusted``: signed only by keys this device does not know. ``hmac``: no Ed25519 signature, but a
    valid HMAC with the configured secret. ``unsigned``: neither.
    """

    status: SignerStatus = "unsigned"
    key_id: str | None = None
    hmac: bool = False

    @property
    def trusted(self) -> bool:
        return self.status == "trusted"

    def describe(self) -> str:
        if self.key_id is not None:
            return f"ed25519 key {self.key_id} ({self.status})" + (" + hmac" if self.hmac else "")
        return "hmac only" if self.status == "hmac" else "unsigned"


UNSIGNED = Signer()


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


# -- signing ----------------------------------------------------------------------------------------------
def resolve_signing_keys(key: SigningKeyArg) -> tuple[SigningKey, ...]:
    """Argument, else ``$CTXCACHE_SIGNING_KEY`` (read now, never at import), else none."""
    return signing_keys(key)


def sign(data: bytes, key: bytes) -> bytes:
    """An HMAC signature file's content: ``hmac-sha256:<hex>``."""
    return b"hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest().encode()


def _message(context: str, data: bytes) -> bytes:
    # Domain separation: a signature over a bundle index is never a valid signature over a remote record.
    return b"ctxcache-signature-v1\0" + context.encode("ascii") + b"\0" + data


def sign_ed25519(data: bytes, keys: Iterable[SigningKey], context: str) -> bytes:
    """The Ed25519 signature lines (one per key; several during a key rotation) over ``data``."""
    lines = [f"ed25519:{k.key_id}:{base64.b64encode(ed25519_sign(k, _message(context, data))).decode()}"
             for k in ed25519_keys(keys)]
    return "\n".join(lines).encode() + (b"\n" if lines else b"")


def check_signature(data: bytes, signature: bytes | None, key: bytes | None, what: str) -> None:
    """Refuse ``data`` when an HMAC secret is configured and its signature is missing or wrong.

    Without a secret the HMAC is not checked: a bundle signed for one fleet stays usable by an app that
    does not configure the secret. (An HMAC never makes an entry *trusted*; see :func:`read_signer`.)
    """
    if key is None:
        return
    if signature is None:
        raise TierError(f"{what} is not signed, but a signing key is configured", code="tier_signature")
    if not hmac.compare_digest(signature.strip(), sign(data, key)):
        raise TierError(f"{what}: signature does not match (tampered, or signed with another key)", code="tier_signature")


_MAX_SIGNATURES = 16


def read_signer(data: bytes, blob: bytes | None, context: str, trust: Trust, *, hmac_checked: bool = False,
                own: Iterable[SigningKey] = ()) -> Signer:
    """Who signed ``data``, from its Ed25519 signature lines, as ``trust`` (plus the tier's own signing
    keys, ``own``) sees it. Never raises: whether that is good enough is :func:`admit`'s decision.

    One valid line from a trusted key is enough (during a rotation both keys sign). Unknown lines are
    ignored (a newer ctxcache may add schemes); without ``cryptography`` a line from a trusted key
    cannot be checked, which :func:`admit` reports as such.
    """
    trust = trust.with_signers(own)
    found: dict[SignerStatus, str] = {}
    for line in (blob or b"").decode("ascii", "replace").splitlines()[:_MAX_SIGNATURES]:
        scheme, _, rest = line.strip().partition(":")
        kid, _, b64 = rest.partition(":")
        if scheme != "ed25519" or not kid:
            continue
        kid = kid.lower()
        public = trust.public_key(kid)
        if public is None:
            found.setdefault("revoked" if trust.is_revoked(kid) else "untrusted", kid)
            continue
        try:
            sig = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        if ed25519_verify(public, sig, _message(context, data)):
            return Signer("trusted", kid, hmac_checked)
        found.setdefault("invalid", kid)
    worst: tuple[SignerStatus, ...] = ("invalid", "revoked", "untrusted")
    for status in worst:
        if status in found:
            return Signer(status, found[status], hmac_checked)
    return Signer("hmac" if hmac_checked else "unsigned", None, hmac_checked)


def read_signer_or_refuse(data: bytes, blob: bytes | None, context: str, trust: Trust, what: str, *,
                          hmac_checked: bool = False, own: Iterable[SigningKey] = ()) -> Signer:
    """:func:`read_signer`, with a missing ``cryptography`` turned into a refusal that says what to install."""
    try:
        return read_signer(data, blob, context, trust, hmac_checked=hmac_checked, own=own)
    except ImportError as e:
        raise TierError(f"{what}: cannot check its Ed25519 signature: {e}", code="tier_untrusted") from None


def signature_required(tier: object, trust: Trust) -> bool:
    """The one rule for where a trusted signature is required: the tier's own ``require_signature`` when
    set; else not for a bundle or package inside one of the app's own folders (``trusted_dirs``), and
    yes everywhere else (a remote store, any other folder, a tier of the app's own kind)."""
    explicit = getattr(tier, "require_signature", None)
    if explicit is not None:
        return bool(explicit)
    return not (isinstance(tier, LocalTier) and trust.covers(tier.location))


def admit(signer: Signer, required: bool, what: str, trust: Trust | None = None) -> None:
    """Refuse an offer whose signer is not good enough. A signature that fails, or a revoked key, is
    refused everywhere (a forgery is worse than no signature); unsigned, HMAC-only or unknown-key
    entries only where a signature is required."""
    if signer.status == "trusted":
        return
    if signer.status == "invalid":
        raise TierError(f"{what}: the signature by trusted key {signer.key_id} does not match (tampered after signing)",
                        code="tier_signature")
    if signer.status == "revoked":
        raise TierError(f"{what}: signed by revoked key {signer.key_id}", code="tier_untrusted")
    if not required:
        return
    note = f" ({trust.problem})" if trust is not None and trust.problem else ""
    if trust is not None and trust.refused and not trust.problem:
        note = f" (not trusted: {'; '.join(trust.refused)})"  # an anchor others can write was left out
    if signer.status == "untrusted":
        why = f"signed by key {signer.key_id}, which is not a trusted key (trusted_keys= / $CTXCACHE_TRUSTED_KEYS){note}"
    elif signer.status == "hmac":
        why = ("only an HMAC: a shared secret proves integrity between machines that share it, not who built the "
               f"entry; sign with an Ed25519 key (ctxcache keygen) and trust its public key{note}")
    else:
        why = ("not signed; sign it with an Ed25519 key (ctxcache keygen; export/push --signing-key-file) and trust its "
               f"public key, or, for the app's own bundle, name its folder in trusted_dirs={note}")
    raise TierError(f"{what}: {why}", code="tier_untrusted")


def still_admitted(origin: dict[str, Any], trust: Trust) -> str | None:
    """Why an entry a tier put into this cache would not be admitted today (``None``: it would be), from what
    its install recorded: the :func:`admit` rule again, with the signer's status as the device's trust says
    it now. Revoking or removing a leaked key must reach entries it already brought in, not only new
    imports: a revoked key's entries are refused everywhere; a key no longer among the device's trusted
    keys (or a bundle folder no longer among its ``trusted_dirs``) is refused where the device names any.
    Cheap: no file is read."""
    kid = origin.get("signed_by")
    recorded = origin.get("signature")
    admitted = origin.get("admitted")
    if isinstance(kid, str) and kid:
        # A device that names no trusted key at all has no policy to ask again (the entry was admitted by
        # whoever imported it, with theirs); a revoked key is refused everywhere, policy or not.
        names_keys = bool(trust.keys) or trust.problem is not None or any(r.startswith("trusted_keys") for r in trust.refused)
        status: SignerStatus = ("revoked" if trust.is_revoked(kid) else
                                "trusted" if trust.public_key(kid) is not None or not names_keys else "untrusted")
    else:
        status = "unsigned" if recorded not in ("hmac",) else "hmac"
    location = str(origin.get("location", ""))
    if admitted == "trusted_dir":
        # The app names its folders (some may have been refused as unsafe): this one must still be among them.
        names_dirs = bool(trust.dirs) or any(r.startswith("trusted_dirs") for r in trust.refused)
        required = names_dirs and not trust.covers(location)
    elif admitted == "not_required":
        required = False  # the tier itself said so (require_signature=False), at the app's request
    else:
        required = recorded == "trusted" or admitted == "signature"
    try:
        admit(Signer(status, kid if isinstance(kid, str) else None), required, f"{location}:{origin.get('tier', '?')}",
              trust)
    except TierError as e:
        return f"{e}; it was admitted by {admitted or recorded}, and would not be now"
    return None


# -- records --------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    fd = _fs.open_regular(path)
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def make_record(entry: Entry, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    raw = entry.manifest.get("model")
    model: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {
        "format": RECORD_FORMAT,
        "key": entry.key,
        "provider": entry.manifest.get("provider"),
        "model": {"name": model.get("name"), "size": model.get("size")},
        "parts": entry.manifest.get("parts"),
        "files": files,
    }


def check_record(record: Any, key: str) -> dict[str, dict[str, Any]]:
    """Validate an untrusted record for ``key``; returns its file table. Raises ``TierError``."""
    if not isinstance(record, dict):
        raise TierError("record is not a JSON object", code="tier_record")
    fmt = record.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > RECORD_FORMAT:
        raise TierError(f"record format {fmt!r} is not readable by this ctxcache", code="tier_record")
    if record.get("key") != key or not _manifest.is_key(key):
        raise TierError("record key does not match", code="tier_record")
    parts = record.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in parts):
        raise TierError("record has no key parts", code="tier_record")
    # The parts must hash to the key: an entry cannot claim a key it was not built for.
    try:
        if key_of(parts) != key:
            raise TierError("key parts do not hash to the key", code="tier_record")
    except (TypeError, ValueError, RecursionError):
        raise TierError("key parts are not plain JSON", code="tier_record") from None
    for name in ("provider",):
        if record.get(name) is not None and not _manifest.printable(record[name], 256):
            raise TierError(f"record field {name!r} is not a printable string", code="tier_record")
    model = record.get("model")
    if model is not None and not (isinstance(model, dict) and (model.get("name") is None or _manifest.file_name(model["name"]))):
        raise TierError("record's model name is not a file name", code="tier_record")
    files = record.get("files")
    if not isinstance(files, dict) or not files or len(files) > _MAX_FILES:
        raise TierError("record has no file table", code="tier_record")
    for name, spec in files.items():
        if not _manifest.safe_name(name):
            raise TierError(f"record names an unsafe file {name!r}", code="tier_unsafe")
        if not (isinstance(spec, dict) and isinstance(spec.get("size"), int) and not isinstance(spec["size"], bool)
                and 0 <= spec["size"] < (1 << 50)
                and isinstance(spec.get("sha256"), str) and _SHA_RE.fullmatch(spec["sha256"])):
            raise TierError(f"record entry for {name!r} lacks size or sha256", code="tier_record")
    if MANIFEST not in files or CONTEXT not in files:
        raise TierError(f"record lacks {MANIFEST} or {CONTEXT}", code="tier_record")
    return files


def parse_json(raw: bytes, what: str) -> Any:
    """Untrusted JSON: a syntax error, a nesting bomb or a huge number is a ``tier_record`` refusal."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise TierError(f"{what} is not valid JSON ({type(e).__name__})", code="tier_record") from None


def _copy_checked(src: IO[bytes], dst: Path, size: int, sha: str, what: str) -> None:
    h = hashlib.sha256()
    n = 0
    fd = _fs.create_exclusive(dst)
    with os.fdopen(fd, "wb") as out:
        while True:
            # Never read more than the record promises (+1 to detect a longer file).
            chunk = src.read(min(_CHUNK, size + 1 - n))
            if not chunk:
                break
            n += len(chunk)
            if n > size:
                raise TierError(f"{what} is larger than its recorded {size} bytes", code="tier_digest")
            h.update(chunk)
            out.write(chunk)
    if n != size:
        raise TierError(f"{what} is {n} bytes, recorded {size}", code="tier_digest")
    if not hmac.compare_digest(h.hexdigest(), sha):
        raise TierError(f"{what} content does not match its recorded sha256", code="tier_digest")


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
