"""Compiles that run in a separate, detached process: the first launch gets a working session at once.

On a device without a prebuilt entry, a compile takes tens of seconds to tens of minutes. With
``on_miss="background"`` the load serves the original model on the ``meanwhile`` providers (outcome
``pending``) and starts ``python -m ctxcache._worker`` detached from the app (its own session, no
inherited terminal or pipes), so the compile finishes even if the app quits a second later. The worker is
an ordinary load with ``on_miss="compile"``: it compiles under the key's lock and publishes through the
one-rename commit, so ten launches start one compile and the next launch after it is a plain hit.

A guard file ``locks/<key>.bg`` says a worker was started (pid, time, attempts). A launch starts no second
worker while the key's lock is held or the last worker is still starting; a worker that died (the user
logged off, a crash) is started again at a later launch, and after :data:`MAX_ATTEMPTS` deaths the key is
remembered as not compilable (``negative_ttl``), as a foreground compile failure would be.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from . import _fs
from ._locking import release, stalled, try_lock
from ._spawn import child_env, python_command, unavailable_reason
from ._store import Store

log = logging.getLogger("ctxcache")

MAX_ATTEMPTS = 3
#: A worker that has not taken the key's lock this long after its start is judged dead (it takes it in
#: well under a second: a Python start and an import).
_STARTING = 60.0

Started = Literal["started", "running", "unavailable", "given_up"]


def guard_path(store: Store, key: str) -> Path:
    return store.locks_dir / f"{key}.bg"


def _read_guard(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_fs.read_small(path, 4096))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def running(store: Store, key: str, *, stall_after: float | None = None) -> str | None:
    """Whether a compile of ``key`` is under way: ``"running"`` (its lock is held by a process making
    progress, or a worker was started a moment ago), why it is stalled (held by a process that made no
    progress for ``stall_after`` seconds: stopped, frozen), or ``None`` (nobody is compiling it)."""
    if not _fs.is_folder(store.locks_dir):
        return None  # no cache yet (explain on an empty folder): nobody compiles, and nothing is made
    handle = try_lock(store.lock_path(key))
    if handle is None:
        return stalled(store.lock_path(key), stall_after) or "running"
    release(handle)
    guard = _read_guard(guard_path(store, key))
    if guard is None:
        return None
    started = guard.get("started")
    pid = guard.get("pid")
    alive = (isinstance(started, (int, float)) and abs(time.time() - started) < _STARTING
             and isinstance(pid, int) and _fs.pid_alive(pid))
    return "running" if alive else None


def start(store: Store, key: str, job: dict[str, Any], *, give_up: Callable[[str], None]) -> tuple[Started, str]:
    """Start a detached worker for ``job`` unless one is running; ``(what happened, detail)``.

    One worker per key, however many threads and processes launch at once: the check and the start happen
    under a short per-key claim (a second flock beside the key's lock), so two launches cannot both see
    "nobody is compiling" and both start one. ``give_up`` records the failure after :data:`MAX_ATTEMPTS`
    dead workers (the key's negative record for a compile; the rebuild's own record for a rebuild, so
    that a working entry keeps serving).
    """
    claim = try_lock(store.locks_dir / f"{key}.bg.claim")
    if claim is None:
        return "running", "a compile of this model is being started by another launch"
    try:
        return _start(store, key, job, give_up)
    finally:
        release(claim)


def _start(store: Store, key: str, job: dict[str, Any], give_up: Callable[[str], None]) -> tuple[Started, str]:
    if running(store, key) is not None:
        return "running", "a compile of this model is already running"
    why = unavailable_reason()
    cmd = python_command()
    if why is not None or cmd is None:
        return "unavailable", f"no background process can be started here ({why})"
    path = guard_path(store, key)
    previous = _read_guard(path)
    attempts = int(previous.get("attempts", 0)) if previous is not None and isinstance(previous.get("attempts"), int) else 0
    if attempts >= MAX_ATTEMPTS:
        give_up(f"its background compile died {attempts} times (crashed or killed) before it finished")
        _fs.remove_file(path)
        return "given_up", f"the background compile died {attempts} times"
    kw: dict[str, Any] = {}
    if sys.platform == "win32":  # pragma: no cover - Windows
        kw["creationflags"] = 0x00000008 | 0x00000200  # DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP
    else:
        kw["start_new_session"] = True  # not in the app's process group: a Ctrl-C or a hang-up of it spares us
    try:
        proc = subprocess.Popen([*cmd, "-m", "ctxcache._worker", json.dumps(job)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                                env=child_env(), cwd=str(store.base), **kw)
    except OSError as e:
        return "unavailable", f"cannot start a background process: {e}"
    try:
        # Written before the claim is released: the next launch sees a worker that is starting.
        _fs.atomic_write(path, json.dumps({"pid": proc.pid, "started": time.time(), "attempts": attempts + 1}).encode(),
                         durable=False)
    except OSError:
        pass
    # Not waited for: the app may exit first. The child is reaped by init once we are gone; while we
    # live, a finished child stays a zombie until Popen's own cleanup reaps it at the next Popen.
    log.info("started a background compile of %s (pid %d)", key[:12], proc.pid)
    return "started", f"compiling in a separate process (pid {proc.pid})"


def finished(store: Store, key: str) -> None:
    """The worker's last act: the guard goes (a compile that finished, or failed and was remembered)."""
    _fs.remove_file(guard_path(store, key))


class EarlySession:
    """The ``meanwhile`` session, created on a thread while the load works out the key (the library and
    model digests, the lock, the worker's start): on a first launch that ends ``pending`` the app's
    session is then ready about when a plain onnxruntime session would be. Started only where a miss is
    near certain (the model's bytes were just hashed: this cache has not seen the file); if the load
    ends otherwise (a hit from another path's entry, a tier), the session is dropped: one CPU session
    created for nothing, on a launch that is rare by construction. ONNX Runtime releases the GIL while it
    creates a session, and the caller's SessionOptions is only read."""

    __slots__ = ("_done", "_error", "_session")

    def __init__(self, make: Callable[[], Any]) -> None:
        import threading

        self._session: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        # Not a daemon: an app that exits at once waits for ORT to finish rather than tearing the
        # interpreter down under a thread inside native code.
        threading.Thread(target=self._run, args=(make,), name="ctxcache-meanwhile").start()

    def _run(self, make: Callable[[], Any]) -> None:
        try:
            self._session = make()
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised in its thread
            self._error = e
        finally:
            self._done.set()

    def result(self) -> Any:
        """The session, or the very error its creation raised (as a direct creation would raise it)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._session


class Waiter:
    """What ``LoadResult.ready()`` and ``ContextCache.wait()`` poll: has the entry of ``key`` appeared?"""

    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self._key = key

    def wait(self, timeout: float | None) -> bool:
        """``True`` once the entry is committed; ``False`` when ``timeout`` passed, or the compile is no
        longer running and left no entry (it failed: the next load says why)."""
        from ._store import BrokenEntry

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self._store.lookup(self._key) is not None:
                    return True
            except BrokenEntry:
                pass
            if not running(self._store, self._key) and not _fs.exists(guard_path(self._store, self._key)):
                try:
                    return self._store.lookup(self._key) is not None
                except BrokenEntry:
                    return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
