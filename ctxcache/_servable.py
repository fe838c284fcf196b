"""The one rule that decides whether a committed entry may be served to a session.

Load, ``explain``, ``warm`` and ``verify`` all ask :func:`entry_problem`; none re-states any part of
it. (When ``explain`` had its own copy it said "hit" where the load fell back as ``incompatible``.)
"""

from __future__ import annotations

from ._manifest import Entry
from ._markers import consume, dead_markers
from ._store import Store
from ._types import Reason
from .providers import ExecutionProvider


def entry_problem(store: Store, entry: Entry, ep: ExecutionProvider | None, *, full: bool,
                  consume_markers: bool = False, fresh: bool = False) -> Reason | None:
    """Why ``entry`` must not be served on ``ep`` here, or ``None`` when it may be.

    In order: a process died while loading it (its crash marker outlived it); its files are not the
    ones recorded (stat signature, or every byte with ``full``); the context refers to files outside
    it; the provider's compatibility check refuses it. ``consume_markers`` removes the dead loaders'
    markers once the caller acts on the verdict (the loader quarantines the entry); a read-only
    caller leaves them. ``fresh`` skips the compatibility check for a context compiled a moment ago
    in this process (QNN's check segfaulted when called right after a compile).
    """
    dead = dead_markers(store.markers_dir, entry.key)
    if dead:
        if consume_markers:
            consume(store.markers_dir, dead)
        return Reason("crashed_during_load", "a process died while loading this context; not loading it again")
    problem = store.verify(entry, full=full)
    if problem is not None:
        return Reason(problem.code, problem.message)
    if ep is not None and not fresh:
        info = entry.compat.get(ep.name)
        if info is not None:
            verdict = ep.compatibility(info)
            if verdict is not None:
                return Reason("incompatible", verdict)
    return None
