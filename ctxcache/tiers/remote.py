"""A shared remote tier on S3-compatible object storage (AWS S3, MinIO, Ceph, R2...) via boto3, or on
any fsspec URL (a shared folder ``file:///mnt/share/ctxcache``, ``gcs://``, ``az://``...).

Read-through: on a local miss the entry is fetched, verified and published into the local cache like a
bundle's (``tiers._base.install``). Optional write-back: an entry compiled here is uploaded for the fleet.

Object layout under ``s3://bucket/prefix`` (or the fsspec URL)::

    v1/<key>/files/<name>        manifest.json, ctx.onnx, ctx_qnn.bin ...
    v1/<key>/record.json.sig     optional: hmac-sha256:<hex> over record.json's bytes
    v1/<key>/record.json.ed25519 Ed25519 signature lines (ed25519:<key id>:<base64>) over those bytes
    v1/<key>/record.json         the record (sizes + SHA-256 of each file, key parts); written LAST,
                                 so a reader that finds it finds the files it lists

Remote bytes are never trusted: every file is checked against the record, and by default the record
must carry a valid Ed25519 signature from a key the device trusts (whoever can write to a shared bucket
could otherwise make every device of the fleet run their binary). ``require_signature=False`` opts out
(logged once); a configured HMAC secret is checked in addition, as before. An outage costs one short timeout, then the tier
is skipped for ``retry_after`` seconds (the app compiles locally meanwhile); it never raises into the app.

boto3 (``pip install 'ctxcache[remote]'``) and fsspec are optional, imported only on a local miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

from .._key import portable_key
from .._manifest import MANIFEST, Entry, is_key, portable
from .._remote_store import FsspecStore, RemoteUnavailable, S3Store
from .._trust import SigningKey, SigningKeyArg, Trust, ed25519_keys, hmac_secret
from ..errors import TierError
from ._base import (
    Match,
    Offer,
    Parts,
    check_match,
    check_signature,
    make_record,
    parse_json,
    read_signer,
    read_signer_or_refuse,
    resolve_signing_keys,
    sha256_file,
    sign,
    sign_ed25519,
)

log = logging.getLogger("ctxcache")

LAYOUT = "v1"
RECORD = "record.json"
RECORD_SIG = "record.json.sig"
RECORD_ED25519 = "record.json.ed25519"
#: What an Ed25519 signature over a remote record is for (never valid over anything else).
CONTEXT = "remote-record"
_MAX_RECORD = 1 << 20
_MAX_SIG = 64 << 10

_warned_unsigned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unsigned_once(tier: RemoteTier) -> None:
    with _warned_lock:
        if tier.url in _warned_unsigned:
            return
        _warned_unsigned.add(tier.url)
    log.warning("%s: require_signature=False: entries without a trusted signature are used; anyone who can write "
                "to this store can run code on every device that reads it", tier.describe())


class RemoteTier:
    """A shared cache in object storage: S3-compatible (``s3://``, via boto3) or any fsspec URL.

    Args:
        url: ``s3://bucket/prefix``, or an fsspec URL (``file:///mnt/share/ctxcache``, ``gcs://b/p``...).
        endpoint_url: for non-AWS S3 servers (MinIO, a local test server). boto3 also reads
            ``$AWS_ENDPOINT_URL``; credentials come from boto3's usual chain (env, ~/.aws, role).
        write_back: upload entries compiled on this machine.
        signing_key: what uploads are signed with: an Ed25519 private key (PEM, ``ctxcache keygen``; its
            public key is then trusted for this tier too), an HMAC secret, or a list (a rotation). Default
            ``$CTXCACHE_SIGNING_KEY``. An HMAC secret is also checked on every record read.
        require_signature: records must carry a valid Ed25519 signature from a trusted key
            (``ContextCache(trusted_keys=...)``) — the default. ``False`` accepts unsigned records (logged
            once as a warning); a bad or revoked signature is still refused.
        timeout: seconds for connecting and for each read (S3); keep it short, a compile is the fallback.
        retry_after: after an outage, seconds during which this process does not try the remote again.
        anonymous: unsigned S3 requests (a public read-only bucket).
        client: a ready boto3 S3 client (overrides endpoint/timeout/anonymous).
        storage_options: passed to fsspec for non-S3 URLs.
        match: ``"exact"``, or ``"portable"`` to also use an entry pushed from another host (a build
            farm) whose key differs only in ``host``, ``devices`` and ``ep_libraries`` (as for Bundle).
    """

    kind = "remote"

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        write_back: bool = False,
        signing_key: SigningKeyArg = None,
        require_signature: bool = True,
        timeout: float = 3.0,
        retry_after: float = 60.0,
        anonymous: bool = False,
        region: str | None = None,
        client: Any = None,
        storage_options: dict[str, Any] | None = None,
        match: Match = "exact",
    ) -> None:
        self.match: Match = check_match(match)
        self.url = url
        self.endpoint_url = endpoint_url
        self.write_back = write_back
        self._signing_key = signing_key
        self.require_signature = bool(require_signature)
        self.timeout = timeout
        self.retry_after = retry_after
        self.anonymous = anonymous
        self.region = region
        self.storage_options = dict(storage_options or {})
        self._backend: S3Store | FsspecStore = S3Store(self, client) if url.startswith("s3://") else FsspecStore(self)
        self._down_until = 0.0

    def __repr__(self) -> str:
        return f"RemoteTier({self.url!r})"

    def describe(self) -> str:
        return f"remote {self.url}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    # -- plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def _obj(key: str, *rest: str) -> str:
        return "/".join([LAYOUT, key, *rest])

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Map transport and server errors to ``tier_unreachable``, and remember the outage."""
        if time.monotonic() < self._down_until:
            raise TierError(f"{self.describe()} was unreachable recently; not retrying yet", code="tier_unreachable")
        try:
            yield
        except TierError:
            raise
        except RemoteUnavailable as e:
            raise TierError(str(e), code="tier_unreachable") from None
        except Exception as e:
            if self._backend.transport_error(e):
                self._down_until = time.monotonic() + self.retry_after
                raise TierError(f"{what}: {type(e).__name__}: {e}", code="tier_unreachable") from None
            raise

    # -- the tier protocol --------------------------------------------------------------------------
    def _portable_candidates(self, parts: Parts) -> list[str]:
        # Pointers written by push: v1/portable/<portable key>/<key>. Untrusted like everything else:
        # install() re-checks that the record's parts really match this machine's portable key.
        names = self._backend.names(self._obj("portable", portable_key(parts)) + "/")
        return sorted(n for n in names if is_key(n))

    @contextlib.contextmanager
    def offer(self, key: str, parts: Parts = (), *, trust: Trust | None = None) -> Iterator[Offer | None]:
        b = self._backend
        with self._guard(f"fetching {key[:12]}"):
            rkey = key
            raw = b.get(self._obj(key, RECORD), _MAX_RECORD)
            if raw is None and self.match == "portable" and parts:
                for rkey in self._portable_candidates(parts):
                    raw = b.get(self._obj(rkey, RECORD), _MAX_RECORD)
                    if raw is not None:
                        break
            if raw is None:
                yield None
                return
            if len(raw) > _MAX_RECORD:
                raise TierError(f"{self.describe()}: record for {key[:12]} is too large", code="tier_record")
            what = f"{self.describe()} record {key[:12]}"
            keys = resolve_signing_keys(self._signing_key)
            secret = hmac_secret(keys)
            sig = b.get(self._obj(rkey, RECORD_SIG), 4096) if secret is not None else None
            check_signature(raw, sig, secret, what)
            if not self.require_signature:
                _warn_unsigned_once(self)
            signer = read_signer_or_refuse(raw, b.get(self._obj(rkey, RECORD_ED25519), _MAX_SIG), CONTEXT,
                                           trust if trust is not None else Trust(), what,
                                           hmac_checked=secret is not None, own=ed25519_keys(keys))
            record = parse_json(raw, f"{self.describe()} record for {key[:12]}")
            files_of = rkey

            def opener(name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
                return b.stream(self._obj(files_of, "files", name))

            yield Offer(record if isinstance(record, dict) else {}, opener, {"tier": self.kind, "location": self.url}, signer)

    def lookup(self, key: str, parts: Parts = ()) -> Match | None:
        if self.has(key):
            return "exact"
        with self._guard("listing"):
            return "portable" if parts and self._portable_candidates(parts) else None

    def has(self, key: str) -> bool:
        with self._guard(f"looking up {key[:12]}"):
            return bool(self._backend.exists(self._obj(key, RECORD)))

    def push(self, entry: Entry, *, overwrite: bool = False, signing_key: SigningKeyArg = None) -> bool:
        """Upload one local entry (the caller verified it), signed with ``signing_key`` (default: the tier's);
        ``False`` if the remote already has it."""
        keys = resolve_signing_keys(signing_key if signing_key is not None else self._signing_key)
        if not overwrite and self.has(entry.key):
            return False
        b = self._backend
        with self._guard(f"pushing {entry.key[:12]}"):
            from .. import _fs

            for art in entry.artifacts:
                with open(_fs.open_regular(entry.path / art["name"]), "rb", closefd=True) as f:
                    b.put(self._obj(entry.key, "files", art["name"]), f)
            b.put(self._obj(entry.key, "files", MANIFEST), portable(entry))
            raw = self.record_bytes(entry)
            secret = hmac_secret(keys)
            if secret is not None:
                b.put(self._obj(entry.key, RECORD_SIG), sign(raw, secret))
            # Always written (empty when unsigned): an overwrite must not leave an old signature beside a
            # new record, which would then read as tampered.
            b.put(self._obj(entry.key, RECORD_ED25519), sign_ed25519(raw, keys, CONTEXT))
            # The record goes last: it is what readers look for, so they never see a half-uploaded entry.
            b.put(self._obj(entry.key, RECORD), raw)
            parts = entry.manifest.get("parts")
            if isinstance(parts, list):  # then the pointer that portable readers (other hosts) look for
                b.put(self._obj("portable", portable_key(parts), entry.key), entry.key.encode())
        log.info("pushed %s to %s", entry.key[:12], self.describe())
        return True

    def signing_keys(self) -> tuple[SigningKey, ...]:
        """What this tier signs uploads with (its ``signing_key``, else ``$CTXCACHE_SIGNING_KEY``)."""
        return resolve_signing_keys(self._signing_key)

    def sign_present(self, entry: Entry, *, signing_key: SigningKeyArg = None) -> str:
        """Add the signing keys' signatures to this remote's record of ``entry`` (verified by the caller):
        ``present`` when it needs none (no key, or already signed by each), ``signed`` when added,
        ``differs`` when the remote record is not exactly the one ``entry`` would upload (nothing signed)."""
        keys = resolve_signing_keys(signing_key if signing_key is not None else self._signing_key)
        if not keys:
            return "present"
        b = self._backend
        with self._guard(f"signing {entry.key[:12]}"):
            raw = b.get(self._obj(entry.key, RECORD), _MAX_RECORD)
            if raw is None:
                return "differs"
            blob = b.get(self._obj(entry.key, RECORD_ED25519), _MAX_SIG) or b""
            secret = hmac_secret(keys)
            own = ed25519_keys(keys)
            missing = [k for k in own if read_signer(raw, blob, CONTEXT, Trust(), own=(k,)).status != "trusted"]
            need_hmac = secret is not None and (b.get(self._obj(entry.key, RECORD_SIG), 4096) or b"").strip() != sign(raw, secret)
            if not missing and not need_hmac:
                return "present"
            if raw != self.record_bytes(entry):  # only bytes verified here get this key's word
                return "differs"
            if need_hmac and secret is not None:
                b.put(self._obj(entry.key, RECORD_SIG), sign(raw, secret))
            if missing:
                # Other keys' lines stay (a rotation); a stale line by one of these keys is replaced. The new
                # lines go first: readers look at the first 16 lines only, whatever else the store holds.
                ids = {k.key_id for k in missing}
                kept = [ln.strip() for ln in blob.decode("ascii", "replace").splitlines()
                        if ln.strip() and [*ln.split(":"), ""][1].lower() not in ids]
                lines = "".join(ln + "\n" for ln in kept[:16 - len(missing)]).encode()
                b.put(self._obj(entry.key, RECORD_ED25519), sign_ed25519(raw, missing, CONTEXT) + lines)
        log.info("signed %s on %s", entry.key[:12], self.describe())
        return "signed"

    @staticmethod
    def record_bytes(entry: Entry) -> bytes:
        """The exact record :meth:`push` uploads for ``entry`` (sizes and SHA-256 of its files, key parts)."""
        files: dict[str, dict[str, Any]] = {}
        for art in entry.artifacts:
            files[art["name"]] = {"size": art["size"], "sha256": sha256_file(entry.path / art["name"])}
        manifest = portable(entry)
        files[MANIFEST] = {"size": len(manifest), "sha256": hashlib.sha256(manifest).hexdigest()}
        return json.dumps(make_record(entry, dict(sorted(files.items()))), sort_keys=True, indent=1).encode()

    def keys(self) -> list[str]:
        """Every key with an entry folder in the remote store."""
        with self._guard("listing"):
            return sorted(k for k in self._backend.children(LAYOUT + "/") if is_key(k))
