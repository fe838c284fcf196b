"""The result of a ctxcache child process (a probe load, a demo launch), on a channel of its own.

A child's stdout is shared with every native library it loads, and they write to file descriptor 1
behind Python's back: QNN's HTP simulator prints ``# LIBNATIVE: ...`` through C stdio, flushed at exit
(after anything Python printed) when stdout is a pipe. "The last line of stdout" is then not the result,
and a native line that happens to look like JSON would be read as one.

So the child's first act, before anything native is loaded, is to keep the pipe it got as stdout for
itself (a private duplicate) and to point fd 1 at stderr: native output lands in the stderr pipe, where a
caller reads it only to explain a failure, and the stdout pipe carries exactly one JSON object, written by
``send_result``. Portable: ``os.dup``/``os.dup2`` exist on POSIX and Windows alike.
"""

from __future__ import annotations

import json
from typing import Any

# Runs first in the child, with nothing but the standard library imported.
_PRELUDE = r"""
import json as _ctx_json, os as _ctx_os
_ctx_result_fd = _ctx_os.dup(1)
_ctx_os.dup2(2, 1)
def send_result(value):
    data = (_ctx_json.dumps(value) + "\n").encode()
    while data:
        data = data[_ctx_os.write(_ctx_result_fd, data):]
"""


def child_code(body: str) -> str:
    """The ``python -c`` source of a child that reports through ``send_result(value)`` (defined for
    ``body``), with native output moved off its result channel before ``body`` runs."""
    return _PRELUDE + body


def read_result(stdout: str | bytes) -> dict[str, Any] | None:
    """The child's result: its whole stdout, one JSON object; ``None`` when it sent none (it died, or
    failed before reporting) or what came is not one object."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
