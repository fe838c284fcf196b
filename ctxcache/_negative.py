"""The negative cache: keys known not to compile (or whose fresh context does not load) here, and keys
for which a tier's entry failed to load. Remembered for ``negative_ttl`` so that a launch does not pay
for a doomed compile (or a doomed fetch) again and again.

One file per key in ``negative/``: ``<key>.json`` for compile-side failures, ``<key>.tiers.json`` for
tier rejections. :func:`remembered` is the one rule that turns a record into the load's reason; the
loader, ``explain`` and ``warm`` all ask it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import _fs
from ._log import log
from ._types import Reason

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


# -- rebuilds: an entry that serves is never taken out of service by its rebuild's failure -------------------
#: Seconds before a failed rebuild of an entry is tried again in the same environment, by failure count.
REBUILD_BACKOFF = (3600.0, 4 * 3600.0, 24 * 3600.0, 7 * 24 * 3600.0)


def _rebuild_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.rebuild.json"


def remember_rebuild_failure(folder: Path, key: str, env: str, message: str) -> None:
    """A rebuild of ``key``'s entry for environment ``env`` failed (its compile, or the new context's load,
    or its worker died): the old entry keeps serving; the next try waits by :data:`REBUILD_BACKOFF`."""
    data = _read(_rebuild_path(folder, key), REBUILD_BACKOFF[-1] * 2)
    previous = data.get("failures") if data is not None and data.get("env") == env else 0
    failures = (previous if isinstance(previous, int) else 0) + 1
    now = time.time()
    wait = REBUILD_BACKOFF[min(failures, len(REBUILD_BACKOFF)) - 1]
    try:
        _fs.atomic_write(_rebuild_path(folder, key), json.dumps(
            {"env": env, "failures": failures, "message": message[:500], "time": now, "next": now + wait}).encode(),
            durable=False)
    except OSError as e:
        log.debug("could not remember the failed rebuild of %s: %s", key[:12], e)


def rebuild_failed(folder: Path, key: str, env: str) -> tuple[Reason | None, bool]:
    """(what is remembered of failed rebuilds of ``key`` in ``env``, whether a new try must wait)."""
    data = _read(_rebuild_path(folder, key), REBUILD_BACKOFF[-1] * 2)
    if data is None or data.get("env") != env:
        return None, False
    nxt = data.get("next")
    waiting = isinstance(nxt, (int, float)) and time.time() < float(nxt)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(nxt))) if isinstance(nxt, (int, float)) else "?"
    text = (f"its rebuild failed {data.get('failures')} time(s) here ({data.get('message')}); "
            + (f"next try after {when}" if waiting else "tried again at the next launch"))
    return Reason("prefer_recompilation", text[:600]), waiting


def forget_rebuild(folder: Path, key: str) -> None:
    _fs.remove_file(_rebuild_path(folder, key))


# -- background refusals: a worker that cannot make the app's key ------------------------------------------
def remember_background_refusal(folder: Path, key: str, message: str) -> None:
    try:
        _fs.atomic_write(folder / f"{key}.background.json",
                         json.dumps({"message": message[:500], "time": time.time()}).encode(), durable=False)
    except OSError as e:
        log.debug("could not remember the background refusal for %s: %s", key[:12], e)


def background_refused(folder: Path, key: str, ttl: float) -> str | None:
    """Why a background worker refused ``key``'s job recently (the next loads compile in the foreground)."""
    data = _read(folder / f"{key}.background.json", ttl)
    message = data.get("message") if data is not None else None
    return message if isinstance(message, str) else ("refused" if data is not None else None)
