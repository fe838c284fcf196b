"""Per-key cross-process locks (filelock), with a "still waiting" log and a deadline.

The lock only avoids duplicate compiles; correctness comes from the atomic rename in ``_store``. On
POSIX filelock uses ``flock``, which the kernel releases when the holder dies (even by ``kill -9``), so
a crashed compiler never wedges the cache; Windows' ``msvcrt.locking`` behaves the same.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("ctxcache")

# How often a waiter says it is still waiting; compiles of big models take minutes.
_LOG_EVERY = 5.0


class KeyLock:
    """One key's lock: :meth:`acquire` with a deadline, :meth:`release` as soon as the job is done
    (idempotent; the ``with`` block releases whatever is still held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: Any = None
        self.waited = 0.0

    def acquire(self, timeout: float | None, what: str) -> float:
        """Hold the lock; returns the seconds waited. ``timeout=None`` waits forever.

        Raises ``filelock.Timeout`` (a ``TimeoutError``) when the deadline passes, ``OSError`` when the
        lock file cannot be created.
        """
        import filelock  # only the miss path needs it; keep it off the hit path's imports

        lock = filelock.FileLock(str(self.path), is_singleton=False)
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
        self._lock = lock
        self.waited = time.monotonic() - start
        return self.waited

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def __enter__(self) -> KeyLock:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class key_lock:
    """``with key_lock(path, timeout, what):`` holds the lock for the block (raises like :meth:`KeyLock.acquire`)."""

    def __init__(self, path: Path, timeout: float | None, what: str) -> None:
        self._lock = KeyLock(path)
        self._timeout = timeout
        self._what = what

    def __enter__(self) -> KeyLock:
        self._lock.acquire(self._timeout, self._what)
        return self._lock

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()


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
