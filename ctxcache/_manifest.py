"""The entry manifest: its schema, how it is built, checked and read. The one owner of its fields.

A manifest is the JSON file that makes a folder an entry: the key and its labelled parts, one record
per artifact (name, size, xxh3-128, stat signature), what was compiled and when. The loader builds it
through :func:`new_manifest`, the store checks it with :func:`check` before anything reads a field, and
tiers export it through :func:`portable`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from ._fingerprint import Fingerprint

MANIFEST = "manifest.json"
CONTEXT = "ctx.onnx"
FORMAT = 1
#: A manifest is a few KB; anything much larger is damage or an attack (JSON bomb), not ours.
MAX_BYTES = 1 << 20
_MAX_ARTIFACTS = 64
# fullmatch, not match + '$': '$' also matches before a trailing newline ("ctx.onnx\n" passed).
KEY_RE = re.compile(r"[0-9a-f]{32}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
#: Keys that describe one store's copy of an entry, not the entry: never exported, rebuilt on publish.
LOCAL_ONLY = ("format", "key", "artifacts", "entry_id", "origin", "gone")


def safe_name(name: object) -> bool:
    """A plain file name inside an entry: no separators, no '..', no hidden or device names."""
    return isinstance(name, str) and bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


def is_key(text: object) -> bool:
    return isinstance(text, str) and bool(KEY_RE.fullmatch(text))


def printable(text: object, limit: int = 512) -> bool:
    """A free-form name safe to print on a terminal (no control characters, bounded)."""
    return isinstance(text, str) and len(text) <= limit and text.isprintable()


def file_name(text: object, limit: int = 4096) -> bool:
    """A file name as the OS gave it: any text without NUL, bounded. Ideographic and no-break spaces,
    joiners, tabs and newlines are all legal in file names; the cache must take them (and show them
    escaped: :func:`shown`)."""
    return isinstance(text, str) and len(text) <= limit and "\x00" not in text


def shown(text: str) -> str:
    """``text`` safe for one line of a terminal or a log: every character that is not printable (a tab,
    a newline, a no-break or ideographic space, a zero-width joiner, a stray surrogate) as its escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)


def _number(value: object, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and low <= value <= high)


class Entry(NamedTuple):
    """A committed entry: its folder and its checked manifest."""

    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def context_path(self) -> Path:
        return self.path / CONTEXT

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return list(self.manifest["artifacts"])

    @property
    def size(self) -> int:
        return sum(int(a["size"]) for a in self.artifacts)

    @property
    def entry_id(self) -> str:
        return str(self.manifest.get("entry_id", ""))

    @property
    def compile_seconds(self) -> float:
        return float(self.manifest.get("compile_seconds", 0.0))

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0.0))

    @property
    def provider(self) -> str:
        return str(self.manifest.get("provider", "?"))

    @property
    def model_name(self) -> str:
        model = self.manifest.get("model")
        return str(model.get("name", "?")) if isinstance(model, dict) else "?"

    @property
    def model_name_shown(self) -> str:
        """:attr:`model_name` escaped for one line of a log or a terminal."""
        return shown(self.model_name)

    @property
    def parts(self) -> dict[str, Any]:
        return dict(self.manifest.get("parts", []))

    @property
    def compat(self) -> dict[str, str]:
        """The EP compatibility strings recorded from the context model (``ep_compatibility_info.*``)."""
        return dict(self.manifest.get("compat", {}))

    @property
    def origin(self) -> dict[str, Any] | None:
        """Where a tier-filled entry came from (``tier``, ``location``...); ``None`` when compiled here."""
        origin = self.manifest.get("origin")
        return origin if isinstance(origin, dict) else None

    def last_used(self) -> float:
        try:
            return os.lstat(self.path / MANIFEST).st_mtime
        except OSError:
            return self.created


def check(data: Any, key: str) -> str | None:
    """``None`` when ``data`` is a manifest this version can use for ``key``, else what is wrong.

    Every field a hit, a listing or a command prints is checked here (type, range, printable), so a
    hostile or damaged manifest is a broken entry, never a ``TypeError`` in the app or escape codes on
    the user's terminal.
    """
    if not isinstance(data, dict):
        return "not a JSON object"
    fmt = data.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return "no format number"
    if fmt > FORMAT:
        return f"written by a newer ctxcache (format {fmt} > {FORMAT})"
    if data.get("key") != key:
        return "key does not match its folder"
    arts = data.get("artifacts")
    if not isinstance(arts, list) or not arts or len(arts) > _MAX_ARTIFACTS:
        return "no artifact list"
    names = set()
    for a in arts:
        if not isinstance(a, dict) or not safe_name(a.get("name")):
            return "artifact with an unsafe or missing name"
        if not _number(a.get("size"), 0, 1 << 50) or not isinstance(a.get("size"), int):
            return "artifact without a valid size"
        if not isinstance(a.get("xxh3"), str) or not KEY_RE.fullmatch(a["xxh3"]):
            return "artifact without a digest"
        sig = a.get("sig")
        if not (isinstance(sig, list) and len(sig) == 4 and all(isinstance(x, int) and not isinstance(x, bool) for x in sig)):
            return "artifact without stat signature"
        if a["name"] in names or a["name"] == MANIFEST:
            return "artifact listed twice"
        names.add(a["name"])
    if CONTEXT not in names:
        return f"no {CONTEXT} artifact"
    parts = data.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in parts
    ):
        return "no key parts"
    for name in ("created", "compile_seconds"):
        if name in data and not _number(data[name], 0, 1e12):
            return f"{name} is not a number in range"
    for name in ("entry_id", "provider", "ctxcache_version"):
        if name in data and not printable(data[name], 256):
            return f"{name} is not a printable string"
    model = data.get("model")
    if model is not None:
        if not isinstance(model, dict):
            return "model is not an object"
        if "name" in model and not file_name(model["name"]):
            return "model name is not a file name"
        if model.get("size") is not None and not _number(model["size"], 0, 1 << 50):
            return "model size is not a number in range"
    compat = data.get("compat", {})
    if not isinstance(compat, dict) or not all(printable(k, 256) and printable(v, 4096) for k, v in compat.items()):
        return "compat is not an object of printable strings"
    origin = data.get("origin")
    if origin is not None and not isinstance(origin, dict):
        return "origin is not an object"
    if "gone" in data and not isinstance(data["gone"], dict):
        return "gone is not an object"
    return None


def parse(raw: bytes, key: str, where: Path) -> dict[str, Any]:
    """The checked manifest from its bytes; ``ValueError`` saying what is wrong."""
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{where} is larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: a nesting bomb ("[[[[...")
        raise ValueError(f"{where} is not valid JSON ({type(e).__name__})") from None
    problem = check(data, key)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    assert isinstance(data, dict)
    return data


def new_manifest(
    fingerprint: Fingerprint,
    *,
    model_name: str,
    model_path: str | None,
    model_size: int,
    provider: str,
    created: float,
    compile_seconds: float,
    compat: dict[str, str],
    version: str,
) -> dict[str, Any]:
    """What the loader records for a freshly compiled entry (the store adds key, format and artifacts)."""
    return {
        "parts": [list(p) for p in fingerprint.parts],
        "model": {"name": model_name, "path": model_path, "size": model_size},
        "provider": provider,
        "created": created,
        "compile_seconds": round(compile_seconds, 4),
        "compat": compat,
        "ctxcache_version": version,
    }


def portable(entry: Entry) -> bytes:
    """The entry's manifest without what only describes this store's copy (stat signatures, ids)."""
    data = {k: v for k, v in entry.manifest.items() if k not in LOCAL_ONLY}
    data["key"] = entry.key
    return json.dumps(data, sort_keys=True, indent=1).encode()


def from_portable(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest from another store, stripped of what the local publish rebuilds."""
    return {k: v for k, v in data.items() if k not in LOCAL_ONLY}


def dumps(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1).encode()
