"""The negative cache: keys known not to compile (or whose fresh context does not load) here, and keys
for which a tier's entry failed to load. Remembered for ``negative_ttl`` so that a launch does not pay
for a doomed compile (or a doomed fetch) again and again.

One file per key in ``negative/``: ``<key>.json`` for compile-side failures, ``<key>.tiers.json`` for
tier rejections. :func:`remembered` is the one rule that turns a record into the load's reason; the
loader, ``explain`` and ``warm`` all ask it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import _fs
from ._types import Reason

log = logging.getLogger("ctxcache")

_MAX = 1 << 16
#: Codes a remembered record may carry; anything else reads as ``not_compilable`` (the old default).
_CODES = ("not_compilable", "compile_failed", "context_unloadable", "crashed_during_load")


def _read(path: Path, ttl: float) -> dict[str, object] | None:
    try:
        data = json.loads(_fs.read_small(path, _MAX))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("time"), (int, float)):
        return None
    # abs(): a record from a clock that was in the future must not be remembered for decades.
    if abs(time.time() - float(data["time"])) > ttl:
        return None
    return data


def alive(path: Path, ttl: float) -> bool:
    """A record still in force (housekeeping removes the others)."""
    return _read(path, ttl) is not None


def remember(folder: Path, key: str, code: str, message: str) -> None:
    try:
        _fs.atomic_write(folder / f"{key}.json",
                         json.dumps({"code": code, "message": message[:500], "time": time.time()}).encode(),
                         durable=False)
    except OSError as e:
        log.debug("could not remember %s for %s: %s", code, key[:12], e)


def remembered(folder: Path, key: str, ttl: float) -> Reason | None:
    """The reason a load of ``key`` is a bypass because of a remembered failure, or ``None``."""
    data = _read(folder / f"{key}.json", ttl)
    if data is None:
        return None
    code = data.get("code")
    if code not in _CODES or code == "compile_failed":
        code = "not_compilable"
    message = data.get("message")
    return Reason(str(code), f"remembered: {message if isinstance(message, str) else ''}"[:600])


def forget(folder: Path, key: str) -> None:
    _fs.remove_file(folder / f"{key}.json")


def remember_tier_rejection(folder: Path, key: str, tier: str, code: str) -> None:
    try:
        _fs.atomic_write(folder / f"{key}.tiers.json",
                         json.dumps({"tier": tier, "code": code, "time": time.time()}).encode(), durable=False)
    except OSError as e:
        log.debug("could not remember tier rejection for %s: %s", key[:12], e)


def tiers_rejected(folder: Path, key: str, ttl: float) -> bool:
    return _read(folder / f"{key}.tiers.json", ttl) is not None


def clear(folder: Path) -> int:
    n = 0
    for name in _fs.names(folder):
        if _fs.remove_file(folder / name):
            n += 1
    return n
