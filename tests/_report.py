"""The child's side of tests/_child.py: ``report(value)`` sends one JSON value to the test that started this
process, on the descriptor named by ``CTXCACHE_TEST_REPORT_FD`` (never its stdout, which native libraries share).

Imported inside children, where some tests measure what got imported: it needs nothing but ``json`` and ``os``.
"""

from __future__ import annotations

import json
import os

#: The environment variable that names the report descriptor in a child.
REPORT_FD = "CTXCACHE_TEST_REPORT_FD"


def report(value: object) -> None:
    """One line on the report descriptor, in one unbuffered write: a report made just before the child
    kills itself is not lost."""
    data = (json.dumps(value) + "\n").encode()
    fd = int(os.environ[REPORT_FD])
    while data:
        data = data[os.write(fd, data):]
