"""Cache management behind ``ctxcache verify / prune / explain``: full integrity checks, pruning, and
the answer to "would this load hit, and if not, what changed?".

Policy lives here, storage in ``_store``: these functions only decide *which* entries to check, drop or
compare, and call the store to do it. Nothing here prints; the CLI renders the returned objects.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import onnxruntime as ort

from . import _fingerprint, providers
from ._loader import ModelArg, ProvidersArg, Reason, _model_arg, context_target, resolve_providers
from ._store import BrokenEntry, Entry

if TYPE_CHECKING:
    from ._cache import ContextCache

log = logging.getLogger("ctxcache")

# Key parts that describe the machine and its software, not the model or the app's choices.
ENV_PARTS = ("format", "onnxruntime", "ep_versions", "ep_libraries", "devices", "host")
# The ones that say for sure an entry was built for software this machine does not run. ep_libraries
# and devices are left out on purpose: the manifest keeps the backend *type*, not the app's
# backend_path, so an app with a side-loaded SDK would look foreign here while its entries still hit.
# Removing a usable entry costs a compile at the next launch; keeping a dead one costs only disk,
# which --max-size / --older-than reclaim.
STALE_PARTS = ("format", "onnxruntime", "ep_versions", "host")


# -- shared helpers ---------------------------------------------------------------------------------
def _dead_markers(cache: ContextCache, key: str) -> bool:
    """Whether a process died while loading ``key`` (like ``Store.poisoned``, but leaves the markers).

    ``verify`` without ``--fix`` must only report; consuming the marker would turn the next launch's
    crash protection off.
    """
    prefix = key + "."
    try:
        names = [n for n in os.listdir(cache.store.markers_dir) if n.startswith(prefix)]
    except OSError:
        return False
    # The store's rule, not a pid check: a marker's flock tells a dead loader from a reused pid.
    return any(cache.store._dead_marker(name) for name in names)


def _quarantine(cache: ContextCache, key: str, entry: Entry | None, reason: Reason) -> bool:
    """Quarantine under the key's lock when it is free (a compiler holding it may be replacing the entry)."""
    from ._locking import release, try_lock

    handle = try_lock(cache.store.lock_path(key))
    if handle is None:
        return False
    try:
        return cache.store.quarantine(key, reason.code, reason.message, expect_id=entry.entry_id if entry else None)
    finally:
        release(handle)


def _remove(cache: ContextCache, key: str) -> bool:
    from ._locking import release, try_lock

    handle = try_lock(cache.store.lock_path(key))
    if handle is None:
        log.info("entry %s is being rebuilt by another process; not removing it", key[:12])
        return False
    try:
        return cache.store.remove(key)
    finally:
        release(handle)


def environment(cache: ContextCache, ep_name: str, options: Mapping[str, Any]) -> dict[str, Any] | str:
    """This machine's environment key parts for ``ep_name`` with ``options`` (``ENV_PARTS``).

    Returns a string instead when the provider cannot run here (its entries cannot be hit here).
    """
    try:
        ep = providers.get(ep_name)
        opts = ep.normalize_options(options)
    except Exception as e:  # noqa: BLE001 - an option this version refuses, a provider ORT does not know
        return f"{ep_name} cannot be configured here ({e})"
    why = ep.unavailable_reason()
    if why is not None:
        return why
    env = dict(cache._loader._env(ep, opts))
    env["format"] = _fingerprint.FORMAT_VERSION
    return {label: env[label] for label in ENV_PARTS}


def _env_mismatch(cache: ContextCache, parts: dict[str, Any], memo: dict[str, dict[str, Any] | str]) -> str | None:
    """Why an entry with ``parts`` cannot be hit on this machine, or ``None`` when it can."""
    ep_name = parts.get("ep")
    options = parts.get("ep_options")
    if not isinstance(ep_name, str) or not isinstance(options, dict):
        return "the entry's key parts are incomplete"
    memo_key = ep_name + _fingerprint.canonical_json(options)
    here = memo.get(memo_key)
    if here is None:
        here = memo[memo_key] = environment(cache, ep_name, options)
    if isinstance(here, str):
        return here
    diffs = _fingerprint.diff({k: parts.get(k) for k in STALE_PARTS}, {k: here[k] for k in STALE_PARTS})
    if not diffs:
        return None
    return "; ".join(_render(d) for d in diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")


def _render(d: tuple[str, Any, Any]) -> str:
    path, old, new = d
    label = "model content" if path == "model" else path  # the part is a digest of the bytes, not a name
    return f"{label} {_fingerprint.short(old)} -> {_fingerprint.short(new)}"


# -- verify -----------------------------------------------------------------------------------------
@dataclass
class VerifyResult:
    """One entry's full integrity check. ``problem`` is ``None`` when every digest matched."""

    key: str
    model_name: str
    provider: str
    size: int
    problem: Reason | None = None
    quarantined: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model_name,
            "provider": self.provider,
            "size": self.size,
            "ok": self.ok,
            "code": self.problem.code if self.problem else None,
            "message": self.problem.message if self.problem else None,
            "quarantined": self.quarantined,
        }


def verify(cache: ContextCache, *, fix: bool = False) -> list[VerifyResult]:
    """Re-hash every artifact of every entry; with ``fix``, quarantine what fails (kept for a post-mortem)."""
    out: list[VerifyResult] = []
    for item in cache.store.iter_entries():
        entry: Entry | None
        if isinstance(item, Entry):
            entry = item
            model = entry.manifest.get("model")
            name = str(model.get("name", "?")) if isinstance(model, dict) else "?"
            res = VerifyResult(entry.key, name, str(entry.manifest.get("provider", "?")), entry.size)
            problem = cache.store.verify(entry, full=True)
            if problem is not None:
                res.problem = Reason(*problem)
            elif _dead_markers(cache, entry.key):
                res.problem = Reason("crashed_during_load", "a process died while loading this context")
        else:
            key, err = item
            entry = None
            res = VerifyResult(key, "?", "?", 0, Reason(err.code, err.message))
        if res.problem is not None and fix:
            res.quarantined = _quarantine(cache, res.key, entry, res.problem)
            if res.quarantined and res.problem.code == "crashed_during_load":
                cache.store.poisoned(res.key)  # the entry is gone; its markers would only mislead
        out.append(res)
    if fix:
        cache.store.clean_staging()
    return out


# -- prune ------------------------------------------------------------------------------------------
PruneWhy = Literal["broken", "other_environment", "older_than", "over_size"]


@dataclass
class PruneItem:
    key: str
    model_name: str
    provider: str
    size: int
    last_used: float
    why: PruneWhy
    detail: str
    removed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model_name,
            "provider": self.provider,
            "size": self.size,
            "last_used": self.last_used,
            "why": self.why,
            "detail": self.detail,
            "removed": self.removed,
        }


@dataclass
class PruneReport:
    items: list[PruneItem] = field(default_factory=list)
    dry_run: bool = False
    size_before: int = 0

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.items if i.removed or self.dry_run)

    @property
    def size_after(self) -> int:
        return self.size_before - self.freed

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "size_before": self.size_before,
            "freed": self.freed,
            "size_after": self.size_after,
            "items": [i.as_dict() for i in self.items],
        }


def plan_prune(
    cache: ContextCache,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    other_environments: bool = True,
    keep: Collection[str] = (),
) -> tuple[list[PruneItem], int]:
    """What :func:`prune` would remove, in order, and the cache size before.

    Order: damaged entries; entries built for another environment (another onnxruntime, EP or SDK
    version, another OS or architecture, or a provider that cannot run here: their keys cannot come up
    on this machine); entries unused
    for ``older_than`` seconds; then least recently used until the rest fits in ``max_size``, entries of
    other environments first. ``other_environments=False`` keeps those unless a limit needs the room
    (for a cache folder shared by apps on different onnxruntime versions).
    """
    from ._cache import EntryInfo

    infos = cache.entries(include_broken=True)
    size_before = sum(i.size for i in infos)
    memo: dict[str, dict[str, Any] | str] = {}
    now = time.time()
    chosen: list[PruneItem] = []
    taken: set[str] = set()

    def take(info: EntryInfo, why: PruneWhy, detail: str) -> None:
        chosen.append(PruneItem(info.key, info.model_name, info.provider, info.size, info.last_used, why, detail))
        taken.add(info.key)

    stale: dict[str, str] = {}
    for info in infos:
        if info.key in keep:
            continue
        if info.broken is not None:
            if "newer ctxcache" not in info.broken:  # a newer version's entry is not ours to judge
                take(info, "broken", info.broken)
            continue
        why = _env_mismatch(cache, info.parts, memo)
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
        # Entries of other environments go first (nothing here can use them), then plain LRU.
        order = sorted(
            (i for i in infos if i.key not in taken and i.key not in keep and i.broken is None),
            key=lambda i: (i.key not in stale, i.last_used),
        )
        for info in order:
            if total <= max_size:
                break
            detail = "built for another environment: " + stale[info.key] if info.key in stale else "least recently used"
            take(info, "over_size", detail)
            total -= info.size
    return chosen, size_before


def prune(
    cache: ContextCache,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    other_environments: bool = True,
    dry_run: bool = False,
    keep: Collection[str] = (),
) -> PruneReport:
    """Remove what :func:`plan_prune` picks (nothing with ``dry_run``). An entry being rebuilt is skipped."""
    if max_size is not None and max_size < 0:
        raise ValueError("max_size must be >= 0")
    if older_than is not None and older_than < 0:
        raise ValueError("older_than must be >= 0 seconds")
    items, size_before = plan_prune(
        cache, max_size=max_size, older_than=older_than, other_environments=other_environments, keep=keep
    )
    report = PruneReport(items, dry_run, size_before)
    if dry_run:
        return report
    for item in items:
        item.removed = _remove(cache, item.key)
        if item.removed:
            log.info("pruned %s (%s): %s", item.key[:12], item.model_name, item.detail)
    return report


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# -- explain ----------------------------------------------------------------------------------------
Verdict = Literal["hit", "miss", "fallback", "bypass"]


@dataclass
class Difference:
    """One key part that differs between an existing entry (``old``) and this load (``new``)."""

    part: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return _render((self.part, self.old, self.new))

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "old": self.old, "new": self.new, "text": str(self)}


@dataclass
class Nearest:
    """An existing entry of the same model and how its key differs from the one a load would use."""

    key: str
    model_name: str
    created: float
    last_used: float
    same_content: bool
    differences: list[Difference]

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model_name,
            "created": self.created,
            "last_used": self.last_used,
            "same_content": self.same_content,
            "differences": [d.as_dict() for d in self.differences],
        }


@dataclass
class Explanation:
    """What :meth:`ContextCache.explain` answers: would a load hit, and if not, why."""

    model: str
    verdict: Verdict
    key: str | None = None
    model_digest: str | None = None
    reason: Reason | None = None
    nearest: list[Nearest] = field(default_factory=list)
    other_entries: int = 0  # entries of other models (not compared)

    @property
    def hit(self) -> bool:
        return self.verdict == "hit"

    def summary(self) -> str:
        """One line: the verdict and its main cause."""
        if self.verdict == "hit":
            return f"hit: entry {self.key[:12] if self.key else '?'} is intact and would load"
        if self.reason is not None:
            return f"{self.verdict}: {self.reason}"
        if not self.nearest:
            return "miss: no entry of this model in the cache"
        top = self.nearest[0]
        return f"miss: differs from entry {top.key[:12]} in " + ", ".join(str(d) for d in top.differences)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "verdict": self.verdict,
            "hit": self.hit,
            "key": self.key,
            "model_digest": self.model_digest,
            "reason": {"code": self.reason.code, "message": self.reason.message} if self.reason else None,
            "summary": self.summary(),
            "nearest": [n.as_dict() for n in self.nearest],
            "other_entries": self.other_entries,
        }


def explain(
    cache: ContextCache,
    model: ModelArg,
    *,
    providers: ProvidersArg,
    provider_options: Sequence[Mapping[str, Any]] | None = None,
    sess_options: ort.SessionOptions | None = None,
    limit: int = 3,
) -> Explanation:
    """Would ``cache.load(model, providers=...)`` hit? If not, which key parts differ from the nearest
    entries of the same model (same content first, then same file name).

    Read-only: nothing is compiled, loaded, invalidated or counted. Raises the same input errors as
    :meth:`ContextCache.load`.
    """
    m = _model_arg(model)
    chain = resolve_providers(providers, provider_options)
    no_context = context_target(chain)  # as the loader decides
    if no_context is not None:
        return Explanation(m.name, "bypass", reason=no_context)
    ep, options = chain[0]
    digest = cache._loader.digest(m).digest
    fp = cache._loader.fingerprint(digest, ep, options, sess_options)
    key = fp.key
    ex = Explanation(m.name, "miss", key=key, model_digest=digest)

    failed = cache.store.failure(key, cache.negative_ttl)
    if failed is not None:
        # Same codes as the loader gives this bypass.
        code = "crashed_during_load" if failed.get("code") == "crashed_during_load" else "not_compilable"
        ex.verdict, ex.reason = "bypass", Reason(code, f"remembered: {failed.get('message', '')}")
        return ex
    try:
        entry = cache.store.lookup(key)
    except BrokenEntry as b:
        ex.verdict, ex.reason = "fallback", Reason(b.code, b.message)
        return ex
    if entry is not None:
        problem = cache.store.verify(entry, full=cache.verify == "full")
        if problem is not None:
            ex.verdict, ex.reason = "fallback", Reason(*problem)
        elif _dead_markers(cache, key):
            ex.verdict, ex.reason = "fallback", Reason("crashed_during_load", "a process died while loading this context")
        else:
            ex.verdict = "hit"
        return ex

    here = fp.as_dict()
    candidates: list[Nearest] = []
    for info in cache.entries():
        same_content = info.parts.get("model") == digest
        if not same_content and info.model_name != m.name:
            ex.other_entries += 1
            continue
        diffs = [Difference(*d) for d in _fingerprint.diff(info.parts, here)]
        candidates.append(Nearest(info.key, info.model_name, info.created, info.last_used, same_content, diffs))
    # Same content before same name; then the fewest differing parts; then the most recent.
    candidates.sort(key=lambda n: (not n.same_content, len(n.differences), -n.last_used))
    ex.nearest = candidates[:limit]
    return ex


def forget_failure(cache: ContextCache, key: str) -> None:
    """Drop the remembered compile failure of ``key`` (``ctxcache warm`` retries what it is asked to)."""
    try:
        os.unlink(cache.store.negative_dir / f"{key}.json")
    except OSError:
        pass
