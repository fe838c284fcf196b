"""Per-key cross-process locks (filelock), with a heartbeat, a "still waiting" log and a deadline.

The lock only avoids duplicate compiles; correctness comes from the atomic rename in ``_store``. On
POSIX filelock uses ``flock``, which the kernel releases when the holder dies (even by ``kill -9``), so
a crashed compiler never wedges the cache; Windows' ``msvcrt.locking`` behaves the same.

A holder that is alive but not making progress keeps its lock, though: a process stopped (SIGSTOP, a
frozen cgroup, a debugger), or blocked writing into a full pipe. So a holder writes a heartbeat beside
the lock (``<lock>.beat``) every second: its pid and its own CPU time. A waiter that sees the CPU time
stand still for ``stall_after`` seconds gives up (:class:`LockStalled`) and the load serves the original
model meanwhile. CPU time rather than a timestamp: a heartbeat thread keeps ticking while the main
thread is blocked on a pipe, and only the work done tells progress from liveness.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("ctxcache")

# How often a waiter says it is still waiting; compiles of big models take minutes.
_LOG_EVERY = 5.0
# How often a holder writes its heartbeat, and how much of its CPU time counts as progress (a heartbeat
# itself costs ~0.1 ms; a compile uses a core).
_BEAT_EVERY = 1.0
_PROGRESS_CPU = 0.01


class LockStalled(TimeoutError):
    """The key's lock is held by a process that made no progress for ``seconds`` (stopped or blocked)."""

    def __init__(self, path: Path, seconds: float, holder: str) -> None:
        super().__init__(f"the process holding {path} ({holder}) made no progress for {seconds:.1f} s")
        self.path = path
        self.seconds = seconds
        self.holder = holder


def _read_beat(path: Path) -> dict[str, Any] | None:
    from . import _fs

    try:
        data = json.loads(_fs.read_small(path, 4096))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cpu"), (int, float)):
        return None
    return data


def stalled(lock_path: Path, after: float | None) -> str | None:
    """Without waiting: why the holder of ``lock_path`` is stalled (its heartbeat stopped, or its CPU time
    has not moved, for ``after`` seconds), or ``None`` (making progress, or no heartbeat to judge by)."""
    if after is None:
        return None
    beat = _read_beat(lock_path.with_name(lock_path.name + ".beat"))
    if beat is None:
        return None
    now = time.time()
    written, progress = beat.get("t"), beat.get("progress", beat.get("t"))
    if not isinstance(written, (int, float)) or not isinstance(progress, (int, float)):
        return None
    idle = now - min(float(written), float(progress))  # a stopped process writes no beat at all
    if idle > after + _BEAT_EVERY:
        return (f"the process compiling this model (pid {beat.get('pid')}) made no progress for {idle:.0f} s "
                "(stopped, frozen or blocked); serving the meanwhile session")
    return None


class _Heartbeat:
    """The holder's side: a daemon thread that writes ``{"pid", "cpu"}`` to the beat file every second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._cpu = time.process_time()
        self._progress = time.time()
        self._beat()  # at once: a holder frozen right after taking the lock must still be judged
        self._thread = threading.Thread(target=self._run, name="ctxcache-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from . import _fs

        cpu, now = time.process_time(), time.time()
        if cpu - self._cpu >= _PROGRESS_CPU:
            self._cpu, self._progress = cpu, now
        try:
            # "progress": when the CPU time last moved, so a reader that cannot wait (a launch deciding
            # whether a background compile is alive) can still tell a stalled holder at one glance.
            _fs.atomic_write(self.path, json.dumps({"pid": os.getpid(), "cpu": cpu, "t": now,
                                                    "progress": self._progress}).encode(), durable=False)
        except OSError:
            pass  # a full or read-only disk: waiters then judge the holder by its silence

    def _run(self) -> None:
        while not self._stop.wait(_BEAT_EVERY):
            self._beat()

    def stop(self) -> None:
        from . import _fs

        self._stop.set()
        self._thread.join()
        _fs.remove_file(self.path)


class KeyLock:
    """One key's lock: :meth:`acquire` with a deadline and a stall rule, :meth:`release` as soon as the job
    is done (idempotent; the ``with`` block releases whatever is still held)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.beat_path = path.with_name(path.name + ".beat")
        self._lock: Any = None
        self._heart: _Heartbeat | None = None
        self.waited = 0.0

    def acquire(self, timeout: float | None, what: str, *, stall_after: float | None = None) -> float:
        """Hold the lock (and beat while holding it); returns the seconds waited.

        ``timeout=None`` waits forever. Raises ``filelock.Timeout`` (a ``TimeoutError``) when the deadline
        passes, :class:`LockStalled` when the holder's CPU time stood still for ``stall_after`` seconds,
        ``OSError`` when the lock file cannot be created.
        """
        import filelock  # only the miss path needs it; keep it off the hit path's imports

        lock = filelock.FileLock(str(self.path), is_singleton=False)
        start = last_log = last_progress = time.monotonic()
        deadline = None if timeout is None else start + timeout
        seen_cpu: float | None = None
        holder = "no heartbeat"
        while True:
            step = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                lock.acquire(timeout=step, poll_interval=0.05)
                break
            except filelock.Timeout:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise
                beat = _read_beat(self.beat_path)
                if beat is not None:
                    holder = f"pid {beat.get('pid')}"
                    cpu = float(beat["cpu"])
                    if seen_cpu is None or cpu - seen_cpu >= _PROGRESS_CPU or cpu < seen_cpu:
                        if seen_cpu is not None:
                            last_progress = now
                        seen_cpu = cpu
                if stall_after is not None and now - last_progress > stall_after:
                    raise LockStalled(self.path, now - last_progress, holder) from None
                if now - last_log >= _LOG_EVERY:
                    last_log = now
                    log.info("still waiting for another process to compile %s (%.0f s so far)", what, now - start)
        self._lock = lock
        self.waited = time.monotonic() - start
        self._heart = _Heartbeat(self.beat_path)
        return self.waited

    def release(self) -> None:
        if self._heart is not None:
            heart, self._heart = self._heart, None
            heart.stop()
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

    def __enter__(self) -> KeyLock:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


class key_lock:
    """``with key_lock(path, timeout, what):`` holds the lock for the block (raises like :meth:`KeyLock.acquire`)."""

    def __init__(self, path: Path, timeout: float | None, what: str, *, stall_after: float | None = None) -> None:
        self._lock = KeyLock(path)
        self._timeout = timeout
        self._what = what
        self._stall_after = stall_after

    def __enter__(self) -> KeyLock:
        self._lock.acquire(self._timeout, self._what, stall_after=self._stall_after)
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
