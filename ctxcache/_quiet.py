"""Native chatter kept off the app's stdout: ``quiet_native_stdout()``.

The HTP simulator in the ``onnxruntime-qnn`` x86_64 wheel (libnative, inside ``libQnnHtp.so``) prints
``# LIBNATIVE: ...`` once per process, at the first QNN session or compile, with C stdio's ``printf`` on
file descriptor 1. Every branch of its configuration lookup prints a line (``LIBNATIVE_CONFIG`` pointing at
a file prints "Overriding config file path ...", and the file's content changes the simulator's threading),
so there is no setting that silences it. Python's ``sys.stdout`` and ``logging`` never see it.

C stdio buffers that line: fully when stdout is a pipe or a file (it is written at process exit, after
everything the app printed), by line on a terminal. Pointing fd 1 elsewhere only while the provider is
first used is therefore not enough on its own: the line is still in the buffer when fd 1 is put back, and
goes to the real stdout at exit. So the buffers are flushed (``fflush(NULL)``) on the way in, which sends
the app's own pending C output to the real stdout, and on the way out, which sends what the native
library wrote meanwhile to where fd 1 pointed meanwhile. (CPython started with ``-u`` or
``PYTHONUNBUFFERED=1`` makes C stdio unbuffered, which is why the line shows at once on such machines.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Literal

# fd 1 belongs to the whole process: nested and concurrent blocks share one redirection, undone by the last.
_lock = threading.Lock()
_depth = 0
_saved: int | None = None


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: every C stdio output stream of the process, including what native libraries buffered."""
    try:
        import ctypes

        if sys.platform == "win32":
            # The universal CRT, which current native libraries link; one built against another CRT keeps
            # its own buffers (not reached here).
            libc = ctypes.CDLL("ucrtbase")
        else:
            libc = ctypes.CDLL(None)
        libc.fflush(None)
    except (OSError, AttributeError, ImportError):
        pass  # no C runtime to reach: unbuffered native writes are still redirected


def _flush_python_stdout() -> None:
    for stream in (sys.stdout, sys.__stdout__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # closed, or the reader went away: nothing of ours is pending there


def _enter(to: Literal["stderr", "devnull"]) -> None:
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _flush_python_stdout()  # the app's own lines so far go to its stdout, in order
            _flush_c_stdio()
            try:
                saved = os.dup(1)
            except OSError:
                saved = None  # no fd 1 (a daemon started with it closed): nothing to protect
            if saved is not None:
                try:
                    if to == "devnull":
                        target = os.open(os.devnull, os.O_WRONLY)
                        try:
                            os.dup2(target, 1)
                        finally:
                            os.close(target)
                    else:
                        os.dup2(2, 1)
                except OSError:
                    os.close(saved)
                    raise
            _saved = saved
        _depth += 1


def _leave() -> None:
    global _depth, _saved
    with _lock:
        _depth -= 1
        if _depth == 0 and _saved is not None:
            saved, _saved = _saved, None
            try:
                _flush_c_stdio()  # what native code buffered meanwhile goes where fd 1 points meanwhile
            finally:
                os.dup2(saved, 1)
                os.close(saved)


@contextlib.contextmanager
def quiet_native_stdout(to: Literal["stderr", "devnull"] = "stderr") -> Iterator[None]:
    """Keep what native libraries write to file descriptor 1 off the app's stdout while the block runs.

    Wrap the app's first load on a provider that chatters (QNN's simulator prints ``# LIBNATIVE: ...``
    once per process, at its first session or compile): that output goes to stderr (``to="stderr"``, the
    default) or is dropped (``to="devnull"``), whether stdout is a pipe, a file or a terminal. fd 1 is put
    back when the block ends, also when it raises.

    fd 1 is the process's, not the thread's: meanwhile, whatever any thread writes to stdout (a ``print``
    whose line is flushed, a subprocess started inside the block) goes to stderr too. Print the app's
    own output after the block. Nested and concurrent blocks are allowed; the last one out restores fd 1.
    """
    if to not in ("stderr", "devnull"):
        raise ValueError(f"quiet_native_stdout(to={to!r}): use 'stderr' or 'devnull'")
    _enter(to)
    try:
        yield
    finally:
        _leave()
