"""Records: what describes one entry in a bundle's index, a model package and a remote store, checked the
same way wherever it comes from (sizes, SHA-256 of every file, parts that hash to the key)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path
from typing import IO, Any

from .. import _fs, _manifest
from .._key import key_of
from .._manifest import CONTEXT, MANIFEST, Entry
from ..errors import TierError

RECORD_FORMAT = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a trailing newline through
_MAX_FILES = 64
_CHUNK = 1 << 20


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
