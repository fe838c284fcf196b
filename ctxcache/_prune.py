"""Pruning as a plan: what would be removed and why (junk, broken entries, entries of other environments,
unused ones, least recently used over a size cap), then ``execute()`` removes exactly that plan.

The cache's own cap (``max_size``) runs this after each publish, out of the key's lock, in the app or in
its background worker alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _key
from ._config import DEFAULT_NEGATIVE_TTL
from ._housekeeping import Junk
from ._manage import EntryInfo, entries, env_mismatch
from ._manifest import shown
from ._store import Store

log = logging.getLogger("ctxcache")

PruneWhy = Literal["junk", "broken", "other_environment", "older_than", "over_size", "requested"]


@dataclass(frozen=True)
class PruneItem:
    """One thing a prune removes: an entry (``key``), or junk (``why == "junk"``: a quarantined copy,
    a dead compile's staging folder, a stale memo, lock or marker; ``key`` is its path in the cache)."""

    key: str
    model_name: str
    provider: str
    size: int
    last_used: float
    why: PruneWhy
    detail: str
    entry_id: str | None = None
    junk_kind: str | None = None

    def as_dict(self, removed: bool | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "model": self.model_name, "provider": self.provider, "size": self.size,
                             "last_used": self.last_used, "why": self.why, "detail": self.detail}
        if removed is not None:
            d["removed"] = removed
        return d


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`PrunePlan.execute` did: each planned item and whether it went."""

    items: tuple[PruneItem, ...]
    removed: tuple[str, ...]
    size_before: int
    dry_run: bool = False

    @property
    def freed(self) -> int:
        gone = set(self.removed)
        return sum(i.size for i in self.items if i.key in gone or self.dry_run)

    @property
    def size_after(self) -> int:
        return self.size_before - self.freed

    @property
    def failed(self) -> tuple[PruneItem, ...]:
        """Planned items that could not be removed (being rebuilt, replaced since the plan, refused by the OS)."""
        gone = set(self.removed)
        return () if self.dry_run else tuple(i for i in self.items if i.key not in gone)

    def as_dict(self) -> dict[str, Any]:
        gone = set(self.removed)
        return {"dry_run": self.dry_run, "size_before": self.size_before, "freed": self.freed,
                "size_after": self.size_after, "failed": len(self.failed),
                "items": [i.as_dict(None if self.dry_run else i.key in gone) for i in self.items]}


@dataclass(frozen=True)
class PrunePlan:
    """What a prune would remove, in order. Show it, then :meth:`execute` exactly this plan."""

    items: tuple[PruneItem, ...]
    size_before: int
    _store: Store = field(repr=False, compare=False)

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items)

    def report(self) -> PruneReport:
        """The plan as a report, removing nothing (``--dry-run``)."""
        return PruneReport(self.items, (), self.size_before, dry_run=True)

    def execute(self) -> PruneReport:
        """Remove the planned entries, and only those: one replaced since the plan (another entry_id) or
        being rebuilt (its lock is held) is left, and reported in :attr:`PruneReport.failed`."""
        removed = []
        for item in self.items:
            if item.junk_kind is not None:
                path = self._store.base / item.key
                gone = self._store.remove_junk(Junk(item.junk_kind, path, item.size, item.last_used))
            else:
                gone = self._store.evict(item.key, "pruned", item.detail, expect_id=item.entry_id, keep=False)
            if gone:
                removed.append(item.key)
                log.info("pruned %s (%s): %s", item.key[:44], shown(item.model_name), item.detail)
        return PruneReport(self.items, tuple(removed), self.size_before)


_JUNK = {
    "quarantined": "a quarantined copy of a broken entry (kept for a post-mortem)",
    "hidden": "an entry removed while another process held its files (Windows): deleted once they are free",
    "staging": "the staging folder of a compile that is over",
    "memo": "a hash memo of a file that no longer exists",
    "lock": "the lock of a key without an entry",
    "marker": "a crash marker or death note of a key without an entry",
    "negative": "an expired failure record",
    "side": "a provider's own cache (OpenVINO blobs, TensorRT engines) of a key without an entry",
}


def plan_prune(store: Store, env: _key.Environment, *, max_size: int | None = None, older_than: float | None = None,
               other_environments: bool = True, keep: Collection[str] = (),
               negative_ttl: float = DEFAULT_NEGATIVE_TTL) -> PrunePlan:
    """What a prune removes, in order: damaged entries; entries built for another environment (another
    onnxruntime, EP or SDK version, another OS or architecture, or a provider that cannot run here:
    their keys cannot come up on this machine); entries unused for ``older_than`` seconds; then least
    recently used until the rest fits in ``max_size``, entries of other environments first. Before all
    of them the junk (:meth:`Store.junk`): ``max_size`` bounds everything the cache keeps.
    ``other_environments=False`` keeps those unless a limit needs the room (a cache folder shared by
    apps on different onnxruntime versions)."""
    if max_size is not None and max_size < 0:
        raise ValueError("max_size must be >= 0")
    if older_than is not None and older_than < 0:
        raise ValueError("older_than must be >= 0 seconds")
    infos = entries(store, include_broken=True)
    junk = store.junk(negative_ttl=negative_ttl)
    size_before = sum(i.size for i in infos) + sum(j.size for j in junk)
    memo: dict[str, dict[str, Any] | str] = {}
    now = time.time()
    # Junk first: nothing loads from it, and it is what an unbounded cache used to grow by.
    chosen: list[PruneItem] = [
        PruneItem(str(j.path.relative_to(store.base)), "-", "-", j.size, j.mtime, "junk", _JUNK[j.kind], None, j.kind)
        for j in junk
    ]
    taken: set[str] = set()

    def take(info: EntryInfo, why: PruneWhy, detail: str) -> None:
        chosen.append(PruneItem(info.key, info.model_name, info.provider, info.size, info.last_used, why, detail,
                                info.entry_id or None))
        taken.add(info.key)

    stale: dict[str, str] = {}
    for info in infos:
        if info.key in keep:
            continue
        if info.broken is not None:
            if "newer ctxcache" not in info.broken:  # a newer version's entry is not ours to judge
                take(info, "broken", info.broken)
            continue
        why = env_mismatch(env, info.parts, memo)
        if why is not None:
            stale[info.key] = why
    if other_environments:
        for info in sorted(infos, key=lambda i: i.last_used):
            if info.key in stale and info.key not in taken:
                take(info, "other_environment", stale[info.key])
    if older_than is not None:
        for info in sorted(infos, key=lambda i: i.last_used):
            if info.key not in taken and info.key not in keep and info.broken is None and now - info.last_used > older_than:
                take(info, "older_than", f"last used {_age(now - info.last_used)} ago")
    if max_size is not None:
        total = size_before - sum(i.size for i in chosen)
        order = sorted((i for i in infos if i.key not in taken and i.key not in keep and i.broken is None),
                       key=lambda i: (i.key not in stale, i.last_used))
        for info in order:
            if total <= max_size:
                break
            detail = "built for another environment: " + stale[info.key] if info.key in stale else "least recently used"
            take(info, "over_size", detail)
            total -= info.size
    return PrunePlan(tuple(chosen), size_before, store)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
