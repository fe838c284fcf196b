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
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from .. import _deadline, _fs
from .._key import portable_key
from .._manifest import MANIFEST, Entry, is_key, portable
from .._trust import SigningKeyArg, Trust, ed25519_keys, hmac_secret
from ..errors import TierError
from ._base import (
    Match,
    Offer,
    Parts,
    check_match,
    check_signature,
    make_record,
    open_plain,
    parse_json,
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


class RemoteUnavailable(ImportError):
    """The client library for this URL (boto3 for s3://, fsspec otherwise) is not installed."""


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise RemoteUnavailable(
            "the remote tier needs boto3 for s3:// URLs: pip install 'ctxcache[remote]'"
        ) from None
    return boto3


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 URL looks like s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


# -- storage backends: names are relative ("v1/<key>/record.json"); each maps them to its objects ------
class _S3:
    """boto3, with one attempt and short timeouts."""

    def __init__(self, tier: RemoteTier, client: Any) -> None:
        self.tier = tier
        self.bucket, self.prefix = parse_url(tier.url)
        self._client = client
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                boto3 = _boto3()
                from botocore.config import Config

                kw: dict[str, Any] = {}
                if self.tier.anonymous:
                    from botocore import UNSIGNED

                    kw["signature_version"] = UNSIGNED
                config = Config(
                    connect_timeout=self.tier.timeout,
                    read_timeout=self.tier.timeout,
                    # One attempt: the fallback (a local compile) is always there, and boto3's default
                    # retries with backoff would turn a dead server into many seconds of waiting.
                    # (botocore's max_attempts counts retries only; total_max_attempts counts all.)
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    **kw,
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.tier.endpoint_url, config=config, region_name=self.tier.region or "us-east-1"
                )
            return self._client

    def _key(self, name: str) -> str:
        return self.prefix + name

    @staticmethod
    def _missing(e: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")

    def get(self, name: str, limit: int | None, deadline: float) -> bytes | None:
        def fetch() -> bytes | None:
            try:
                resp = self.client().get_object(Bucket=self.bucket, Key=self._key(name))
            except Exception as e:
                if self._missing(e):
                    return None
                raise
            with contextlib.closing(resp["Body"]) as body:
                return _deadline.read_until(body, limit, deadline, name)

        return _deadline.within(deadline, name, fetch)

    @contextlib.contextmanager
    def stream(self, name: str, deadline: float) -> Iterator[IO[bytes]]:
        try:
            resp = _deadline.within(deadline, name, lambda: self.client().get_object(Bucket=self.bucket, Key=self._key(name)))
        except Exception as e:
            if self._missing(e):
                raise FileNotFoundError(name) from None
            raise
        with _deadline.DeadlineReader(resp["Body"], deadline, name) as body:
            yield body  # type: ignore[misc]

    def put(self, name: str, data: bytes | IO[bytes]) -> None:
        self.client().put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def exists(self, name: str, deadline: float) -> bool:
        try:
            _deadline.within(deadline, name, lambda: self.client().head_object(Bucket=self.bucket, Key=self._key(name)))
            return True
        except Exception as e:
            if self._missing(e):
                return False
            raise

    def _list(self, name: str, field: str, deadline: float) -> list[str]:
        base = self._key(name)

        def pages() -> list[str]:
            out: list[str] = []
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base,
                                                                                 Delimiter="/"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"listing {base}: not finished within the fetch deadline")
                out += [(item["Prefix"] if field == "CommonPrefixes" else item["Key"])[len(base):].strip("/")
                        for item in page.get(field, [])]
            return out

        return _deadline.within(deadline, base, pages)

    def children(self, name: str, deadline: float) -> list[str]:
        return self._list(name, "CommonPrefixes", deadline)

    def names(self, name: str, deadline: float) -> list[str]:
        """Object names directly under ``name`` (a folder-like prefix)."""
        return self._list(name, "Contents", deadline)

    def transport_error(self, e: Exception) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        return isinstance(e, (BotoCoreError, ClientError, TimeoutError))


class _Fsspec:
    """Any fsspec URL (file://, gcs://, az://, https:// read-only, ...): the same object layout."""

    def __init__(self, tier: RemoteTier) -> None:
        self.tier = tier
        self._fs: Any = None
        self._root = ""

    def fs(self) -> Any:
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise RemoteUnavailable(
                    f"the remote tier needs fsspec for {self.tier.url}: pip install 'ctxcache[remote]'") from None
            self._fs, root = fsspec.core.url_to_fs(self.tier.url, **self.tier.storage_options)
            self._root = str(root).rstrip("/")
        return self._fs

    def _path(self, name: str) -> str:
        self.fs()  # sets _root
        return f"{self._root}/{name}" if self._root else name

    def _local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs(), LocalFileSystem)

    @contextlib.contextmanager
    def _open(self, name: str, deadline: float) -> Iterator[IO[bytes]]:
        path = self._path(name)
        if self._local():
            # A regular file only, opened without blocking and without following a link: a FIFO at
            # record.json in a shared folder would otherwise block the load for good.
            from pathlib import Path

            with open_plain(Path(path)) as f:
                yield f
            return
        f = _deadline.within(deadline, name, lambda: self.fs().open(path, "rb"))
        with _deadline.DeadlineReader(f, deadline, name) as reader:
            yield reader  # type: ignore[misc]

    def get(self, name: str, limit: int | None, deadline: float) -> bytes | None:
        try:
            with self._open(name, deadline) as f:
                return _deadline.read_until(f, limit, deadline, name)
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def stream(self, name: str, deadline: float) -> Iterator[IO[bytes]]:
        with self._open(name, deadline) as f:
            yield f

    def put(self, name: str, data: bytes | IO[bytes]) -> None:
        fs = self.fs()
        path = self._path(name)
        parent = path.rsplit("/", 1)[0]
        try:
            fs.makedirs(parent, exist_ok=True)
        except (NotImplementedError, OSError):
            pass  # object stores have no folders
        fs.pipe_file(path, data if isinstance(data, bytes) else data.read())

    def exists(self, name: str, deadline: float) -> bool:
        return bool(_deadline.within(deadline, name, lambda: self.fs().exists(self._path(name))))

    def children(self, name: str, deadline: float) -> list[str]:
        try:
            items = _deadline.within(deadline, name, lambda: self.fs().ls(self._path(name).rstrip("/"), detail=False))
        except FileNotFoundError:
            return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in items]

    def names(self, name: str, deadline: float) -> list[str]:
        return self.children(name, deadline)

    def transport_error(self, e: Exception) -> bool:
        return isinstance(e, (OSError, TimeoutError)) and not isinstance(e, FileNotFoundError)


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
        fetch_timeout: seconds for a whole fetch: one entry (record, signatures and every file) or one
            lookup or listing. A server that is slower, or stalls (headers, then a byte a second), is
            given up at that point and counted as unreachable for ``retry_after``; the load compiles.
            Size it to the largest context over the slowest link you support (default 120).
        retry_after: after an outage, seconds during which this process does not try the remote again.
        anonymous: unsigned S3 requests (a public read-only bucket).
        client: a ready boto3 S3 client (overrides endpoint/timeout/anonymous).
        storage_options: passed to fsspec for non-S3 URLs.
        match: ``"exact"``, or ``"portable"`` to also use an entry pushed from another host (a build
            farm) whose key differs only in ``host``, ``devices`` and ``ep_libraries`` (as for Bundle).
        tuf_root: a device's TUF trust root (the publisher's ``root.json``, shipped with the app): records
            are then read only through TUF (freshness, rollback, consistent snapshots, rotation; see
            ``ctxcache._tuf``), before the checks above, which stay.
        tuf_keys: a publisher's TUF key folder (``ctxcache tuf init``): every ``push`` is also a TUF publication.
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
        fetch_timeout: float = 120.0,
        retry_after: float = 60.0,
        anonymous: bool = False,
        region: str | None = None,
        client: Any = None,
        storage_options: dict[str, Any] | None = None,
        match: Match = "exact",
        tuf_root: str | os.PathLike[str] | None = None,
        tuf_keys: str | os.PathLike[str] | None = None,
    ) -> None:
        self.match: Match = check_match(match)
        self.url = url
        self.endpoint_url = endpoint_url
        self.write_back = write_back
        self._signing_key = signing_key
        self.require_signature = bool(require_signature)
        self.timeout = timeout
        if not fetch_timeout > 0:
            raise ValueError(f"fetch_timeout is seconds > 0, not {fetch_timeout!r}")
        self.fetch_timeout = float(fetch_timeout)
        self.retry_after = retry_after
        self.anonymous = anonymous
        self.region = region
        self.storage_options = dict(storage_options or {})
        self._backend: _S3 | _Fsspec = _S3(self, client) if url.startswith("s3://") else _Fsspec(self)
        self._down_until = 0.0
        self._tuf = self._tuf_client(tuf_root)
        self.tuf_keys = None if tuf_keys is None else os.fspath(tuf_keys)
        self._tuf_lock = threading.Lock()
        self._tuf_pending: dict[str, tuple[bytes, bytes]] | None = None

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
    def _deadline(self) -> float:
        return time.monotonic() + self.fetch_timeout

    def _portable_candidates(self, parts: Parts, deadline: float) -> list[str]:
        # Pointers written by push: v1/portable/<portable key>/<key>. Untrusted like everything else:
        # install() re-checks that the record's parts really match this machine's portable key.
        names = self._backend.names(self._obj("portable", portable_key(parts)) + "/", deadline)
        return sorted(n for n in names if is_key(n))

    @contextlib.contextmanager
    def offer(self, key: str, parts: Parts = (), *, trust: Trust | None = None) -> Iterator[Offer | None]:
        b = self._backend
        deadline = self._deadline()  # one for the whole fetch: the record, its signatures and every file
        with self._guard(f"fetching {key[:12]}"):
            rkey = key
            tuf_origin: dict[str, Any] | None = None
            if self._tuf is not None:  # TUF: the record only as the store's current targets list it
                rkey, raw, tuf_origin = self._tuf_record(key, parts)
            else:
                raw = b.get(self._obj(key, RECORD), _MAX_RECORD, deadline)
            if raw is None and self.match == "portable" and parts and self._tuf is None:
                for rkey in self._portable_candidates(parts, deadline):
                    raw = b.get(self._obj(rkey, RECORD), _MAX_RECORD, deadline)
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
            sig = b.get(self._obj(rkey, RECORD_SIG), 4096, deadline) if secret is not None else None
            check_signature(raw, sig, secret, what)
            if not self.require_signature:
                _warn_unsigned_once(self)
            # Under TUF the record's Ed25519 lines come from the same publication as the record (its target's
            # custom field), never from a separately writable object.
            ed_lines = (tuf_origin.pop("ed25519", b"") if tuf_origin is not None
                        else b.get(self._obj(rkey, RECORD_ED25519), _MAX_SIG, deadline))
            signer = read_signer_or_refuse(raw, ed_lines, CONTEXT,
                                           trust if trust is not None else Trust(), what,
                                           hmac_checked=secret is not None, own=ed25519_keys(keys))
            record = parse_json(raw, f"{self.describe()} record for {key[:12]}")
            files_of = rkey

            def opener(name: str) -> contextlib.AbstractContextManager[IO[bytes]]:
                return self._file(b, self._obj(files_of, "files", name), deadline)

            origin: dict[str, Any] = {"tier": self.kind, "location": self.url}
            if tuf_origin is not None:
                origin["tuf"] = tuf_origin  # what still_trusted() re-checks on every hit
            yield Offer(record if isinstance(record, dict) else {}, opener, origin, signer)

    def lookup(self, key: str, parts: Parts = ()) -> Match | None:
        if self.has(key):
            return "exact"
        with self._guard("listing"):
            return "portable" if parts and self._portable_candidates(parts, self._deadline()) else None

    def has(self, key: str) -> bool:
        with self._guard(f"looking up {key[:12]}"):
            return bool(self._backend.exists(self._obj(key, RECORD), self._deadline()))

    @contextlib.contextmanager
    def _file(self, b: _S3 | _Fsspec, name: str, deadline: float) -> Iterator[IO[bytes]]:
        """One file of an offer, read under the offer's deadline; a stall is this tier being unreachable."""
        with self._guard(f"fetching {name}"), b.stream(name, deadline) as f:
            yield f

    def push(self, entry: Entry, *, overwrite: bool = False, signing_key: SigningKeyArg = None) -> bool:
        """Upload one local entry (the caller verified it), signed with ``signing_key`` (default: the tier's);
        ``False`` if the remote already has it."""
        keys = resolve_signing_keys(signing_key if signing_key is not None else self._signing_key)
        if not overwrite and self.has(entry.key):
            return False
        files: dict[str, dict[str, Any]] = {}
        b = self._backend
        with self._guard(f"pushing {entry.key[:12]}"):
            for art in entry.artifacts:
                path = entry.path / art["name"]
                files[art["name"]] = {"size": art["size"], "sha256": sha256_file(path)}
                with open(_fs.open_regular(path), "rb", closefd=True) as f:
                    b.put(self._obj(entry.key, "files", art["name"]), f)
            manifest = portable(entry)
            files[MANIFEST] = {"size": len(manifest), "sha256": hashlib.sha256(manifest).hexdigest()}
            b.put(self._obj(entry.key, "files", MANIFEST), manifest)
            raw = json.dumps(make_record(entry, dict(sorted(files.items()))), sort_keys=True, indent=1).encode()
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
            if self.tuf_keys is not None:  # a TUF publication listing this record (consistent snapshot)
                self._tuf_publish(entry.key, raw, sign_ed25519(raw, keys, CONTEXT))
        log.info("pushed %s to %s", entry.key[:12], self.describe())
        return True

    def keys(self) -> list[str]:
        """Every key with an entry folder in the remote store."""
        with self._guard("listing"):
            return sorted(k for k in self._backend.children(LAYOUT + "/", self._deadline()) if is_key(k))

    # -- TUF (ctxcache._tuf): hooks kept apart from the fetch code above; one call site each ----------
    def _tuf_client(self, root: str | os.PathLike[str] | None) -> Any:
        if root is None:
            return None
        from .._tuf import Client

        return Client(self.url, root, self._tuf_read, budget=max(self.timeout, 1.0) * 4)

    def _tuf_read(self, name: str, limit: int) -> bytes | None:
        """One object for ngclient, with the backend's own read (its timeouts and deadline)."""
        data = self._backend.get(name, limit, self._deadline())
        if data is not None and len(data) > limit:
            raise TierError(f"{self.describe()}: {name} is larger than {limit} bytes", code="tier_mixed")
        return data

    def attach(self, cache_root: str | os.PathLike[str]) -> None:
        """Keep this device's verified TUF metadata (rollback floor, root chain) under ``cache_root``."""
        if self._tuf is not None:
            self._tuf.attach(cache_root)

    def tuf_refresh(self) -> int:
        """Verify the store's current TUF metadata now (what :func:`~ctxcache._tuf.still_trusted`
        judges installed entries by); returns the targets version. Raises :class:`TierError`."""
        if self._tuf is None:
            raise TierError(f"{self.describe()} has no tuf_root", code="tier_unreachable")
        with self._guard("refreshing TUF metadata"):
            up = self._tuf.refresh()
            return int(up._trusted_set.targets.version)

    def _tuf_record(self, key: str, parts: Parts) -> tuple[str, bytes | None, dict[str, Any] | None]:
        """(record key, TUF-verified record bytes or ``None``, what the manifest keeps of it)."""
        up = self._tuf.refresh()
        found = self._tuf.record(key, up)
        if found is None and self.match == "portable" and parts:
            # The portable pointers are hints, not trusted: each candidate's record must be a TUF target too.
            for cand in self._portable_candidates(parts, self._deadline()):
                found = self._tuf.record(cand, up)
                if found is not None:
                    return cand, found.raw, dict(found.origin, ed25519=found.ed25519)
        return (key, found.raw, dict(found.origin, ed25519=found.ed25519)) if found is not None else (key, None, None)

    def tuf_objects(self) -> Any:
        """The store as the TUF publisher sees it (get, put, create-only put)."""
        return _TufObjects(self._backend)

    @contextlib.contextmanager
    def tuf_batch(self) -> Iterator[None]:
        """Pushes inside the block make ONE TUF publication when it ends (a build farm's run: one new targets
        version instead of one per entry; devices see none of the run's entries until then, then all)."""
        with self._tuf_lock:
            if self._tuf_pending is not None:
                raise RuntimeError("tuf_batch() blocks do not nest")
            self._tuf_pending = {}
        try:
            yield
        finally:
            with self._tuf_lock:
                pending, self._tuf_pending = self._tuf_pending or {}, None
            if pending:
                from .. import _tuf_publish

                assert self.tuf_keys is not None
                _tuf_publish.publish(self.tuf_objects(), _tuf_publish.load_keys(self.tuf_keys), self.url,
                                     add={k: raw for k, (raw, _) in pending.items()},
                                     signatures={k: sig for k, (_, sig) in pending.items()})

    def _tuf_publish(self, key: str, raw: bytes, ed25519: bytes) -> None:
        from .. import _tuf_publish

        assert self.tuf_keys is not None
        with self._tuf_lock:
            if self._tuf_pending is not None:
                self._tuf_pending[key] = (raw, ed25519)
                return
        _tuf_publish.publish(self.tuf_objects(), _tuf_publish.load_keys(self.tuf_keys), self.url, add={key: raw},
                             signatures={key: ed25519})

    # The publisher's ceremony (``ctxcache tuf ...``), on this store; keys come from a folder, never arguments.
    def tuf_init(self, keys: str | os.PathLike[str], *, thresholds: dict[str, int] | None = None,
                 expiry: dict[str, float] | None = None) -> str:
        """New TUF keys in ``keys`` and root v1 for this store; returns the root.json to ship with the app."""
        from .. import _tuf_publish

        return str(_tuf_publish.init(self.tuf_objects(), keys, self.url, thresholds=thresholds, expiry=expiry))

    def tuf_rotate(self, keys: str | os.PathLike[str], role: str, *, add: int = 1, revoke: Sequence[str] = (),
                   threshold: int | None = None) -> int:
        """Root version N+1 with new keys for ``role`` and/or ``revoke``d ones; returns the root version."""
        from .. import _tuf_publish

        return _tuf_publish.rotate(self.tuf_objects(), keys, self.url, role, add=add, revoke=revoke, threshold=threshold)

    def tuf_timestamp(self, keys: str | os.PathLike[str]) -> int:
        """A fresh timestamp (run it more often than it expires); returns its version."""
        from .. import _tuf_publish

        return _tuf_publish.refresh_timestamp(self.tuf_objects(), _tuf_publish.load_keys(keys), self.url)

    def tuf_remove(self, keys: str | os.PathLike[str], entry_keys: Sequence[str]) -> int:
        """A publication that no longer lists ``entry_keys`` (devices stop serving them after a refresh)."""
        from .. import _tuf_publish

        return _tuf_publish.publish(self.tuf_objects(), _tuf_publish.load_keys(keys), self.url, remove=entry_keys)


#: A publisher's reads of the store's TUF metadata are bounded like a device's fetch.
_PUBLISH_DEADLINE = 120.0


class _TufObjects:
    """The remote backends plus a create that never overwrites (how concurrent publishers are detected)."""

    def __init__(self, backend: _S3 | _Fsspec) -> None:
        self.b = backend

    def get(self, name: str, limit: int | None = None) -> bytes | None:
        return self.b.get(name, limit, time.monotonic() + _PUBLISH_DEADLINE)

    def _local(self) -> _Fsspec | None:
        """The backend when the store is a folder (``file://``), else ``None``."""
        if isinstance(self.b, _S3):
            return None
        fs = self.b.fs()
        return self.b if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)) else None

    def put(self, name: str, data: bytes) -> None:
        local = self._local()
        if local is not None:
            # timestamp.json is overwritten while devices and other publishers read it: never a torn file.
            from pathlib import Path

            from .. import _fs

            path = Path(local._path(name))
            local.fs().makedirs(str(path.parent), exist_ok=True)
            _fs.atomic_write(path, data)
            os.chmod(path, 0o644)
            return
        self.b.put(name, data)

    def put_new(self, name: str, data: bytes) -> bool:
        if isinstance(self.b, _S3):
            from botocore.exceptions import ClientError

            try:
                self.b.client().put_object(Bucket=self.b.bucket, Key=self.b._key(name), Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
        local = self._local()
        if local is not None:
            from pathlib import Path

            from .. import _fs

            path = Path(local._path(name))
            local.fs().makedirs(str(path.parent), exist_ok=True)
            # Written whole under a private name, then linked to its name: link() fails if the name exists,
            # so a reader never sees a half-written version and a taken name is never overwritten.
            tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
            fd = _fs.create_exclusive(tmp, 0o644)  # readable by the devices that share the folder (umask applies)
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                _fs.remove_file(tmp)
        # Other fsspec stores have no create-if-absent: a narrow race remains.
        if self.b.exists(name, time.monotonic() + _PUBLISH_DEADLINE):
            return False
        self.b.put(name, data)
        return True
