"""Read-only and remote tiers consulted on a local miss, and the one way their bytes enter the cache.

Lookup order on a load: the local cache, then each tier in the order given (bundles, a remote store),
and only then a compile. A tier never hands a session its own files: every entry it offers is copied
into a private staging folder, checked (sizes, SHA-256 of each file, optionally an HMAC-SHA256
signature over the record that lists them, key parts that hash to the requested key, EPContext paths
that stay inside the entry) and committed through :meth:`Store.publish`, so a tier-filled entry has
the same atomicity and integrity as a compiled one and every later launch is a plain local hit.

A *record* describes one entry, identically in a bundle's index and in the remote store::

    {"key": "<32 hex>", "provider": "QNNExecutionProvider", "model": {"name": ..., "size": ...},
     "parts": [[label, value], ...],
     "files": {"manifest.json": {"size": n, "sha256": hex}, "ctx.onnx": {...}, "ctx_qnn.bin": {...}}}

xxh3 (the local digests) is fast but not collision-resistant; bytes that cross a trust boundary are
checked with SHA-256 so that a signature over the record also covers every file's content.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import _fingerprint
from ._store import _KEY_RE, CONTEXT, MANIFEST, BrokenEntry, Entry, Store, safe_name

if TYPE_CHECKING:
    from ._cache import ContextCache

log = logging.getLogger("ctxcache")

#: Key parts that describe the machine a context was compiled ON rather than the context: a vendor
#: compiles for a Snapdragon target on an x86 build host (FIELD-NOTES), so a bundle built there differs
#: from the device in exactly these. ``match="portable"`` ignores them (see :func:`portable_key`).
HOST_PARTS = ("host", "devices", "ep_libraries")

#: Environment variable holding the HMAC key for bundle and remote signatures (an argument wins).
SIGNING_KEY_ENV = "CTXCACHE_SIGNING_KEY"
RECORD_FORMAT = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
_MAX_FILES = 64
_CHUNK = 1 << 20
# Manifest keys that describe one store's copy, not the entry: never exported, rebuilt on publish.
_LOCAL_ONLY = ("format", "key", "artifacts", "entry_id", "origin")


class TierError(Exception):
    """A tier's entry was refused (``code``: ``tier_digest``, ``tier_signature``, ``tier_record``,
    ``tier_unsafe``, ``tier_bad_context``) or the tier could not be read (``tier_unreachable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


#: Codes that mean the bytes were wrong (a fault), as opposed to a tier being absent or down.
INTEGRITY_CODES = frozenset({"tier_digest", "tier_signature", "tier_record", "tier_unsafe", "tier_bad_context"})

Opener = Callable[[str], AbstractContextManager[IO[bytes]]]


@runtime_checkable
class Tier(Protocol):
    """What :class:`ContextCache` needs from a tier. ``kind`` names it in ``LoadResult.tier``."""

    kind: str

    def describe(self) -> str: ...

    def fetch(self, store: Store, key: str, parts: Sequence[tuple[str, Any]] = ()) -> Entry | None:
        """Install ``key`` into ``store`` (caller holds the key's lock); ``None`` if the tier lacks it.

        ``parts`` are the key's parts (for tiers that match on :func:`portable_key`). Raises
        :class:`TierError` when the tier has the entry but its bytes are refused or unreadable.
        """
        ...


def portable_key(parts: Iterable[Sequence[Any]]) -> str:
    """The key without :data:`HOST_PARTS`: what a context compiled on another host must still match
    (model, provider, binary options, onnxruntime and EP/SDK versions, compile settings, extra_key)."""
    return _fingerprint.build([(str(p[0]), p[1]) for p in parts if p[0] not in HOST_PARTS]).key


def find_record(records: dict[str, Any], key: str, parts: Sequence[tuple[str, Any]], match: str) -> tuple[str, Any] | None:
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


# -- signing ----------------------------------------------------------------------------------------
def resolve_signing_key(key: str | bytes | None) -> bytes | None:
    """Argument, else ``$CTXCACHE_SIGNING_KEY`` (read now, never at import), else ``None``."""
    if key is None:
        key = os.environ.get(SIGNING_KEY_ENV) or None
    if key is None:
        return None
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ValueError("an empty signing key would sign nothing; pass a secret or leave it unset")
    return raw


def sign(data: bytes, key: bytes) -> bytes:
    """The signature file's content: ``hmac-sha256:<hex>``."""
    return b"hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest().encode()


def check_signature(data: bytes, signature: bytes | None, key: bytes | None, what: str) -> None:
    """Refuse ``data`` when a key is configured and the signature is missing or wrong.

    Without a key the signature is not checked (the digests still are): a bundle signed by a vendor
    stays usable by an app that does not configure the key.
    """
    if key is None:
        return
    if signature is None:
        raise TierError("tier_signature", f"{what} is not signed, but a signing key is configured")
    expected = sign(data, key)
    if not hmac.compare_digest(signature.strip(), expected):
        raise TierError("tier_signature", f"{what}: signature does not match (tampered, or signed with another key)")


# -- records ------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def portable_manifest(entry: Entry) -> bytes:
    """The entry's manifest without what only describes this store's copy (stat signatures, ids)."""
    data = {k: v for k, v in entry.manifest.items() if k not in _LOCAL_ONLY}
    data["key"] = entry.key
    return json.dumps(data, sort_keys=True, indent=1).encode()


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
        raise TierError("tier_record", "record is not a JSON object")
    if not isinstance(record.get("format"), int) or record["format"] > RECORD_FORMAT:
        raise TierError("tier_record", f"record format {record.get('format')!r} is not readable by this ctxcache")
    if record.get("key") != key or not _KEY_RE.fullmatch(key):
        raise TierError("tier_record", "record key does not match")
    parts = record.get("parts")
    if not isinstance(parts, list) or not all(isinstance(p, list) and len(p) == 2 for p in parts):
        raise TierError("tier_record", "record has no key parts")
    # The parts must hash to the key: an entry cannot claim a key it was not built for.
    if _fingerprint.build([(str(p[0]), p[1]) for p in parts]).key != key:
        raise TierError("tier_record", "key parts do not hash to the key")
    files = record.get("files")
    if not isinstance(files, dict) or not files or len(files) > _MAX_FILES:
        raise TierError("tier_record", "record has no file table")
    for name, spec in files.items():
        if not safe_name(name):
            raise TierError("tier_unsafe", f"record names an unsafe file {name!r}")
        if not (isinstance(spec, dict) and isinstance(spec.get("size"), int) and spec["size"] >= 0
                and isinstance(spec.get("sha256"), str) and _SHA_RE.fullmatch(spec["sha256"])):
            raise TierError("tier_record", f"record entry for {name!r} lacks size or sha256")
    if MANIFEST not in files or CONTEXT not in files:
        raise TierError("tier_record", f"record lacks {MANIFEST} or {CONTEXT}")
    return files


def _copy_checked(src: IO[bytes], dst: Path, size: int, sha: str, what: str) -> None:
    h = hashlib.sha256()
    n = 0
    with open(dst, "xb") as out:
        while True:
            # Never read more than the record promises (+1 to detect a longer file).
            chunk = src.read(min(_CHUNK, size + 1 - n))
            if not chunk:
                break
            n += len(chunk)
            if n > size:
                raise TierError("tier_digest", f"{what} is larger than its recorded {size} bytes")
            h.update(chunk)
            out.write(chunk)
    if n != size:
        raise TierError("tier_digest", f"{what} is {n} bytes, recorded {size}")
    if not hmac.compare_digest(h.hexdigest(), sha):
        raise TierError("tier_digest", f"{what} content does not match its recorded sha256")


def install(store: Store, key: str, record: Any, opener: Opener, origin: dict[str, Any],
            local_parts: Sequence[tuple[str, Any]] = ()) -> Entry:
    """Copy a tier's entry into staging, verify everything, publish by one rename. Caller holds the lock.

    ``record`` may be for another key that matched portably (built on another host): it is verified
    against its own key, then published under ``key`` with ``local_parts``; its own key and parts
    are kept in the manifest's ``origin``.
    """
    from ._compile import CompileFailed, _check_output

    rkey = record.get("key") if isinstance(record, dict) else None
    portable = isinstance(rkey, str) and rkey != key
    if portable:
        try:
            same = bool(local_parts) and portable_key(record.get("parts") or []) == portable_key(local_parts)
        except (TypeError, IndexError, KeyError, ValueError):
            same = False  # malformed parts: check_record would refuse them anyway
        if not same:
            raise TierError("tier_record", "record is for another key")
    files = check_record(record, str(rkey) if portable else key)
    store.ensure()
    staging = store.new_staging(key)
    try:
        for name, spec in sorted(files.items()):
            where = f"{origin.get('location', '?')}:{key[:12]}/{name}"
            try:
                with opener(name) as src:
                    _copy_checked(src, staging / name, spec["size"], spec["sha256"], where)
            except FileNotFoundError:
                raise TierError("tier_record", f"{where} is listed but missing") from None
        try:
            manifest = json.loads((staging / MANIFEST).read_bytes())
        except ValueError as e:
            raise TierError("tier_record", f"entry manifest is not JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("key") != record["key"] or manifest.get("parts") != record["parts"]:
            raise TierError("tier_record", "entry manifest does not match its record")
        try:
            _check_output(staging)  # EPContext paths must stay inside the entry, as for a compile
        except CompileFailed as e:
            raise TierError("tier_bad_context", str(e)) from None
        os.unlink(staging / MANIFEST)
        clean = {k: v for k, v in manifest.items() if k not in _LOCAL_ONLY}
        clean["origin"] = dict(origin, time=time.time())
        if portable:
            # The entry now answers to this machine's key; where it was built stays on record.
            clean["origin"].update(key=record["key"], parts=record["parts"])
            clean["parts"] = [list(p) for p in local_parts]
        try:
            return store.publish(staging, key, clean)
        except BrokenEntry as e:
            raise TierError("tier_record", e.message) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# -- configuration --------------------------------------------------------------------------------------
def coerce(tiers: Iterable[Tier | str | os.PathLike[str]] | None) -> list[Tier]:
    """``ContextCache(tiers=...)`` items: tier objects, bundle paths (folder or .tar), ORT model package
    folders, ``s3://`` URLs."""
    out: list[Tier] = []
    for item in tiers or ():
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            if "://" in text:  # s3:// via boto3, any other scheme via fsspec
                from ._remote import RemoteTier

                out.append(RemoteTier(text))
            else:
                from ._package import ModelPackageTier, is_model_package

                if is_model_package(text):
                    out.append(ModelPackageTier(text))
                else:
                    from ._bundle import Bundle

                    out.append(Bundle(text))
        elif isinstance(item, Tier):
            out.append(item)
        else:
            raise TypeError(f"a tier must be a bundle path, an s3:// URL or a tier object, not {type(item).__name__}")
    return out


# -- the loader's hooks ---------------------------------------------------------------------------------
def _rejected_path(store: Store, key: str) -> Path:
    return store.negative_dir / f"{key}.tiers.json"


def remember_rejection(cache: ContextCache, key: str, tier: Tier, code: str) -> None:
    """A tier entry that verified but failed to load: skip the tiers for this key until the TTL ends,
    so the next launch compiles instead of fetching the same bad entry again."""
    from . import _fs

    try:
        _fs.atomic_write(
            _rejected_path(cache.store, key),
            json.dumps({"tier": tier.describe(), "code": code, "time": time.time()}).encode(),
            durable=False,
        )
    except OSError as e:
        log.debug("could not remember tier rejection for %s: %s", key[:12], e)


def _recently_rejected(cache: ContextCache, key: str) -> bool:
    try:
        data = json.loads(_rejected_path(cache.store, key).read_bytes())
        return abs(time.time() - float(data["time"])) < cache.negative_ttl
    except (OSError, ValueError, KeyError, TypeError):
        return False


def fill_from_tiers(cache: ContextCache, key: str, parts: Sequence[tuple[str, Any]] = ()) -> tuple[Entry, Tier] | None:
    """Ask each tier for ``key`` (caller holds the key's lock). Never raises, except in strict mode for
    bytes that failed verification."""
    from .errors import CacheFaultError

    if _recently_rejected(cache, key):
        log.info("tiers skipped for %s: an entry from them failed to load recently", key[:12])
        return None
    for tier in cache.tiers:
        start = time.perf_counter()
        try:
            entry = tier.fetch(cache.store, key, parts)
        except TierError as e:
            level = logging.WARNING
            log.log(level, "tier %s refused for %s (%s); trying the next tier or compiling", tier.describe(), key[:12], e)
            if cache.strict and e.code in INTEGRITY_CODES:
                raise CacheFaultError(f"tier fault ({e}); strict mode is on", code=e.code, key=key) from None
            continue
        except Exception as e:  # a tier must never break the app
            log.warning("tier %s failed for %s (%s: %s); compiling locally", tier.describe(), key[:12], type(e).__name__, e)
            continue
        if entry is not None:
            log.info("filled %s from %s in %.3f s", key[:12], tier.describe(), time.perf_counter() - start)
            return entry, tier
    return None


def tier_report(cache: ContextCache, fingerprint: Any = None) -> list[dict[str, Any]]:
    """What ``doctor`` / ``explain`` can show: each tier, in lookup order, and (given the
    :class:`~ctxcache.Fingerprint` a load would use, from ``cache.key(...)``) whether it holds that entry.

    Read-only: nothing is fetched or installed. ``has`` is ``"exact"``, ``"portable"`` (built on another
    host; used only by a tier with ``match="portable"``), ``None``, or ``"error: <why>"``.
    """
    out: list[dict[str, Any]] = []
    for tier in cache.tiers:
        item: dict[str, Any] = {"tier": tier.describe(), "kind": tier.kind, "match": getattr(tier, "match", "exact")}
        if fingerprint is not None:
            try:
                item["has"] = tier.lookup(fingerprint.key, fingerprint.parts) if hasattr(tier, "lookup") else None
            except TierError as e:
                item["has"] = f"error: {e}"
            except Exception as e:  # a report never raises
                item["has"] = f"error: {type(e).__name__}: {e}"
        out.append(item)
    return out


def write_back(cache: ContextCache, entry: Entry) -> None:
    """Offer a freshly compiled entry to every tier that accepts writes (a remote with write_back=True)."""
    if "origin" in entry.manifest:
        return
    for tier in cache.tiers:
        push = getattr(tier, "write_back_entry", None)
        if push is None:
            continue
        try:
            push(entry)
        except Exception as e:  # an upload failure costs the fleet a compile, never this app its session
            log.warning("write-back of %s to %s failed: %s: %s", entry.key[:12], tier.describe(), type(e).__name__, e)


def entries_matching(
    cache: ContextCache,
    *,
    models: Sequence[str | os.PathLike[str]] | None = None,
    provider: str | None = None,
    options: dict[str, Any] | None = None,
    keys: Sequence[str] | None = None,
) -> list[Entry]:
    """Committed entries selected by model file(s), provider name, binary options subset and/or key prefixes."""
    from ._loader import _model_arg

    digests = {cache._loader.digest(_model_arg(m)).digest for m in models} if models else None
    want_opts = {str(k): str(v) for k, v in (options or {}).items()}
    out = []
    for item in cache.store.iter_entries():
        if not isinstance(item, Entry):
            continue
        parts = item.parts
        if digests is not None and parts.get("model") not in digests:
            continue
        if provider is not None and parts.get("ep") != provider:
            continue
        raw_opts = parts.get("ep_options")
        ep_opts: dict[str, Any] = raw_opts if isinstance(raw_opts, dict) else {}
        if any(str(ep_opts.get(k)) != v for k, v in want_opts.items()):
            continue
        if keys is not None and not any(item.key.startswith(k) for k in keys):
            continue
        out.append(item)
    return out
