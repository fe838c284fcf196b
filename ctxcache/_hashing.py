"""Streaming xxh3-128 digests of models (with their external data) and files, behind a stat memo.

A warm launch must not re-read a multi-GB model, so a model's digest is remembered against its files'
:func:`identity` (size, mtime, ctime, inode, device; on a read-only filesystem also the mount): one
``stat`` per file and one small JSON read decide whether the remembered digest still holds. ctime is
in it because a tool can reset mtime after editing a file (``touch -r``) but nothing in user space can
reset ctime. The cache's own artifacts are not trusted this way: every hit re-hashes what it serves.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import xxhash

from . import _fs
from ._log import log
from ._onnxproto import WireError, open_model_file, read_facts, resolve_external
from .errors import InvalidModelError, ModelNotFoundError

# 1 MiB reads keep the Python overhead per byte negligible (measured in benchmarks/bench_hashing.py)
# while the buffer, reused for every read, keeps memory flat whatever the model size.
_CHUNK = 1 << 20

Signature = tuple[int, int, int, int]


def signature(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hash_stream(h: xxhash.xxh3_128, path: Path, buf: bytearray, *, follow_links: bool = True) -> int:
    # Never a bare open(): a FIFO planted as a model's external data (or in the cache) would block the
    # launch forever. The cache's own files are opened through _fs.open_regular (no link followed);
    # a user's model may be a link, but its target must be a regular file.
    fd = open_model_file(path) if follow_links else _fs.open_regular(path)
    view = memoryview(buf)
    total = 0
    with open(fd, "rb", buffering=0, closefd=True) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return total
            h.update(view[:n])
            total += n


def file_digest(path: Path, *, follow_links: bool = False) -> str:
    """xxh3-128 of one file. A cache file by default (a link is refused); ``follow_links`` for files
    outside the cache (EP libraries)."""
    h = xxhash.xxh3_128()
    _hash_stream(h, path, bytearray(_CHUNK), follow_links=follow_links)
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """Digest of an in-memory model; equal to :func:`model_digest` of the same bytes on disk."""
    h = xxhash.xxh3_128()
    h.update(b"model\0")
    h.update(data)
    return h.hexdigest()


def _digest_files(model: Path, externals: Sequence[tuple[str, Path]]) -> str:
    buf = bytearray(_CHUNK)
    h = xxhash.xxh3_128()
    h.update(b"model\0")
    _hash_stream(h, model, buf)
    for name, path in externals:
        # The name is hashed too: the model refers to its data by name, and two files swapped
        # between names must not give the same digest.
        h.update(b"\0external\0" + name.encode("utf-8") + b"\0")
        _hash_stream(h, path, buf)
    return h.hexdigest()


class ModelDigest(NamedTuple):
    digest: str
    files: tuple[str, ...]  # the model first, then its external-data files
    size: int  # bytes hashed (or that would be hashed)
    memo_hit: bool


# -- what the stat memo trusts ------------------------------------------------------------------------
#: Bumped when the identity below changes: an older memo is simply a miss (one re-hash).
_MEMO_FORMAT = 2
_ST_RDONLY = getattr(os, "ST_RDONLY", 1)
_boot_id: str | None = None


def _statx_mount_id(path: str) -> int | None:
    """Linux >= 6.8: the mount's unique 64-bit id (``STATX_MNT_ID_UNIQUE``, never reused); else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        statx = libc.statx
    except (OSError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(256)
    # AT_FDCWD, AT_STATX_SYNC_AS_STAT; mask STATX_MNT_ID_UNIQUE (0x4000).
    if statx(-100, os.fsencode(path), 0, 0x4000, buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[0:4], "little")
    if not mask & 0x4000:
        return None
    return int.from_bytes(buf.raw[144:152], "little")


def _mount_instance(path: str) -> str:
    """What tells one mount of a read-only image from the next: the unique mount id where the kernel
    has one, else the boot (an image is replaced by an OTA, OSTree or snap update with a reboot or a
    new mount; see README, "What the stat memo trusts")."""
    global _boot_id
    unique = _statx_mount_id(path)
    if unique is not None:
        return f"mnt:{unique}"
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                _boot_id = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            _boot_id = ""
    return f"boot:{_boot_id}"


def identity(path: str) -> list[object]:
    """The stat facts the memo compares to decide a file is the one it hashed (raises ``OSError``).

    Size, mtime, ctime (which no user-space tool can set back on POSIX; on Windows it is the creation
    time), the file's identity (inode / file index) and the device (volume) it is on. A read-only
    filesystem gives every file of a reproducible image one fixed timestamp and may give a new version
    the same inode, so there the mount instance is part of it too: such a model is re-hashed once per
    mount of its image.
    """
    st = os.stat(path)
    out: list[object] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    try:
        if os.statvfs(path).f_flag & _ST_RDONLY:
            out.append(_mount_instance(path))
    except (OSError, AttributeError):  # no statvfs (Windows)
        pass
    return out


def _memo_path(memo_dir: Path, key: str) -> Path:
    return memo_dir / f"{xxhash.xxh3_64_hexdigest(key.encode('utf-8', 'surrogatepass'))}.json"


def _read_memo(memo_file: Path, key: str) -> dict[str, object] | None:
    try:
        data = json.loads(_fs.read_small(memo_file, 1 << 20))
    except (OSError, ValueError, RecursionError):  # a link, FIFO or junk in the memo is a memo miss
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("format") != _MEMO_FORMAT:
        return None
    return data


def _memo_valid(data: dict[str, object]) -> bool:
    files = data.get("files")
    if not isinstance(files, list) or not files:
        return False
    for item in files:
        if not isinstance(item, list) or len(item) != 2:
            return False
        path, sig = item
        try:
            if identity(path) != sig:
                return False
        except (OSError, TypeError, ValueError):
            return False
    return isinstance(data.get("digest"), str)


def model_digest(model: Path, memo_dir: Path | None) -> ModelDigest:
    """Digest of ``model`` and every external-data file it references.

    Raises :class:`ModelNotFoundError` / :class:`InvalidModelError` for bad input.
    """
    model = Path(os.path.abspath(model))
    key = str(model)
    memo_file = _memo_path(memo_dir, key) if memo_dir is not None else None
    if memo_file is not None:
        data = _read_memo(memo_file, key)
        if data is not None and _memo_valid(data):
            files = data["files"]
            assert isinstance(files, list)
            return ModelDigest(
                str(data["digest"]), tuple(f[0] for f in files), int(str(data.get("size", 0))), True
            )

    try:
        st = os.stat(model)
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"model file not found: {model}. Check the path, or pass the model as bytes.", path=str(model)
        ) from None
    except OSError as e:
        raise InvalidModelError(
            f"cannot read model {model}: {e.strerror}. Check the file's permissions.", path=str(model), detail=str(e)
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(
            f"{model} is not a regular file (a folder, FIFO or device). Pass the path of an .onnx model file.",
            path=str(model), detail="not a file"
        )
    try:
        facts = read_facts(model)
    except (WireError, OSError, ValueError) as e:
        raise InvalidModelError(
            f"{model} is not a valid ONNX model ({e}). Re-export it, or check that the download is complete.",
            path=str(model),
            detail=str(e),
        ) from None
    externals: list[tuple[str, Path]] = []
    for location in sorted(facts.external_locations):
        try:
            path = resolve_external(model, location)
        except WireError as e:
            raise InvalidModelError(f"{model}: {e}.", path=str(model), detail=str(e)) from None
        try:
            ext_st = os.stat(path)
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"{model} references external data {location!r}, but {path} does not exist. "
                "Keep the model's data files beside it.",
                path=str(path),
            ) from None
        except OSError as e:
            raise InvalidModelError(f"cannot read external data {path}: {e.strerror or e}. Check its permissions.",
                                    path=str(path), detail=str(e)) from None
        if not stat.S_ISREG(ext_st.st_mode):
            raise InvalidModelError(
                f"{model} references external data {location!r}, but {path} is not a regular file "
                "(a folder, FIFO or device). Put the model's data file there.",
                path=str(path), detail="not a regular file",
            )
        externals.append((location, path))

    paths = [str(model)] + [str(p) for _, p in externals]
    before = [identity(p) for p in paths]
    digest = _digest_files(model, externals)
    size = sum(int(str(s[0])) for s in before)
    after = [identity(p) for p in paths]
    # A file that changed while we read it must not be memoised under its new identity.
    if memo_file is not None and after == before:
        payload = {"format": _MEMO_FORMAT, "key": key, "digest": digest, "size": size,
                   "files": [[p, s] for p, s in zip(paths, after, strict=True)]}
        try:
            _fs.atomic_write(memo_file, json.dumps(payload).encode(), durable=False)
        except OSError as e:
            log.debug("could not write hash memo %s: %s", memo_file, e)
    return ModelDigest(digest, tuple(paths), size, False)


def forget_model(model: Path, memo_dir: Path) -> None:
    """Drop the memo of ``model`` (its bytes were found to differ from what the memo said)."""
    _fs.remove_file(_memo_path(memo_dir, str(Path(os.path.abspath(model)))))


#: Library digests this process already made, by absolute path: (stat identity, digest). A second cache
#: folder in one process (or a cache folder just emptied) would otherwise hash ~220 MB of QNN libraries
#: again; the same identity rule as the on-disk memo decides whether a file is still the one hashed.
_PROCESS_MEMO: dict[str, tuple[list[object], str]] = {}


def files_digest(paths: Iterable[Path], memo_dir: Path | None) -> dict[str, str]:
    """Digest each file (native libraries), memoised by stat signature like models (on disk, per cache
    folder, and for this process)."""
    out: dict[str, str] = {}
    for path in paths:
        key = "file:" + os.path.abspath(path)
        known = _PROCESS_MEMO.get(key)
        if known is not None:
            try:
                if identity(str(path)) == known[0]:
                    out[path.name] = known[1]
                    continue
            except OSError:
                pass
        memo_file = _memo_path(memo_dir, key) if memo_dir is not None else None
        data = _read_memo(memo_file, key) if memo_file is not None else None
        if data is not None and _memo_valid(data):
            out[path.name] = str(data["digest"])
            continue
        try:
            sig = identity(str(path))
            digest = file_digest(path, follow_links=True)
        except OSError:
            out[path.name] = "missing"
            continue
        out[path.name] = digest
        _PROCESS_MEMO[key] = (sig, digest)
        if memo_file is not None:
            payload = {"format": _MEMO_FORMAT, "key": key, "digest": digest, "files": [[os.path.abspath(path), sig]]}
            try:
                _fs.atomic_write(memo_file, json.dumps(payload).encode(), durable=False)
            except OSError as e:
                log.debug("could not write hash memo %s: %s", memo_file, e)
    return out
