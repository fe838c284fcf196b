"""``explain`` and ``warm``: reports and actions over the one load plan (:func:`ctxcache._plan.plan`).

``explain`` turns the plan into the outcome the load would have (its ``verdict``) and, on a miss, which
key parts differ from the nearest entries and which tier would serve; ``warm`` acts on it. Neither has a
rule of its own: a test asserts, over many cache states, that explain's verdict is the load's outcome.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from . import _fingerprint, _key, _negative, _side
from ._manage import entries
from ._plan import Bypass, Fallback, Inputs, Miss, Plan, Serve
from ._trust import Trust
from ._types import Reason

if TYPE_CHECKING:
    from ._loader import Loader
    from .tiers import Tier


Verdict = Literal["hit", "miss", "fallback", "bypass", "pending"]


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
        """The local cache holds an entry that a load would serve (``verdict == "hit"`` with no tier)."""
        return self.verdict == "hit" and self.served_by is None

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
            served = self.served_by
            if served is not None:
                return f"hit: from tier {served.tier} (entry {self.key[:12] if self.key else '?'} is not here yet)"
            return f"hit: entry {self.key[:12] if self.key else '?'} is intact and would load"
        if self.verdict == "pending" and self.reason is None:
            return "pending: no entry yet; a load serves the meanwhile providers and compiles in a background process"
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


def explain(loader: Loader, tiers: Sequence[Tier], inputs: Inputs, *, limit: int = 3) -> Explanation:
    """The plan of a load of ``inputs``, reported: ``verdict`` is the outcome that load would have (a tier
    that would serve makes it a ``hit`` with ``served_by``; a background compile running or to be started,
    ``pending``). On a miss, which key parts differ from the nearest entries of the same model (same
    content first, then same file name). Read-only: nothing is compiled, loaded, invalidated or counted."""
    decided = loader.plan(inputs)
    found = report(loader, tiers, inputs, decided, limit=limit)
    return replace(found, side_cache=_side.describe(loader.store, found.key, inputs.chain))


def report(loader: Loader, tiers: Sequence[Tier], inputs: Inputs, decided: Plan, *, limit: int = 3) -> Explanation:
    name = inputs.model.name
    if isinstance(decided, Bypass):
        fp, dg = decided.fingerprint, decided.digest
        return Explanation(name, "bypass", fp.key if fp else None, dg.digest if dg else None, decided.reason)
    key, digest = decided.key, decided.digest.digest
    if isinstance(decided, Serve):
        return Explanation(name, "hit", key, digest, rebuild_note(loader, inputs, decided),
                           compatibility=f"{decided.answer}: {decided.detail}")
    if isinstance(decided, Fallback):
        return Explanation(name, "fallback", key, digest, decided.reason)
    assert isinstance(decided, Miss)
    store = loader.store
    here = decided.fingerprint.as_dict()
    candidates: list[Nearest] = []
    others = 0
    for info in entries(store):
        same_content = info.parts.get("model") == digest
        if not same_content and info.model_name != name:
            others += 1
            continue
        diffs = tuple(Difference(*d) for d in _fingerprint.diff(info.parts, here))
        candidates.append(Nearest(info.key, info.model_name, info.created, info.last_used, same_content, diffs))
    # Same content before same name; then the fewest differing parts; then the most recent.
    candidates.sort(key=lambda n: (not n.same_content, len(n.differences), -n.last_used))
    answers: tuple[TierAnswer, ...] = ()
    if decided.mode != "pending" and tiers and not _negative.tiers_rejected(store.negative_dir, key, loader.config.negative_ttl):
        answers = tier_report(tiers, decided.fingerprint, loader.config.trust)
    served = any(a.would_serve for a in answers)
    verdict: Verdict = "hit" if served else "pending" if decided.mode in ("pending", "background") else "miss"
    compat = None
    if decided.replace is not None and decided.note is not None:
        compat = f"unsupported: {decided.note.message}"
    return Explanation(name, verdict, key, digest, decided.note, tuple(candidates[:limit]), others, answers, compat)


def rebuild_note(loader: Loader, inputs: Inputs, decided: Serve) -> Reason | None:
    """For an entry ONNX Runtime prefers recompiled: what is remembered of its failed rebuilds, if any."""
    if decided.answer != "prefer_recompilation":
        return None
    failed, _ = _negative.rebuild_failed(loader.store.negative_dir, decided.key, loader.env.digest(inputs.ep, inputs.options))
    return failed


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


def warm(loader: Loader, tiers: Sequence[Tier], inputs: Inputs) -> WarmResult:
    """Make sure ``inputs``' model has an intact entry (the one "make sure this is cached").

    Idempotent: an entry a load would serve is left alone. A remembered ``not_compilable`` is retried (warm
    is an explicit request); a remembered ``context_unloadable`` or ``crashed_during_load`` is not: that
    context failed to load (or killed its loader) here, and compiling it again would only repeat it.
    Input errors raise; everything else is reported in the result.
    """
    start = time.perf_counter()
    name = os.fspath(inputs.model.path) if inputs.model.path is not None else "<bytes>"
    inputs = Inputs(inputs.model, inputs.chain, inputs.sess_options, inputs.kwargs, inputs.raw, warm=True)
    decided = loader.plan(inputs)
    if isinstance(decided, Serve):
        return WarmResult(name, "cached", "hit", decided.key, seconds=time.perf_counter() - start)
    if isinstance(decided, Bypass):
        if decided.reason.code == "not_compilable" and decided.fingerprint is not None:
            _negative.forget(loader.store.negative_dir, decided.fingerprint.key)
        else:
            key = decided.fingerprint.key if decided.fingerprint is not None else None
            return WarmResult(name, "failed", "bypass", key, str(decided.reason), seconds=time.perf_counter() - start)
    r = loader.load(inputs)
    replaced = None
    if r.outcome == "fallback" and r.reason is not None and r.reason.code not in ("compile_failed", "publish_failed"):
        replaced = str(r.reason)  # a damaged entry was quarantined; build it afresh
        r = loader.load(inputs)
    status: WarmStatus = "compiled" if r.outcome == "miss" else "cached" if r.outcome == "hit" else "failed"
    reason = None if status != "failed" else (str(r.reason) if r.reason else r.outcome)
    return WarmResult(name, status, r.outcome, r.key, reason, r.timings.compile, time.perf_counter() - start, replaced)
