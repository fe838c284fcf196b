"""Cache management: listing, full verification, pruning (plan, then execute that plan), explaining a
load, warming a model, selecting entries. Policy lives here, storage in ``_store``; nothing here prints
(the CLI renders the returned objects). Every "would this be served" question is asked of
``_servable.entry_problem`` and ``_negative.remembered``, exactly as the loader asks them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnxruntime as ort

from . import _fingerprint, _key, _markers, _negative, _stats, providers
from ._inputs import ProvidersArg, cache_blocker, context_target, resolve_model, resolve_providers
from ._loader import Loader, Request
from ._manifest import Entry
from ._servable import judge
from ._store import BrokenEntry, Junk, Store
from ._trust import Trust
from ._types import ModelArg, Reason

if TYPE_CHECKING:
    from .tiers import Tier

log = logging.getLogger("ctxcache")


@dataclass(frozen=True)
class ProviderCheck:
    """One provider configuration as ctxcache reads it: the canonical name, the options normalised,
    the ones that shape the compiled binary (what the key records), and whether it can compile here."""

    name: str
    options: dict[str, str]
    binary_options: dict[str, str]
    compiles: bool
    unavailable: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "binary_options": self.binary_options,
                "compiles": self.compiles, "unavailable": self.unavailable}


def check_providers(providers_arg: ProvidersArg,
                    provider_options: Sequence[Mapping[str, Any]] | None = None) -> list[ProviderCheck]:
    """Check a ``providers=`` list without loading anything: raises the errors a load would raise for it
    (:class:`~ctxcache.errors.UnknownProviderError`, :class:`~ctxcache.errors.ProviderOptionError`)."""
    return [ProviderCheck(ep.name, opts, ep.binary_options(opts), ep.compiles, ep.unavailable_reason() if ep.compiles else None)
            for ep, opts in resolve_providers(providers_arg, provider_options)]


def known_providers() -> list[str]:
    """Every provider name this onnxruntime (and ctxcache) knows, for suggestions and ``doctor``."""
    return providers.known_names()


# -- listing --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntryInfo:
    """One cached context, as :meth:`ContextCache.entries` lists it."""

    key: str
    path: Path
    model_name: str
    provider: str
    size: int
    created: float
    last_used: float
    compile_seconds: float
    parts: dict[str, Any] = field(default_factory=dict)
    hits: int = 0
    #: why the entry is unusable, if it is
    broken: str | None = None
    #: where a tier-filled entry came from (``{"tier": "bundle", "location": ...}``), else ``None``
    origin: dict[str, Any] | None = None
    entry_id: str = ""
    #: bytes of the providers' own caches kept for this key (``Store.side_dir``), included in ``size``
    side_size: int = 0

    @classmethod
    def of(cls, entry: Entry, hits: int = 0) -> EntryInfo:
        return cls(entry.key, entry.path, entry.model_name, entry.provider, entry.size, entry.created,
                   entry.last_used(), entry.compile_seconds, entry.parts, hits, None, entry.origin, entry.entry_id)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model_name, "provider": self.provider, "size": self.size,
                "created": self.created, "last_used": self.last_used, "hits": self.hits,
                "compile_seconds": self.compile_seconds, "broken": self.broken,
                "ep_options": self.parts.get("ep_options"), "path": str(self.path), "origin": self.origin,
                "side_size": self.side_size}


def entries(store: Store, *, include_broken: bool = False) -> list[EntryInfo]:
    """Every committed entry, with hit counts from the stats log; newest use first."""
    hits = _stats.summarize(store.events_path).per_key_hits
    out: list[EntryInfo] = []
    for item in store.iter_entries():
        if isinstance(item, Entry):
            info = EntryInfo.of(item, hits.get(item.key, 0))
            side = store.side_size(item.key)  # a provider's own cache kept for this key counts as the entry's
            out.append(replace(info, size=info.size + side, side_size=side) if side else info)
        elif include_broken:
            key, err = item
            out.append(EntryInfo(key, store.entry_path(key), "?", "?", 0, 0.0, 0.0, 0.0, broken=f"{err.code}: {err.message}"))
    out.sort(key=lambda e: e.last_used, reverse=True)
    return out


def select(store: Store, *, digests: Collection[str] | None = None, provider: str | None = None,
           options: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None) -> list[Entry]:
    """Committed entries selected by model digest(s), provider name, a subset of binary options and/or
    key prefixes; every filter given must match."""
    want = {str(k): str(v) for k, v in (options or {}).items()}
    out = []
    for item in store.iter_entries():
        if not isinstance(item, Entry):
            continue
        parts = item.parts
        if digests is not None and parts.get("model") not in digests:
            continue
        if provider is not None and parts.get("ep") != provider:
            continue
        raw = parts.get("ep_options")
        ep_opts: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if any(str(ep_opts.get(k)) != v for k, v in want.items()):
            continue
        if keys is not None and not any(item.key.startswith(k) for k in keys):
            continue
        out.append(item)
    return out


def keys_for_invalidate(store: Store, key: str) -> list[str]:
    """The one entry a key or key prefix names. A prefix must be at least 4 hex digits and match one
    entry: ``invalidate(key="")`` once quarantined every entry."""
    text = key.strip().lower()
    if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"key must be an entry key or a prefix of at least 4 hex digits, not {key!r}")
    found = [k for k in store.list_keys() if k.startswith(text)]
    if len(found) > 1:
        raise ValueError(f"key prefix {key!r} matches {len(found)} entries ({', '.join(k[:12] for k in found[:5])}); "
                         "give more digits")
    return found


# -- environment -----------------------------------------------------------------------------------------
def environment(env: _key.Environment, ep_name: str, options: Mapping[str, Any]) -> dict[str, Any] | str:
    """The machine-side key parts for a provider configuration here, or why the provider cannot run here."""
    try:
        ep = providers.get(ep_name)
        opts = ep.normalize_options(options)
    except Exception as e:  # noqa: BLE001 - an option this version refuses, a provider ORT does not know
        return f"{ep_name} cannot be configured here ({e})"
    why = ep.unavailable_reason()
    if why is not None:
        return why
    return {label: env.parts(ep, opts)[label] for label in _key.ENV_PARTS}


def env_mismatch(env: _key.Environment, parts: Mapping[str, Any], memo: dict[str, dict[str, Any] | str]) -> str | None:
    """Why an entry with ``parts`` cannot be hit on this machine, or ``None`` when it can."""
    ep_name = parts.get("ep")
    options = parts.get("ep_options")
    if not isinstance(ep_name, str) or not isinstance(options, dict):
        return "the entry's key parts are incomplete"
    memo_key = ep_name + _fingerprint.canonical_json(options)
    here = memo.get(memo_key)
    if here is None:
        here = memo[memo_key] = environment(env, ep_name, options)
    if isinstance(here, str):
        return here
    diffs = _key.stale_parts(parts, here)
    if not diffs:
        return None
    return "; ".join(_key.render(d) for d in diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")


# -- verify ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    """One entry's full integrity check. ``problem`` is ``None`` when every digest matched."""

    key: str
    model_name: str
    provider: str
    size: int
    problem: Reason | None = None
    quarantined: bool = False
    #: the provider's verdict here (``optimal: ...``, ``unknown: ...``)
    compatibility: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model_name, "provider": self.provider, "size": self.size, "ok": self.ok,
                "code": self.problem.code if self.problem else None,
                "message": self.problem.message if self.problem else None, "quarantined": self.quarantined,
                "compatibility": self.compatibility}


def verify(store: Store, env: _key.Environment, *, fix: bool = False) -> list[VerifyResult]:
    """Re-hash every artifact of every entry (and check for dead loaders and the provider's verdict);
    with ``fix``, quarantine what fails (kept for a post-mortem)."""
    out: list[VerifyResult] = []
    for item in store.iter_entries():
        if isinstance(item, Entry):
            ep = _provider_or_none(item.provider)
            raw = item.parts.get("ep_options")
            # The binary options the key recorded (QNN's backend_type turns back into the wheel's library).
            options = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
            problem, answer, detail = judge(store, item, ep, digests="all", options=options,
                                            env=_env_digest(env, ep, options))
            compatibility: str | None = f"{answer}: {detail}"
            key, name, prov, size, eid = item.key, item.model_name, item.provider, item.size, item.entry_id
        else:
            key, err = item
            problem, name, prov, size, eid = Reason(err.code, err.message), "?", "?", 0, None
            compatibility = None
        quarantined = False
        if problem is not None and fix:
            quarantined = store.evict(key, problem.code, problem.message, expect_id=eid)
            if quarantined and problem.code == "crashed_during_load":
                # The entry is gone; its markers would only mislead.
                _markers.consume(store.markers_dir, _markers.dead_markers(store.markers_dir, key))
        out.append(VerifyResult(key, name, prov, size, problem, quarantined, compatibility))
    if fix:
        store.clean_staging()
    return out


def _env_digest(env: _key.Environment, ep: Any, options: dict[str, str]) -> str:
    if ep is None:
        return ""
    try:
        return env.digest(ep, ep.normalize_options(options))
    except Exception:  # noqa: BLE001 - options this version refuses: the verdict is asked unremembered
        return ""


def entry_verdicts(store: Store, env: _key.Environment, infos: Sequence[EntryInfo]) -> dict[str, str]:
    """key -> the provider's verdict on each entry here (``ls --format json``, ``doctor``)."""
    from ._servable import verdict

    out: dict[str, str] = {}
    for info in infos:
        if info.broken is not None:
            continue
        ep = _provider_or_none(info.provider)
        try:
            entry = store.lookup(info.key)
        except BrokenEntry:
            continue
        if entry is None or ep is None:
            continue
        raw = info.parts.get("ep_options")
        options = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        answer, detail = verdict(store, entry, ep, _env_digest(env, ep, options))
        out[info.key] = f"{answer}: {detail}"
    return out


def _provider_or_none(name: str) -> Any:
    try:
        return providers.get(name)
    except Exception:  # noqa: BLE001 - an entry of a provider this onnxruntime does not know
        return None


# -- prune -----------------------------------------------------------------------------------------------
PruneWhy = Literal["junk", "broken", "other_environment", "older_than", "over_size"]


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
                log.info("pruned %s (%s): %s", item.key[:44], item.model_name, item.detail)
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
               other_environments: bool = True, keep: Collection[str] = (), negative_ttl: float = 7 * 24 * 3600.0) -> PrunePlan:
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


# -- explain -----------------------------------------------------------------------------------------------
Verdict = Literal["hit", "miss", "fallback", "bypass"]


@dataclass(frozen=True)
class Difference:
    """One key part that differs between an existing entry (``old``) and this load (``new``)."""

    part: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return _key.render((self.part, self.old, self.new))

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "old": self.old, "new": self.new, "text": str(self)}


@dataclass(frozen=True)
class Nearest:
    """An existing entry of the same model and how its key differs from the one a load would use."""

    key: str
    model_name: str
    created: float
    last_used: float
    same_content: bool
    differences: tuple[Difference, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model_name, "created": self.created, "last_used": self.last_used,
                "same_content": self.same_content, "differences": [d.as_dict() for d in self.differences]}


@dataclass(frozen=True)
class TierAnswer:
    """What one tier holds for the key a load would use, who signed it and whether a load would admit it
    (read-only: the index or record and its signatures are read, no entry file is fetched)."""

    tier: str
    kind: str
    match: str
    #: ``"exact"``, ``"portable"`` (built on another host), ``None``, or ``"error: <why>"``
    has: str | None
    would_serve: bool = False
    #: whether this tier's entries need a valid signature from a trusted key (``signature_required``)
    signature_required: bool = True
    #: the Ed25519 key id that signed the entry (for a bundle without a key: the whole index), if any
    signed_by: str | None = None
    #: ``"trusted"``, ``"invalid"``, ``"revoked"``, ``"untrusted"``, ``"hmac"``, ``"unsigned"``; ``None``: not read
    signature: str | None = None
    #: why a load would refuse the entry it holds (``"tier_untrusted: ..."``), else ``None``
    refused: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "kind": self.kind, "match": self.match, "has": self.has, "would_serve": self.would_serve,
                "signature_required": self.signature_required, "signed_by": self.signed_by, "signature": self.signature,
                "trusted": self.signature == "trusted" if self.signature is not None else None, "refused": self.refused}


@dataclass(frozen=True)
class Explanation:
    """What :meth:`ContextCache.explain` answers: would a load hit, and if not, why."""

    model: str
    verdict: Verdict
    key: str | None = None
    model_digest: str | None = None
    reason: Reason | None = None
    nearest: tuple[Nearest, ...] = ()
    other_entries: int = 0  # entries of other models (not compared)
    tiers: tuple[TierAnswer, ...] = ()
    #: the provider's verdict on the entry a load would use (``optimal: ...``, ``unknown: ...``), if one exists
    compatibility: str | None = None
    #: the provider's own caches a load would keep for this key: ``{"folder", "caches", "size"}``, else ``None``
    side_cache: dict[str, Any] | None = None

    @property
    def hit(self) -> bool:
        """The local cache holds an entry that a load would serve."""
        return self.verdict == "hit"

    @property
    def served_by(self) -> TierAnswer | None:
        """On a local miss, the tier a load would fill the entry from (``LoadResult.tier``)."""
        return next((t for t in self.tiers if t.would_serve), None)

    @property
    def would_hit(self) -> bool:
        """The application would get a context session without compiling (locally or from a tier)."""
        return self.hit or self.served_by is not None

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
        served = self.served_by
        return {"model": self.model, "verdict": self.verdict, "hit": self.hit, "would_hit": self.would_hit,
                "key": self.key, "model_digest": self.model_digest,
                "reason": {"code": self.reason.code, "message": self.reason.message} if self.reason else None,
                "summary": self.summary(), "nearest": [n.as_dict() for n in self.nearest],
                "other_entries": self.other_entries, "tiers": [t.as_dict() for t in self.tiers],
                "compatibility": self.compatibility, "side_cache": self.side_cache,
                "served_by_tier": served.tier if served else None}


def explain(loader: Loader, tiers: Sequence[Tier], model: ModelArg, *, providers: ProvidersArg,
            provider_options: Sequence[Mapping[str, Any]] | None = None,
            sess_options: ort.SessionOptions | None = None, limit: int = 3) -> Explanation:
    """Would ``load(model, providers=...)`` hit? If not, which key parts differ from the nearest entries
    of the same model (same content first, then same file name), and which tier would serve it.

    Read-only: nothing is compiled, loaded, invalidated, fetched or counted. Raises the same input
    errors as a load, and asks the same rules in the same order.
    """
    store = loader.store
    req = Request(resolve_model(model), resolve_providers(providers, provider_options), sess_options)
    no_context = context_target(req.chain) or cache_blocker(req.model, sess_options, {})
    if no_context is not None:
        return Explanation(req.model.name, "bypass", reason=no_context)
    req.digest = req.model.digest(store.memo_dir)
    req.fingerprint = loader.fingerprint(req)
    key, digest = req.fingerprint.key, req.digest.digest
    layout = req.ep.side_cache_layout(req.options)
    side = {"folder": str(store.side_dir(key)), "caches": layout, "size": store.side_size(key)} if layout else None
    remembered = _negative.remembered(store.negative_dir, key, loader.settings.negative_ttl)
    if remembered is not None:
        return Explanation(req.model.name, "bypass", key, digest, remembered, side_cache=side)
    try:
        entry = store.lookup(key)
    except BrokenEntry as b:
        return Explanation(req.model.name, "fallback", key, digest, Reason(b.code, b.message), side_cache=side)
    if entry is not None:
        problem, answer, detail = judge(store, entry, req.ep, digests="all" if loader.settings.verify == "content" else "changed",
                                        options=req.options, env=loader.env.digest(req.ep, req.options))
        if problem is not None and problem.code == "incompatible":
            # As the load: never loaded, rebuilt at once (or fetched from a tier).
            return Explanation(req.model.name, "miss", key, digest, problem, compatibility=f"{answer}: {detail}",
                               side_cache=side)
        return Explanation(req.model.name, "fallback" if problem else "hit", key, digest, problem,
                           compatibility=f"{answer}: {detail}", side_cache=side)
    here = req.fingerprint.as_dict()
    candidates: list[Nearest] = []
    others = 0
    for info in entries(store):
        same_content = info.parts.get("model") == digest
        if not same_content and info.model_name != req.model.name:
            others += 1
            continue
        diffs = tuple(Difference(*d) for d in _fingerprint.diff(info.parts, here))
        candidates.append(Nearest(info.key, info.model_name, info.created, info.last_used, same_content, diffs))
    # Same content before same name; then the fewest differing parts; then the most recent.
    candidates.sort(key=lambda n: (not n.same_content, len(n.differences), -n.last_used))
    answers: tuple[TierAnswer, ...] = ()
    if tiers and not _negative.tiers_rejected(store.negative_dir, key, loader.settings.negative_ttl):
        answers = tier_report(tiers, req.fingerprint, loader.settings.trust)
    return Explanation(req.model.name, "miss", key, digest, None, tuple(candidates[:limit]), others, answers,
                       side_cache=side)


def tier_report(tiers: Sequence[Tier], fp: _fingerprint.Fingerprint | None = None,
                trust: Trust | None = None) -> tuple[TierAnswer, ...]:
    """Each tier in lookup order and, given the key a load would use, whether it holds it, who signed it,
    and whether it would be the one to serve it: the loader takes the first that has the entry (exactly,
    or built elsewhere where the tier accepts portable entries) *and admits it* (the same
    ``tiers._base.admit`` rule, with the same ``trust``). Without a key (``doctor``), a bundle's index
    signer. Never raises."""
    from .errors import TierError
    from .tiers._base import admit, signature_required

    trust = trust if trust is not None else Trust()
    out: list[TierAnswer] = []
    served = False
    for tier in tiers:
        has: str | None = None
        required = signature_required(tier, trust)
        signer: Any = None
        refused: str | None = None
        if fp is not None:
            try:
                has = tier.lookup(fp.key, fp.parts)
            except TierError as e:
                has = f"error: {e}"
            except Exception as e:  # noqa: BLE001 - a report never raises
                has = f"error: {type(e).__name__}: {e}"
        usable = has == "exact" or (has == "portable" and tier.match == "portable")
        if usable and fp is not None:
            try:
                with tier.offer(fp.key, fp.parts, trust=trust) as offer:
                    if offer is None:
                        usable = False
                    else:
                        signer = offer.signer
                        admit(signer, required, tier.describe(), trust)
            except TierError as e:
                refused, usable = str(e), False
            except Exception as e:  # noqa: BLE001 - a report never raises
                refused, usable = f"{type(e).__name__}: {e}", False
        elif fp is None and hasattr(tier, "index_signer"):
            try:
                signer = tier.index_signer(trust)
                admit(signer, required, tier.describe(), trust)
            except Exception as e:  # noqa: BLE001 - a report never raises
                refused = str(e)
        out.append(TierAnswer(tier.describe(), tier.kind, tier.match, has, usable and not served, required,
                              getattr(signer, "key_id", None), getattr(signer, "status", None), refused))
        served = served or usable
    return tuple(out)


# -- warm --------------------------------------------------------------------------------------------------
WarmStatus = Literal["compiled", "cached", "failed"]


@dataclass(frozen=True)
class WarmResult:
    """What :meth:`ContextCache.warm` did for one model and provider configuration."""

    model: str
    status: WarmStatus
    outcome: str | None
    key: str | None
    reason: str | None = None
    compile_seconds: float = 0.0
    seconds: float = 0.0
    #: a damaged entry that was replaced on the way, and why it was damaged
    replaced: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "status": self.status, "outcome": self.outcome, "key": self.key,
                "reason": self.reason, "compile_seconds": self.compile_seconds, "seconds": self.seconds,
                "replaced": self.replaced}


def warm(loader: Loader, tiers: Sequence[Tier], model: ModelArg, *, providers: ProvidersArg,
         provider_options: Sequence[Mapping[str, Any]] | None = None,
         sess_options: ort.SessionOptions | None = None) -> WarmResult:
    """Make sure ``model`` has an intact entry for ``providers`` (the one "make sure this is cached").

    Idempotent: an intact entry is left alone. A remembered ``not_compilable`` is retried (warm is an
    explicit request); a remembered ``context_unloadable`` or ``crashed_during_load`` is not: that
    context failed to load (or killed its loader) here, and compiling it again would only repeat it.
    Input errors raise; everything else is reported in the result.
    """
    start = time.perf_counter()
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<bytes>"
    ex = explain(loader, tiers, model, providers=providers, provider_options=provider_options, sess_options=sess_options)
    if ex.hit:
        return WarmResult(name, "cached", "hit", ex.key, seconds=time.perf_counter() - start)
    if ex.verdict == "bypass" and ex.reason is not None:
        if ex.reason.code == "not_compilable" and ex.key:
            _negative.forget(loader.store.negative_dir, ex.key)
        elif ex.reason.code != "not_compilable":
            return WarmResult(name, "failed", "bypass", ex.key, str(ex.reason), seconds=time.perf_counter() - start)
    r = loader.load(model, providers, provider_options, sess_options, warm=True)
    replaced = None
    if r.outcome == "fallback" and r.reason is not None and r.reason.code not in ("compile_failed", "publish_failed"):
        replaced = str(r.reason)  # a damaged entry was quarantined; build it afresh
        r = loader.load(model, providers, provider_options, sess_options, warm=True)
    status: WarmStatus = "compiled" if r.outcome == "miss" else "cached" if r.outcome == "hit" else "failed"
    reason = None if status != "failed" else (str(r.reason) if r.reason else r.outcome)
    return WarmResult(name, status, r.outcome, r.key, reason, r.timings.compile, time.perf_counter() - start, replaced)
