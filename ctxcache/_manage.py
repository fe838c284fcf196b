"""Cache management: listing, full verification, pruning (plan, then execute that plan), explaining a
load, warming a model, selecting entries. Policy lives here, storage in ``_store``; nothing here prints
(the CLI renders the returned objects). Every "would this be served" question is asked of
``_servable.entry_problem`` and ``_negative.remembered``, exactly as the loader asks them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _fingerprint, _key, _markers, _stats, providers
from ._inputs import ProvidersArg, resolve_providers
from ._manifest import Entry
from ._servable import judge
from ._store import BrokenEntry, Store
from ._trust import Trust
from ._types import Reason

if TYPE_CHECKING:
    pass

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


def verify(store: Store, env: _key.Environment, *, fix: bool = False, trust: Trust | None = None) -> list[VerifyResult]:
    """Re-hash every artifact of every entry (and check for dead loaders, the provider's verdict, and that
    an entry a tier brought in would still be admitted by ``trust``: a revoked key's entries fail);
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
            if problem is None:
                from ._plan import trust_problem  # the hit's own rule: a revoked signer, a TUF target withdrawn

                problem = trust_problem(item, store, trust if trust is not None else Trust())
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
