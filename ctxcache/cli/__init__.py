"""The ``ctxcache`` command line: ``main(argv) -> int``, one function per command (see ``_main``)."""

from __future__ import annotations

from ._main import main

__all__ = ["main"]
