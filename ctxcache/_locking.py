"""Per-key cross-process locks (filelock), with a "still waiting" log and a deadline.

The lock only avoids duplicate compiles; correctness comes from the atomic rename in ``_store``. On
POSIX filelock uses ``flock``, which the kernel releases when the holder dies (even by ``kill -9``), so
a crashed compiler never wedges the cache; Windows' ``msvcrt.locking`` behaves the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("ctxcache")

# How often a waiter says it is still waiting; compiles of big models take minutes.
_LOG_EVERY = 5.0


class _Waited:
    """How long acquiring took; readable after the ``with`` starts."""

    seconds: float = 0.0


@contextmanager
def key_lock(path: Path, timeout: float | None, what: str) -> Iterator[_Waited]:
    """Hold the lock at ``path``. ``timeout=None`` waits forever.

    Raises ``filelock.Timeout`` (a ``TimeoutError``) when the deadline passes.
    """
    import filelock  # only the miss path needs it; keep it off the hit path's imports

    lock = filelock.FileLock(str(path), is_singleton=False)
    waited = _Waited()
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    while True:
        step = _LOG_EVERY if deadline is None else max(0.0, min(_LOG_EVERY, deadline - time.monotonic()))
        try:
            lock.acquire(timeout=step, poll_interval=0.05)
            break
        except filelock.Timeout:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            log.info("still waiting for another process to compile %s (%.0f s so far)", what, time.monotonic() - start)
    waited.seconds = time.monotonic() - start
    try:
        yield waited
    finally:
        lock.release()


def try_lock(path: Path) -> object | None:
    """Take the lock only if it is free right now; returns a handle for :func:`release`, or ``None``."""
    import filelock

    lock = filelock.FileLock(str(path), is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except (filelock.Timeout, OSError):
        return None
    return lock


def release(handle: object) -> None:
    handle.release()  # type: ignore[attr-defined]
