"""Removing chosen entries (``ctxcache rm``): a plan of exactly those entries, executed like a prune's.

The plan is a :class:`~ctxcache.PrunePlan`, so what is shown (``--dry-run``) is what is removed, and an
entry replaced since it was listed (another ``entry_id``) or being rebuilt (its lock held) is left
alone and reported as not removed, as for a prune.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._cache import ContextCache, store_of
from ._manage import EntryInfo
from ._prune import PruneItem, PrunePlan


def plan_remove(cache: ContextCache, entries: Sequence[EntryInfo]) -> PrunePlan:
    """The plan that removes ``entries`` (as :meth:`ContextCache.entries` / :meth:`~ContextCache.select`
    listed them) and nothing else; ``plan.execute()`` runs it."""
    seen: set[str] = set()
    items = []
    for e in entries:
        if e.key in seen:
            continue
        seen.add(e.key)
        items.append(PruneItem(e.key, e.model_name, e.provider, e.size, e.last_used, "requested", "asked for",
                               e.entry_id or None))
    return PrunePlan(tuple(items), cache.size(), store_of(cache))
