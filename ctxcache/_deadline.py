"""Reads with a deadline for the whole fetch (remote tiers).

A socket timeout bounds each read, not a fetch: a server that sends its headers, then one byte a
second, holds a plain read for as long as it likes. Every remote read goes through :func:`within`
(the caller waits at most until the deadline) and reads in chunks that check the deadline between
them (:func:`read_until`, :class:`DeadlineReader`).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


def within(deadline: float, what: str, fn: Callable[[], _T]) -> _T:
    """``fn()``, given up at the monotonic ``deadline`` with ``TimeoutError``.

    A socket timeout bounds each read, not a fetch: a server that sends its headers, then one byte a
    second, holds a plain read for as long as it likes. ``fn`` runs on a daemon thread and the caller
    waits at most until ``deadline``; a call given up keeps its thread until its own socket timeout or
    the server ends it (``fn`` should check the deadline between reads too: :func:`read_until`), never
    the caller.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what}: the fetch deadline has passed")
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as is
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name="ctxcache-fetch", daemon=True).start()
    if not done.wait(left):
        raise TimeoutError(f"{what}: not finished within the fetch deadline")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _read_some(f: Any, n: int) -> bytes:
    # read1 returns what one receive brought (urllib3 responses, buffered files); read(n) would wait for
    # all n bytes, however slowly they come. botocore's StreamingBody hides urllib3's response as _raw_stream.
    raw = getattr(f, "_raw_stream", f)
    read1 = getattr(raw, "read1", None)
    data = read1(n) if read1 is not None else raw.read(n)
    return bytes(data or b"")


def read_until(f: Any, limit: int | None, deadline: float, what: str) -> bytes:
    """All of ``f`` (at most ``limit + 1`` bytes: a longer result tells the caller it is too big), in
    chunks, ``TimeoutError`` once the monotonic ``deadline`` has passed."""
    chunks: list[bytes] = []
    got = 0
    while limit is None or got <= limit:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not finished within the fetch deadline")
        want = 1 << 16 if limit is None else min(1 << 16, limit + 1 - got)
        chunk = _read_some(f, want)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class DeadlineReader(io.RawIOBase):
    """A read-only stream over ``f`` whose every read ends by the monotonic ``deadline`` (``TimeoutError``)."""

    def __init__(self, f: Any, deadline: float, what: str) -> None:
        super().__init__()
        self._f = f
        self._deadline = deadline
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = within(self._deadline, self._what, lambda: _read_some(self._f, len(view)))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001 - best effort: a stalled connection may refuse it
            pass
        super().close()
