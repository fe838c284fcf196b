"""Crash markers: a file held (and flocked) while a context loads, so that a context that kills its
loader is not loaded again at the next launch (reported on real devices, onnxruntime issue 23431).

A marker is named ``<key>.<pid>.<rand>`` and, where ``fcntl.flock`` exists, held under flock while the
load runs (content ``flock``). The pid alone is not enough: a container's app is pid 1 at every start,
so after it died in a load the restarted app would see "pid 1 is alive" and load the killer context
again, forever. The kernel drops the flock when the holder dies, so a marker whose lock can be taken is
a dead loader's, whoever has that pid now. Without ``fcntl`` (Windows, some embedded Pythons) the pid is
all there is to go by.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from . import _fs
from ._log import log

_LOCKED = b"flock\n"


class Marker(NamedTuple):
    """A crash marker held open while a context loads."""

    path: Path
    fd: int


def _fcntl() -> Any:
    """``fcntl``, or ``None`` where it does not exist (Windows, some embedded Pythons)."""
    try:
        import fcntl
    except ImportError:
        return None
    return fcntl


def mark(folder: Path, key: str) -> Marker | None:
    """Leave a marker while a context loads; one that outlives its process means the load killed it."""
    path = folder / f"{key}.{os.getpid()}.{os.urandom(3).hex()}"
    try:
        fd = _fs.create_exclusive(path)
    except OSError as e:
        log.debug("could not write load marker %s: %s", path, e)
        return None
    fcntl = _fcntl()
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, _LOCKED)
        except OSError:
            pass  # the pid in the name still works where pids are not reused
    return Marker(path, fd)


def clear(marker: Marker | None) -> None:
    if marker is None:
        return
    # Unlink before closing: closed first, the marker would sit unlocked for a moment and read as a
    # dead loader's.
    _fs.remove_file(marker.path)
    try:
        os.close(marker.fd)
    except OSError:
        pass


def _dead(folder: Path, name: str) -> bool:
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    if not _fs.pid_alive(int(parts[1])):
        return True
    fcntl = _fcntl()
    if fcntl is None:
        return False
    try:
        fd = _fs.open_regular(folder / name)
    except OSError:
        return False
    try:
        if os.read(fd, 16) != _LOCKED:
            return False  # not (yet) locked by its writer: its pid is all there is to go by
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return False  # its loader holds it: a load in progress
        return True  # nobody holds it: that loader is dead and its pid belongs to another process
    finally:
        os.close(fd)


def dead_markers(folder: Path, key: str) -> list[str]:
    """Names of ``key``'s markers whose loader died while loading (read-only)."""
    prefix = key + "."
    return [n for n in _fs.names(folder) if n.startswith(prefix) and _dead(folder, n)]


def consume(folder: Path, names: list[str]) -> int:
    """Remove markers once their verdict is acted on; returns how many this process removed (two
    processes that judged the same marker count it once)."""
    n = 0
    for name in names:
        try:
            _fs.ops.unlink(str(folder / name))
            n += 1
        except OSError:
            pass
    return n


# Deaths of loaders whose context then loaded fine in a probe (external kills), since the last load of
# that entry that came through: ``<key>.deaths`` holds the count. Two name parts, so never a marker.
def deaths(folder: Path, key: str) -> int:
    try:
        raw = _fs.read_small(folder / f"{key}.deaths", 64)
        return int(raw.strip() or 0)
    except (OSError, ValueError):
        return 0


def note_death(folder: Path, key: str) -> int:
    """Count one more external death of a loader of ``key``; returns the count."""
    n = deaths(folder, key) + 1
    try:
        _fs.atomic_write(folder / f"{key}.deaths", str(n).encode(), durable=False)
    except OSError:
        pass
    return n


def forget_deaths(folder: Path, key: str) -> None:
    """A load of ``key`` came through: the deaths were not a pattern."""
    _fs.remove_file(folder / f"{key}.deaths")


def live_keys(folder: Path) -> set[str]:
    """Keys whose context is being loaded right now by a live process (never removed as junk)."""
    out = set()
    for name in _fs.names(folder):
        parts = name.split(".")
        if len(parts) == 3 and not _dead(folder, name):
            out.add(parts[0])
    return out
