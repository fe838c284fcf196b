"""The one decision: what a load of this model with these providers would do here, as a typed plan.

Every path that needs that answer asks :func:`plan` and nothing else: the loader executes the plan,
``explain`` reports it, ``key`` returns its key, ``warm`` and ``rebuild`` act on it, the background worker
recomputes it and refuses a job whose key differs. Each check is written once, in the order a load meets
it (when explain, key and the loader each had their own copy, they disagreed: explain said "hit" where the
load bypassed an insecure cache, key returned a key for a load that bypassed).

    inputs (selection policy, no compiling provider, settings a context cannot honour)  -> Bypass, silent
    the cache folder (too long, unsafe)                                                 -> Bypass, fault
    model digest -> key -> a remembered failure                                          -> Bypass
    a committed entry -> the one servability rule (_servable.judge)     -> Serve | Fallback | Miss(replace)
    no entry: a folder that cannot be written                                           -> Bypass, fault
              a background compile already running (background mode)                    -> Miss(pending)
              otherwise                                       -> Miss(background or here; tiers first)

:func:`plan` changes nothing on disk unless ``act`` (the loader: consume dead loaders' markers, create the
cache folders); with ``act=False`` it is read-only (explain, key, warm's look, the worker's check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import onnxruntime as ort

from . import _fs, _key, _negative
from ._config import Config
from ._fingerprint import Fingerprint
from ._hashing import ModelDigest
from ._inputs import Chain, Model, Raw, cache_blocker, chosen_by_policy, compile_config, context_target
from ._manifest import Entry
from ._record import Record
from ._servable import Digests, judge
from ._store import BrokenEntry, Store
from ._storebase import InsecureCache
from ._trust import Trust
from ._types import Reason
from .providers import ExecutionProvider
from .providers._base import Verdict


class Inputs(Record):
    """What the application asked for, resolved and checked (nothing learnt on the way): ``model``, ``chain``,
    ``sess_options``, ``kwargs`` (onnxruntime's own keywords), ``raw`` (the caller's arguments as given, for a
    session that must be exactly onnxruntime's), ``warm`` (an explicit warm-up: compiles in the foreground)."""

    __slots__ = ("chain", "kwargs", "model", "raw", "sess_options", "warm")
    model: Model
    chain: Chain
    sess_options: ort.SessionOptions | None
    kwargs: dict[str, Any]
    raw: Raw | None
    warm: bool

    def __init__(self, model: Model, chain: Chain, sess_options: ort.SessionOptions | None,
                 kwargs: dict[str, Any] | None = None, raw: Raw | None = None, warm: bool = False) -> None:
        self._set(model=model, chain=chain, sess_options=sess_options, kwargs=kwargs if kwargs is not None else {},
                  raw=raw, warm=warm)

    @property
    def ep(self) -> ExecutionProvider:
        return self.chain[0][0]

    @property
    def options(self) -> dict[str, str]:
        return self.chain[0][1]

    def as_raw(self) -> Raw:
        if self.raw is not None:
            return self.raw
        return Raw(self.model.source, [e.name for e, _ in self.chain] or None, [o for _, o in self.chain] or None)


Session = Literal["policy", "plain", "whole", "original"]


class Bypass(Record):
    """No cached context for this load: a session on the original model. ``session`` says which:
    ``policy``/``plain`` onnxruntime's own with the caller's arguments, ``whole`` the provider's session
    with the caller's own SessionOptions object, ``original`` the provider's session on the original.
    ``silent``: decided from the inputs alone (nothing is written, not even a stats line); ``fault``: a
    cache fault (logged; raised in strict mode); ``fingerprint``/``digest``: for the report only (a
    remembered failure, an unwritable folder), never a key to use."""

    __slots__ = ("digest", "fault", "fingerprint", "reason", "session", "silent")
    outcome: Literal["bypass"] = "bypass"
    reason: Reason
    session: Session
    silent: bool
    fault: bool
    fingerprint: Fingerprint | None
    digest: ModelDigest | None

    def __init__(self, reason: Reason, session: Session = "original", *, silent: bool = False, fault: bool = False,
                 fingerprint: Fingerprint | None = None, digest: ModelDigest | None = None) -> None:
        self._set(reason=reason, session=session, silent=silent, fault=fault, fingerprint=fingerprint, digest=digest)


class Keyed(Record):
    """A plan whose load uses the cache: its ``fingerprint`` (``key``) and the model's ``digest``."""

    __slots__ = ("digest", "fingerprint")
    fingerprint: Fingerprint
    digest: ModelDigest

    @property
    def key(self) -> str:
        return self.fingerprint.key


class Serve(Keyed):
    """A committed entry that the servability rule admits: load its context. ``checked``: its bytes were
    re-hashed by the plan (``verify="content"``), before any reaches the provider."""

    __slots__ = ("answer", "checked", "detail", "entry")
    entry: Entry
    answer: Verdict
    detail: str
    checked: bool

    def __init__(self, fingerprint: Fingerprint, digest: ModelDigest, entry: Entry, answer: Verdict = "unknown",
                 detail: str = "", checked: bool = False) -> None:
        self._set(fingerprint=fingerprint, digest=digest, entry=entry, answer=answer, detail=detail, checked=checked)


class Fallback(Keyed):
    """A committed entry that must not be served (damaged, unsafe, crashed its loader, no longer trusted):
    quarantine it, then the original model."""

    __slots__ = ("entry", "reason")
    entry: Entry | None
    reason: Reason

    def __init__(self, fingerprint: Fingerprint, digest: ModelDigest, entry: Entry | None, reason: Reason) -> None:
        self._set(fingerprint=fingerprint, digest=digest, entry=entry, reason=reason)


MissMode = Literal["here", "background", "pending"]


class Miss(Keyed):
    """No servable entry: fill it (a tier, else a compile) ``here``, or in a ``background`` worker, or wait for
    the worker already compiling it (``pending``). ``replace``: an entry to quarantine first (the provider's
    verdict: unsupported here); ``note``: why the load did not take the plain way."""

    __slots__ = ("mode", "note", "replace")
    mode: MissMode
    replace: Entry | None  # type: ignore[assignment]
    note: Reason | None

    def __init__(self, fingerprint: Fingerprint, digest: ModelDigest, mode: MissMode = "here",
                 replace: Entry | None = None, note: Reason | None = None) -> None:
        self._set(fingerprint=fingerprint, digest=digest, mode=mode, replace=replace, note=note)


Plan = Bypass | Serve | Fallback | Miss

#: What the plan re-hashes of a committed entry, by ``verify`` mode: every byte before any reaches the
#: provider (``content``), none here because the loader hashes while the session is created
#: (``concurrent``), or only files whose stat signature changed (``stat``).
_DIGESTS: dict[str, Digests] = {"content": "all", "concurrent": "none", "stat": "changed"}


def inputs_bypass(inputs: Inputs) -> Bypass | None:
    """The part of the decision made from the inputs alone (no I/O): the drop-in's no-cache path."""
    if chosen_by_policy(inputs.chain, inputs.sess_options):
        # The app let ORT choose (set_provider_selection_policy) or added providers to its SessionOptions
        # itself: neither can be read back, so the provider ORT will pick cannot be keyed before it picks.
        return Bypass(Reason("provider_policy", "the session options choose the provider (selection policy or "
                                                "providers added to them). Pass providers=[...] to cache its context"),
                      "policy", silent=True)
    no_context = context_target(inputs.chain)
    if no_context is not None:
        return Bypass(no_context, "plain", silent=True)
    blocked = cache_blocker(inputs.model, inputs.sess_options, inputs.kwargs)
    if blocked is not None:
        return Bypass(blocked, "whole", silent=True)
    return None


def store_problem(store: Store, *, create: bool) -> Reason | None:
    """Why this cache folder cannot be used at all (too long for the OS, unsafe, cannot be made).

    ``create`` (a load) makes the layout and checks every folder of it; otherwise the folders that exist
    are checked and nothing is made.
    """
    limit = _fs.path_limit()
    if limit is not None and store.longest_path() >= limit:
        return Reason("cache_unwritable", f"paths under {store.root} would reach {store.longest_path()} characters, "
                                          f"over this system's {limit}-character limit: pass a shorter cache_dir "
                                          "(or enable long paths in Windows)")
    try:
        if create:
            store.ensure()
        else:
            store.check_existing()
    except InsecureCache as e:
        return Reason("cache_insecure", f"{e.strerror}; not using it")
    except OSError as e:
        return Reason("cache_unwritable", f"cannot create cache at {store.root}: {e.strerror or e}")
    return None


def fingerprint(inputs: Inputs, digest: ModelDigest, env: _key.Environment, config: Config) -> Fingerprint:
    """The load's key: the pure function in ``_key`` over this machine's environment parts."""
    so = inputs.sess_options
    return _key.fingerprint(
        model_digest=digest.digest, ep=inputs.ep, options=inputs.options, env=env.parts(inputs.ep, inputs.options),
        graph_optimization=_key.graph_level_name(so.graph_optimization_level if so is not None else None),
        embed=config.embed, extra=config.extra_key, session_config=compile_config(so),
    )


def plan(inputs: Inputs, store: Store, env: _key.Environment, config: Config, *, act: bool = False,
         on_digest: Callable[[ModelDigest], None] | None = None) -> Plan:
    """What a load of ``inputs`` does here (see the module docstring). Raises only for bad input (a model
    that is missing or not ONNX), as the load would, before anything changes. ``on_digest`` is told the
    model's digest as soon as it is known (the loader starts a first launch's meanwhile session then);
    it cannot change the plan."""
    early = inputs_bypass(inputs)
    if early is not None:
        return early
    unusable = store_problem(store, create=act)
    digest = inputs.model.digest(store.memo_dir if unusable is None else None)  # bad input raises here
    if unusable is not None:
        return Bypass(unusable, fault=True, digest=digest)
    if on_digest is not None:
        on_digest(digest)
    fp = fingerprint(inputs, digest, env, config)
    remembered = _negative.remembered(store.negative_dir, fp.key, config.negative_ttl)
    if remembered is not None:
        return Bypass(remembered, fingerprint=fp, digest=digest)
    try:
        entry = store.lookup(fp.key)
    except BrokenEntry as b:
        return Fallback(fp, digest, None, Reason(b.code, b.message))
    if entry is not None:
        return of_entry(inputs, store, env, config, fp, digest, entry, act=act)
    return _miss(inputs, store, config, fp, digest, None, None)


def trust_problem(entry: Entry, store: Store, trust: Trust) -> Reason | None:
    """Why an entry a tier brought in must no longer be served here (``None``: it may be, or it is this
    device's own): its signer or bundle folder is no longer trusted (``signer_revoked``), or its TUF store's
    current publication no longer lists it (``tuf_revoked``). Asked by every hit and by ``verify``."""
    origin = entry.origin
    if origin is None:
        return None
    from .tiers._signing import still_admitted

    refused = still_admitted(origin, trust)
    if refused is not None:
        return Reason("signer_revoked", refused)
    if "tuf" in origin:
        from ._tuf import still_trusted

        return still_trusted(origin, store.base)
    return None


def of_entry(inputs: Inputs, store: Store, env: _key.Environment, config: Config, fp: Fingerprint, digest: ModelDigest,
             entry: Entry, *, act: bool) -> Plan:
    """The plan for a committed ``entry`` of the load's key: the servability rule (``_servable.judge``), with
    what ``verify`` asks re-hashed. Also asked by a load that found the entry under the key's lock."""
    distrusted = trust_problem(entry, store, config.trust)
    if distrusted is not None:
        return Fallback(fp, digest, entry, distrusted)
    digests = _DIGESTS[config.verify]
    why, answer, detail = judge(store, entry, inputs.ep, digests=digests, consume_markers=act,
                                options=inputs.options, env=env.digest(inputs.ep, inputs.options))
    if why is None:
        return Serve(fp, digest, entry, answer, detail, checked=digests == "all")
    if why.code != "incompatible":
        return Fallback(fp, digest, entry, why)
    # UNSUPPORTED here: never loaded. Out of the way, then a tier or a compile, in this very launch.
    return _miss(inputs, store, config, fp, digest, entry, why)


def _miss(inputs: Inputs, store: Store, config: Config, fp: Fingerprint, digest: ModelDigest,
          replace: Entry | None, note: Reason | None) -> Plan:
    if not store.writable():
        # A read-only image (or a folder others made unwritable): its entries hit, nothing new can be
        # compiled into it. Said once, plainly; not "a compile is already running".
        return Bypass(Reason("cache_unwritable", f"{store.root} cannot be written (a read-only image?); this "
                                                 "model has no entry in it"), fault=True, fingerprint=fp, digest=digest)
    if config.on_miss != "background" or inputs.warm:
        return Miss(fp, digest, "here", replace, note)
    if inputs.model.path is None:
        return Miss(fp, digest, "here", replace,
                    note or Reason("background_unavailable", "a model given as bytes is compiled in the foreground"))
    from . import _background
    from ._spawn import unavailable_reason

    busy = _background.running(store, fp.key, stall_after=config.stall_timeout)
    if busy == "running":
        return Miss(fp, digest, "pending", replace, note)
    if busy is not None:  # a worker holds the key and makes no progress (stopped, frozen): say so
        return Miss(fp, digest, "pending", replace, Reason("lock_stalled", busy))
    refused = _negative.background_refused(store.negative_dir, fp.key, config.negative_ttl)
    if refused is not None:
        return Miss(fp, digest, "here", replace, note or Reason("background_unavailable", f"{refused}; compiled in the "
                                                                                          "foreground instead"))
    why = unavailable_reason()
    if why is not None:
        return Miss(fp, digest, "here", replace,
                    note or Reason("background_unavailable", f"no background process can be started here ({why}); "
                                                             "compiled in the foreground instead"))
    return Miss(fp, digest, "background", replace, note)
