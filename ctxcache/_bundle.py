"""Bundles: prebuilt entries shipped with an app (a folder or a tar archive), read-only at run time.

Layout (the same inside an archive)::

    index.json          {"kind": "ctxcache-bundle", "format": 1, "entries": {"<key>": <record>, ...}}
    index.json.sig      optional: hmac-sha256:<hex> over the exact bytes of index.json
    entries/<key>/      manifest.json, ctx.onnx, ctx_qnn.bin ...

A bundle is never loaded in place: :class:`Bundle` is a tier, so on a local miss its entry is copied,
verified (SHA-256 per file; the signature when a key is configured) and published into the local cache
(see ``_tiers.install``). An archive is never extracted with ``tarfile.extract*``: ctxcache reads only
the members its index names, into files it names itself, after refusing any archive that contains a
link, a device, an absolute or '..' path, a duplicate, or any name outside the layout above.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from . import _fs
from ._hashing import file_digest
from ._store import _KEY_RE, MANIFEST, Entry, Store
from ._tiers import (
    Opener,
    TierError,
    check_signature,
    entries_matching,
    find_record,
    install,
    make_record,
    portable_manifest,
    resolve_signing_key,
    sha256_file,
    sign,
)
from .errors import BundleError

if TYPE_CHECKING:
    import tarfile

    from ._cache import ContextCache

log = logging.getLogger("ctxcache")

INDEX = "index.json"
SIGNATURE = "index.json.sig"
BUNDLE_KIND = "ctxcache-bundle"
BUNDLE_FORMAT = 1
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_MAX_INDEX = 16 << 20
_MAX_MEMBERS = 100_000
_MEMBER_RE = re.compile(
    r"^(?:index\.json|index\.json\.sig|entries|entries/[0-9a-f]{32}|entries/[0-9a-f]{32}/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})$"
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
            raise TierError("tier_unsafe", f"{where}: more than {_MAX_MEMBERS} members")
        name = m.name
        parts = name.rstrip("/").split("/")
        if name.startswith("/") or "\\" in name or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise TierError("tier_unsafe", f"{where}: member {name!r} has an absolute or climbing path")
        if m.issym() or m.islnk():
            raise TierError("tier_unsafe", f"{where}: member {name!r} is a link (to {m.linkname!r})")
        if m.ischr() or m.isblk() or m.isfifo():
            raise TierError("tier_unsafe", f"{where}: member {name!r} is a device or pipe")
        if not m.isdir() and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise TierError("tier_unsafe", f"{where}: member {name!r} has unsupported type {m.type!r}")
        clean = name.rstrip("/")
        if not _MEMBER_RE.fullmatch(clean):  # fullmatch: '$' alone would let "index.json\n" through
            raise TierError("tier_unsafe", f"{where}: unexpected member {name!r}")
        if clean in seen:
            raise TierError("tier_unsafe", f"{where}: member {name!r} appears twice")
        seen.add(clean)
        if m.isfile():
            files[clean] = m
    return files


class _Reader:
    """An opened bundle: its verified index and a way to open an entry's files."""

    def __init__(self, location: Path, index: dict[str, Any], open_member: Any) -> None:
        self.location = location
        self.index = index
        self._open_member = open_member

    @property
    def records(self) -> dict[str, Any]:
        return self.index["entries"]  # type: ignore[no-any-return]

    def opener(self, key: str) -> Opener:
        def open_file(name: str) -> Any:
            return self._open_member(f"entries/{key}/{name}")

        return open_file


def _parse_index(raw: bytes, sig: bytes | None, key: bytes | None, where: str) -> dict[str, Any]:
    if len(raw) > _MAX_INDEX:
        raise TierError("tier_record", f"{where}: {INDEX} is larger than {_MAX_INDEX} bytes")
    check_signature(raw, sig, key, f"{where}/{INDEX}")
    try:
        index = json.loads(raw)
    except ValueError as e:
        raise TierError("tier_record", f"{where}: {INDEX} is not JSON ({e})") from None
    if not isinstance(index, dict) or index.get("kind") != BUNDLE_KIND:
        raise TierError("tier_record", f"{where}: not a ctxcache bundle index")
    if not isinstance(index.get("format"), int) or index["format"] > BUNDLE_FORMAT:
        raise TierError("tier_record", f"{where}: bundle format {index.get('format')!r} is newer than this ctxcache")
    if not isinstance(index.get("entries"), dict):
        raise TierError("tier_record", f"{where}: index has no entries")
    return index


@contextmanager
def _open_folder(location: Path, key: bytes | None) -> Iterator[_Reader]:
    def read_small(name: str) -> bytes | None:
        try:
            with _open_regular(location / name) as f:
                return f.read(_MAX_INDEX + 1)
        except FileNotFoundError:
            return None

    raw = read_small(INDEX)
    if raw is None:
        raise TierError("tier_unreachable", f"{location} has no {INDEX}")
    index = _parse_index(raw, read_small(SIGNATURE), key, str(location))
    yield _Reader(location, index, lambda rel: _open_regular(location / rel))


@contextmanager
def _open_regular(path: Path) -> Iterator[IO[bytes]]:
    """Open a bundle file for reading: a regular file, not a link (at its last component), FIFO or device."""
    try:
        fd = _fs.open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise TierError("tier_unsafe", f"cannot open {path} as a plain file: {e}") from None
    with os.fdopen(fd, "rb") as f:
        yield f


@contextmanager
def _open_archive(location: Path, key: bytes | None) -> Iterator[_Reader]:
    import tarfile

    try:
        tf = tarfile.open(location, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise TierError("tier_unreachable", f"cannot open archive {location}: {e}") from None
    with tf:
        try:
            members = check_tar_members(tf, str(location))
        except tarfile.TarError as e:
            raise TierError("tier_record", f"{location}: damaged archive ({e})") from None

        @contextmanager
        def open_member(rel: str) -> Iterator[IO[bytes]]:
            m = members.get(rel)
            if m is None:
                raise TierError("tier_record", f"{location}: index names {rel}, which the archive lacks")
            f = tf.extractfile(m)
            if f is None:
                raise TierError("tier_unsafe", f"{location}: {rel} is not a regular file")
            with f:
                yield f

        def read_small(name: str) -> bytes | None:
            if name not in members:
                return None
            with open_member(name) as f:
                return f.read(_MAX_INDEX + 1)

        raw = read_small(INDEX)
        if raw is None:
            raise TierError("tier_record", f"{location} has no {INDEX}")
        index = _parse_index(raw, read_small(SIGNATURE), key, str(location))
        yield _Reader(location, index, open_member)


class Bundle:
    """A read-only tier of prebuilt entries: a bundle folder or a ``.tar`` / ``.tar.gz`` archive.

    Args:
        location: the bundle (e.g. inside the app's install dir; may be read-only).
        signing_key: HMAC key the index must be signed with. Default ``$CTXCACHE_SIGNING_KEY``; when
            neither is set the signature is not checked (file digests always are).
        match: ``"exact"``: only an entry built for this very key. ``"portable"``: also one built on
            another host (x86 build machine -> device) whose key differs only in ``host``, ``devices``
            and ``ep_libraries``; the EP's compatibility check and the usual load fallback then guard it.
    """

    kind = "bundle"

    def __init__(self, location: str | os.PathLike[str], *, signing_key: str | bytes | None = None,
                 match: Literal["exact", "portable"] = "exact") -> None:
        if match not in ("exact", "portable"):
            raise ValueError(f"match must be 'exact' or 'portable', not {match!r}")
        self.location = Path(os.path.abspath(os.fspath(location)))
        self._signing_key = signing_key
        self.match = match

    def __repr__(self) -> str:
        return f"Bundle({str(self.location)!r})"

    def describe(self) -> str:
        return f"bundle {self.location}"

    @contextmanager
    def open(self) -> Iterator[_Reader]:
        """The bundle with its index verified. Raises :class:`TierError`."""
        key = resolve_signing_key(self._signing_key)
        if is_archive(self.location):
            if not self.location.is_file():
                raise TierError("tier_unreachable", f"bundle archive {self.location} does not exist")
            with _open_archive(self.location, key) as r:
                yield r
        else:
            if not self.location.is_dir():
                raise TierError("tier_unreachable", f"bundle folder {self.location} does not exist")
            with _open_folder(self.location, key) as r:
                yield r

    def keys(self) -> list[str]:
        with self.open() as r:
            return sorted(r.records)

    def lookup(self, key: str, parts: Sequence[tuple[str, Any]] = ()) -> str | None:
        """``"exact"`` / ``"portable"`` when the bundle holds an entry for this key, else ``None``."""
        with self.open() as r:
            found = find_record(r.records, key, parts, "portable")
        return None if found is None else "exact" if found[0] == key else "portable"

    def fetch(self, store: Store, key: str, parts: Sequence[tuple[str, Any]] = ()) -> Entry | None:
        with self.open() as r:
            found = find_record(r.records, key, parts, self.match)
            if found is None:
                return None
            rkey, record = found
            return install(store, key, record, r.opener(rkey), {"tier": self.kind, "location": str(self.location)}, parts)


# -- export -------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    keys: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was left out
    signed: bool = False


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Reproducible, owner-neutral members: the same entries give the same archive bytes.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def export_bundle(
    cache: ContextCache,
    dest: str | os.PathLike[str],
    *,
    models: Sequence[str | os.PathLike[str]] | None = None,
    provider: str | None = None,
    options: dict[str, Any] | None = None,
    keys: Sequence[str] | None = None,
    signing_key: str | bytes | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the selected entries of ``cache`` as a bundle folder, or an archive when ``dest`` ends in
    ``.tar``, ``.tar.gz`` or ``.tgz``.

    Entries are selected by model file(s) (their content digest), provider name, a subset of binary
    options that must match (e.g. ``{"soc_model": "60"}``) and/or key prefixes; all filters given must
    match. Each entry is fully re-verified before it is written. The bundle appears by one rename.
    """
    out = Path(os.path.abspath(os.fspath(dest)))
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; choose another path or pass overwrite=True.", path=str(out), code="exists")
    selected = entries_matching(cache, models=models, provider=provider, options=options, keys=keys)
    if not selected:
        raise BundleError(
            f"no entry of {cache.root} matches the selection; load the model with those providers first "
            "(or list entries with `ctxcache ls`).",
            path=str(out),
            code="nothing_selected",
        )
    key = resolve_signing_key(signing_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(mode=0o755)
    result = ExportResult(out, [], signed=key is not None)
    try:
        records: dict[str, Any] = {}
        for entry in selected:
            problem = cache.store.verify(entry, full=True)
            if problem is not None:
                result.skipped[entry.key] = f"{problem[0]}: {problem[1]}"
                log.warning("not exporting %s: %s", entry.key[:12], problem[1])
                continue
            edir = tmp / "entries" / entry.key
            edir.mkdir(parents=True)
            files: dict[str, dict[str, Any]] = {}
            try:
                for art in entry.artifacts:
                    dst = edir / art["name"]
                    shutil.copyfile(entry.path / art["name"], dst)
                    # The copy is what ships: check it, not the source, in case the entry changed meanwhile.
                    if file_digest(dst) != art["xxh3"]:
                        raise OSError(f"{art['name']} changed while being copied")
                    files[art["name"]] = {"size": dst.stat().st_size, "sha256": sha256_file(dst)}
            except OSError as e:
                shutil.rmtree(edir, ignore_errors=True)
                result.skipped[entry.key] = f"copy_failed: {e}"
                continue
            (edir / MANIFEST).write_bytes(portable_manifest(entry))
            files[MANIFEST] = {"size": (edir / MANIFEST).stat().st_size, "sha256": sha256_file(edir / MANIFEST)}
            records[entry.key] = make_record(entry, dict(sorted(files.items())))
            result.keys.append(entry.key)
        if not records:
            raise BundleError(f"every selected entry failed verification: {result.skipped}", path=str(out), code="nothing_selected")
        from . import __version__

        index = {"kind": BUNDLE_KIND, "format": BUNDLE_FORMAT, "created": time.time(),
                 "ctxcache_version": __version__, "entries": records}
        raw = json.dumps(index, sort_keys=True, indent=1).encode()
        (tmp / INDEX).write_bytes(raw)
        if key is not None:
            (tmp / SIGNATURE).write_bytes(sign(raw, key))
        if overwrite and out.exists():
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        if is_archive(out):
            import tarfile

            part = out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")
            mode = "w:gz" if out.name.lower().endswith((".tar.gz", ".tgz")) else "w"
            try:
                with tarfile.open(part, mode) as tf:  # type: ignore[call-overload]
                    for name in [INDEX, SIGNATURE]:
                        if (tmp / name).exists():
                            tf.add(tmp / name, arcname=name, filter=_tar_filter)
                    for k in sorted(records):
                        for fname in sorted(records[k]["files"]):
                            tf.add(tmp / "entries" / k / fname, arcname=f"entries/{k}/{fname}", filter=_tar_filter)
                _fs.fsync_file(part)
                os.replace(part, out)
            finally:
                if part.exists():
                    part.unlink()
        else:
            os.rename(tmp, out)
        _fs.fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d entries to %s%s", len(result.keys), out, " (signed)" if result.signed else "")
    return result


# -- import -------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    installed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the cache
    refused: dict[str, str] = field(default_factory=dict)  # key -> why


def import_bundle(
    cache: ContextCache,
    location: str | os.PathLike[str],
    *,
    signing_key: str | bytes | None = None,
    force: bool = False,
) -> ImportResult:
    """Install every entry of a bundle into ``cache`` (verified exactly as a tier hit is).

    Raises :class:`~ctxcache.errors.BundleError` when the bundle as a whole is unreadable, unsafe or
    wrongly signed; a single bad entry is reported in ``refused`` and the others are installed.
    """
    from ._locking import key_lock
    from ._store import BrokenEntry

    bundle = Bundle(location, signing_key=signing_key)
    result = ImportResult()
    try:
        with bundle.open() as reader:
            cache.store.ensure()
            for key in sorted(reader.records):
                if not _KEY_RE.fullmatch(key):
                    result.refused[key] = "tier_record: not a key"
                    continue
                with key_lock(cache.store.lock_path(key), cache.lock_timeout, key[:12]):
                    try:
                        present = cache.store.lookup(key)
                    except BrokenEntry:
                        present = None
                    if present is not None and not force and cache.store.verify(present) is None:
                        result.skipped.append(key)
                        continue
                    try:
                        install(cache.store, key, reader.records[key], reader.opener(key),
                                {"tier": "import", "location": str(bundle.location)})
                    except TierError as e:
                        result.refused[key] = str(e)
                        log.warning("refused %s from %s: %s", key[:12], bundle.location, e)
                        continue
                    result.installed.append(key)
    except TierError as e:
        raise BundleError(f"cannot import {bundle.location}: {e.message}", path=str(bundle.location), code=e.code) from None
    return result
