"""Documented seams: the few points where the reliability suite injects faults into a real load.

Tests replace an attribute of :data:`hooks` (or of ``_fs.ops`` for the OS calls Windows refuses for
open files) with a wrapper that kills the process, fills the disk or races another process at exactly
that point; nothing else in the library is patched by name. Each hook runs in the loading process, on
the miss or hit path it names, and the defaults do nothing but the real work.

=================  ====================================================================================
``compile``        drives the compile API (``_compile.compile_into``); wraps the native compile
``locked``         the key's lock was just taken by a load (argument: the key)
``published``      an entry was just published; the lock is released, the session not created yet
``verified``       an entry passed every check and its context is about to be loaded
``_fs.ops``        ``rename``, ``replace``, ``unlink``, ``rmdir`` of every cache path
=================  ====================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._manifest import Entry


def _nothing(*_args: Any) -> None:
    return None


def _compile(*args: Any, **kwargs: Any) -> float:
    # Imported at the first compile: a launch that hits never needs the compile API's module.
    from ._compile import compile_into

    return compile_into(*args, **kwargs)


class Hooks:
    """The seams' current callables (a plain class: a dataclass costs a millisecond at every import)."""

    def __init__(self) -> None:
        self.compile: Callable[..., float] = _compile
        self.locked: Callable[[str], None] = _nothing
        self.published: Callable[[Entry], None] = _nothing
        self.verified: Callable[[Entry], None] = _nothing


hooks = Hooks()
