"""Bundles: prebuilt entries shipped with an app (a folder or a tar archive), read-only at run time.

Layout (the same inside an archive)::

    index.json          {"kind": "ctxcache-bundle", "format": 1, "entries": {"<key>": <record>, ...}}
    index.json.sig      optional: hmac-sha256:<hex> over the exact bytes of index.json
    index.json.ed25519  optional: one line per signing key, ed25519:<key id>:<base64>, over those bytes
    entries/<key>/      manifest.json, ctx.onnx, ctx_qnn.bin ...

The index carries every entry's key parts and each file's SHA-256 (the manifest is one of the files),
so one signature over it covers everything a device acts on. Without a signature nothing in the files
can tell an honest bundle from one whose index names model A while its files are model B's (digests
updated to match): hence an unsigned bundle is used only inside the app's own folders.

A bundle is never loaded in place: :class:`Bundle` offers its entries and ``_base.install`` copies,
verifies and publishes them. An archive is never extracted with ``tarfile.extract*``: ctxcache reads
only the members its index names, into files it names itself, after refusing any archive that contains
a link, a device, an absolute or '..' path, a duplicate, or any name outside the layout above.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .. import _fs
from .._manifest import Entry, is_key
from .._trust import SigningKey, Trust, ed25519_keys, hmac_secret
from ..errors import TierError
from ._base import (
    UNSIGNED,
    LocalTier,
    Match,
    Offer,
    Opener,
    Parts,
    Signer,
    check_signature,
    export_files,
    find_record,
    make_record,
    open_plain,
    parse_json,
    read_signer_or_refuse,
    resolve_signing_keys,
    sign,
    sign_ed25519,
)

if TYPE_CHECKING:
    import tarfile

INDEX = "index.json"
SIGNATURE = "index.json.sig"
ED25519_SIGNATURE = "index.json.ed25519"
#: What an Ed25519 signature over a bundle index is for (never valid over anything else).
CONTEXT = "bundle-index"
BUNDLE_KIND = "ctxcache-bundle"
BUNDLE_FORMAT = 1
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MAX_INDEX = 16 << 20
_MAX_MEMBERS = 100_000
_MEMBER_RE = re.compile(
    r"(?:index\.json|index\.json\.sig|index\.json\.ed25519|entries|entries/[0-9a-f]{32}|entries/[0-9a-f]{32}/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})"
)


def is_archive(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith(_ARCHIVE_SUFFIXES)


# -- reading ------------------------------------------------------------------------------------------
def check_tar_members(tf: tarfile.TarFile, where: str) -> dict[str, tarfile.TarInfo]:
    """Every member of a bundle archive must be a plain file or folder of the bundle layout.

    ctxcache never extracts by member name, so a hostile name could not escape anyway; refusing the
    whole archive makes tampering visible instead of silently skipping the odd member.
    """
    import tarfile  # here, not at the top: an app that only configures a bundle should not pay for it

    files: dict[str, tarfile.TarInfo] = {}
    seen: set[str] = set()
    for n, m in enumerate(tf):
        if n >= _MAX_MEMBERS:
            raise TierError(f"{where}: more than {_MAX_MEMBERS} members", code="tier_unsafe")
        name = m.name
        parts = name.rstrip("/").split("/")
        if name.startswith("/") or "\\" in name or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise TierError(f"{where}: member {name!r} has an absolute or climbing path", code="tier_unsafe")
        if m.issym() or m.islnk():
            raise TierError(f"{where}: member {name!r} is a link (to {m.linkname!r})", code="tier_unsafe")
        if m.ischr() or m.isblk() or m.isfifo():
            raise TierError(f"{where}: member {name!r} is a device or pipe", code="tier_unsafe")
        if not m.isdir() and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise TierError(f"{where}: member {name!r} has unsupported type {m.type!r}", code="tier_unsafe")
        clean = name.rstrip("/")
        if not _MEMBER_RE.fullmatch(clean):  # fullmatch: '$' alone would let "index.json\n" through
            raise TierError(f"{where}: unexpected member {name!r}", code="tier_unsafe")
        if clean in seen:
            raise TierError(f"{where}: member {name!r} appears twice", code="tier_unsafe")
        seen.add(clean)
        if m.isfile():
            files[clean] = m
    return files


@dataclass(frozen=True)
class _Reader:
    """An opened bundle: its verified index and a way to open an entry's files."""

    location: Path
    index: dict[str, Any]
    open_member: Callable[[str], Any]
    signer: Signer = UNSIGNED

    @property
    def records(self) -> dict[str, Any]:
        return self.index["entries"]  # type: ignore[no-any-return]

    def opener(self, key: str) -> Opener:
        def open_file(name: str) -> Any:
            return self.open_member(f"entries/{key}/{name}")

        return open_file


def _signer(raw: bytes, read_small: Callable[[str], bytes | None], keys: tuple[SigningKey, ...],
            trust: Trust | None, where: str) -> Signer:
    """The index's HMAC checked (when a secret is configured), then who signed it (Ed25519)."""
    if len(raw) > _MAX_INDEX:
        raise TierError(f"{where}: {INDEX} is larger than {_MAX_INDEX} bytes", code="tier_record")
    secret = hmac_secret(keys)
    check_signature(raw, read_small(SIGNATURE), secret, f"{where}/{INDEX}")
    blob = read_small(ED25519_SIGNATURE)
    if trust is None:  # listing keys only (import): the signer is judged per entry when it is offered
        return UNSIGNED
    return read_signer_or_refuse(raw, blob, CONTEXT, trust, f"{where}/{INDEX}", hmac_checked=secret is not None,
                                 own=ed25519_keys(keys))


def _parse_index(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > _MAX_INDEX:
        raise TierError(f"{where}: {INDEX} is larger than {_MAX_INDEX} bytes", code="tier_record")
    index = parse_json(raw, f"{where}/{INDEX}")
    if not isinstance(index, dict) or index.get("kind") != BUNDLE_KIND:
        raise TierError(f"{where}: not a ctxcache bundle index", code="tier_record")
    fmt = index.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > BUNDLE_FORMAT:
        raise TierError(f"{where}: bundle format {fmt!r} is newer than this ctxcache", code="tier_record")
    if not isinstance(index.get("entries"), dict):
        raise TierError(f"{where}: index has no entries", code="tier_record")
    return index


@contextmanager
def _open_folder(location: Path, keys: tuple[SigningKey, ...], trust: Trust | None) -> Iterator[_Reader]:
    def read_small(name: str) -> bytes | None:
        try:
            with open_plain(location / name) as f:
                return f.read(_MAX_INDEX + 1)
        except FileNotFoundError:
            return None

    raw = read_small(INDEX)
    if raw is None:
        raise TierError(f"{location} has no {INDEX}", code="tier_unreachable")
    signer = _signer(raw, read_small, keys, trust, str(location))
    index = _parse_index(raw, str(location))
    yield _Reader(location, index, lambda rel: open_plain(location / rel), signer)


@contextmanager
def _open_archive(location: Path, keys: tuple[SigningKey, ...], trust: Trust | None) -> Iterator[_Reader]:
    import tarfile

    try:
        # A regular file, opened without blocking or following a link (a FIFO swapped in would hang the load).
        raw_file = os.fdopen(_fs.open_regular(location), "rb")
    except OSError as e:
        raise TierError(f"cannot open archive {location}: {e}", code="tier_unreachable") from None
    try:
        tf = tarfile.open(fileobj=raw_file, mode="r:*")  # noqa: SIM115 - closed by the `with tf:` below
    except (OSError, tarfile.TarError) as e:
        raw_file.close()
        raise TierError(f"cannot open archive {location}: {e}", code="tier_unreachable") from None
    with raw_file, tf:
        try:
            members = check_tar_members(tf, str(location))
        except tarfile.TarError as e:
            raise TierError(f"{location}: damaged archive ({e})", code="tier_record") from None

        @contextmanager
        def open_member(rel: str) -> Iterator[IO[bytes]]:
            m = members.get(rel)
            if m is None:
                raise TierError(f"{location}: index names {rel}, which the archive lacks", code="tier_record")
            f = tf.extractfile(m)
            if f is None:
                raise TierError(f"{location}: {rel} is not a regular file", code="tier_unsafe")
            with f:
                yield f

        def read_small(name: str) -> bytes | None:
            if name not in members:
                return None
            with open_member(name) as f:
                return f.read(_MAX_INDEX + 1)

        raw = read_small(INDEX)
        if raw is None:
            raise TierError(f"{location} has no {INDEX}", code="tier_record")
        signer = _signer(raw, read_small, keys, trust, str(location))
        index = _parse_index(raw, str(location))
        yield _Reader(location, index, open_member, signer)


class Bundle(LocalTier):
    """A read-only tier of prebuilt entries: a bundle folder or a ``.tar`` / ``.tar.gz`` archive.

    Args:
        location: the bundle (e.g. inside the app's install dir; may be read-only).
        signing_key: an HMAC secret the index must carry a valid HMAC of (integrity between machines that
            share it, not trust). Default ``$CTXCACHE_SIGNING_KEY``; when neither is set the HMAC is not
            checked (file digests always are). An Ed25519 private key here is trusted for this bundle.
        require_signature: ``None`` (default): a valid Ed25519 signature from a trusted key
            (``ContextCache(trusted_keys=...)``) is required unless the bundle lies inside one of the
            cache's ``trusted_dirs``. ``True``: required even there. ``False``: the app vouches for this
            bundle's location; an unsigned one is used (a bad or revoked signature still is not).
        match: ``"exact"``: only an entry built for this very key. ``"portable"``: also one built on
            another host (x86 build machine -> device) whose key differs only in ``host``, ``devices``
            and ``ep_libraries``; the EP's compatibility check and the usual load fallback then guard it.
    """

    kind = "bundle"

    def describe(self) -> str:
        return f"bundle {self.location}"

    @contextmanager
    def open(self, trust: Trust | None = None) -> Iterator[_Reader]:
        """The bundle with its index's HMAC checked and, given ``trust``, its signer read. Raises :class:`TierError`."""
        keys = resolve_signing_keys(self._signing_key)
        if is_archive(self.location):
            if not os.path.isfile(self.location):
                raise TierError(f"bundle archive {self.location} does not exist", code="tier_unreachable")
            with _open_archive(self.location, keys, trust) as r:
                yield r
        else:
            if not os.path.isdir(self.location):
                raise TierError(f"bundle folder {self.location} does not exist", code="tier_unreachable")
            with _open_folder(self.location, keys, trust) as r:
                yield r

    def index_signer(self, trust: Trust) -> Signer:
        """Who signed the whole index (``doctor``): a bundle's entries are signed together."""
        with self.open(trust) as r:
            return r.signer

    def keys(self) -> list[str]:
        with self.open() as r:
            return sorted(k for k in r.records if is_key(k))

    def lookup(self, key: str, parts: Parts = ()) -> Match | None:
        with self.open() as r:
            found = find_record(r.records, key, parts, "portable")
        return None if found is None else "exact" if found[0] == key else "portable"

    @contextmanager
    def offer(self, key: str, parts: Parts = (), *, trust: Trust | None = None) -> Iterator[Offer | None]:
        with self.open(trust if trust is not None else Trust()) as r:
            found = find_record(r.records, key, parts, self.match)
            if found is None:
                yield None
                return
            rkey, record = found
            if not is_key(rkey):
                raise TierError(f"{self.location}: index key {rkey!r} is not a key", code="tier_record")
            yield Offer(record, r.opener(rkey), {"tier": self.kind, "location": str(self.location)}, r.signer)


# -- writing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What :func:`ctxcache.export_bundle` wrote: the bundle, the keys in it, those left out and why."""

    path: Path
    keys: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    signed: bool = False
    #: the Ed25519 key ids that signed the index (``hmac-sha256`` for an HMAC), in signing order
    signed_by: tuple[str, ...] = ()


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Reproducible, owner-neutral members: the same entries give the same archive bytes.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def signer_names(keys: Sequence[SigningKey]) -> tuple[str, ...]:
    return tuple(k.key_id or k.scheme for k in keys)


def write_bundle(entries: Sequence[Entry], dest: Path, *, signing_keys: Sequence[SigningKey], version: str,
                 skipped: dict[str, str], overwrite: bool) -> ExportResult:
    """Write verified ``entries`` as a bundle folder or archive at ``dest``; it appears by one rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    tmp.mkdir(mode=0o755)
    keys: list[str] = []
    skipped = dict(skipped)
    try:
        records: dict[str, Any] = {}
        for entry in entries:
            try:
                files = export_files(entry, tmp / "entries" / entry.key)
            except OSError as e:
                _fs.remove_tree(tmp / "entries" / entry.key)
                skipped[entry.key] = f"copy_failed: {e}"
                continue
            records[entry.key] = make_record(entry, files)
            keys.append(entry.key)
        if not records:
            return ExportResult(dest, (), skipped, False)
        secret = hmac_secret(signing_keys)
        index = {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "created": time.time(),
                 "ctxcache_version": version, "entries": records}
        raw = json.dumps(index, sort_keys=True, indent=1).encode()
        (tmp / INDEX).write_bytes(raw)
        if secret is not None:
            (tmp / SIGNATURE).write_bytes(sign(raw, secret))
        if ed25519_keys(signing_keys):
            (tmp / ED25519_SIGNATURE).write_bytes(sign_ed25519(raw, signing_keys, CONTEXT))
        if overwrite and os.path.lexists(dest):
            _fs.remove_tree(dest)
        if is_archive(dest):
            _write_archive(tmp, dest, records)
        else:
            os.rename(tmp, dest)
        _fs.fsync_dir(dest.parent)
    finally:
        _fs.remove_tree(tmp)
    return ExportResult(dest, tuple(keys), skipped, bool(signing_keys), signer_names(signing_keys))


def _write_archive(tmp: Path, dest: Path, records: dict[str, Any]) -> None:
    import tarfile

    part = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.part")
    mode = "w:gz" if dest.name.lower().endswith((".tar.gz", ".tgz")) else "w"
    try:
        with tarfile.open(part, mode) as tf:  # type: ignore[call-overload]
            for name in [INDEX, SIGNATURE, ED25519_SIGNATURE]:
                if (tmp / name).exists():
                    tf.add(tmp / name, arcname=name, filter=_tar_filter)
            for k in sorted(records):
                for fname in sorted(records[k]["files"]):
                    tf.add(tmp / "entries" / k / fname, arcname=f"entries/{k}/{fname}", filter=_tar_filter)
        _fs.fsync_file(part)
        os.replace(part, dest)
    finally:
        _fs.remove_file(part)
