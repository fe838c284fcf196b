"""The public entry points: :class:`ContextCache` and the drop-in :func:`InferenceSession`.

The facade owns the configuration and wires the layers below it: the store, the key environment, the
loader, the tiers (built at the first miss) and the post-publish jobs it injects into the loader.
"""

from __future__ import annotations

import _thread
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import onnxruntime as ort

from . import _fs, _key, _negative
from ._config import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MEANWHILE,
    DEFAULT_NEGATIVE_TTL,
    DEFAULT_STALL_TIMEOUT,
    Config,
    resolve_cache_dir,
)
from ._fingerprint import Fingerprint
from ._inputs import (
    ProvidersArg,
    Raw,
    check_kwargs,
    chosen_by_policy,
    context_target,
    plain_session,
    resolve_model,
    resolve_providers,
)
from ._loader import Loader, bypass_session, make_inputs
from ._manifest import Entry
from ._plan import Bypass, Plan, inputs_bypass
from ._store import Store
from ._trust import Trust
from ._types import LoadResult, ModelArg

if TYPE_CHECKING:
    from pathlib import Path

    from . import _explain, _manage, _prune, _stats
    from .tiers import Tier



class ContextCache:
    """A cache of compiled EP-context models in one folder.

    Args:
        cache_dir: where entries live. Default: ``$CTXCACHE_DIR``, else the platform's app-data folder
            for ``app_name`` (see README, "Where the cache lives").
        app_name, app_author: name the per-app folder (platformdirs).
        strict: re-raise cache faults as :class:`~ctxcache.errors.CacheFaultError` instead of falling
            back (for CI). Default: ``$CTXCACHE_STRICT``.
        lock_timeout: seconds to wait for another process compiling the same model (``None``: forever).
        on_lock_timeout: then ``"jit"`` (a working session on the original model, outcome ``bypass``)
            or ``"raise"`` (:class:`~ctxcache.errors.LockTimeoutError`).
        embed: embed the compiled binary in the context model instead of a file beside it.
        extra_key: any string of the app's own that must be part of the key.
        verify: ``"content"`` (the default): every hit re-hashes every byte it serves, while ONNX Runtime
            creates the session (``"full"`` is the 0.1 name of it). ``"stat"``: re-hash an artifact only
            when its stat signature changed; faster for huge contexts on trusted storage, blind to
            block-level damage (bit rot) that changes bytes but no stat field.
        max_size: bytes; after each compile, least-recently-used entries are pruned to stay under it.
        negative_ttl: seconds to remember that a model cannot compile for a key (no retry each launch).
        stall_timeout: seconds a load waits on a key's lock whose holder makes no progress (its CPU time
            stands still: stopped, frozen, blocked on a pipe) before it serves the original model
            meanwhile (outcome ``bypass``, reason ``lock_stalled``). ``None``: only ``lock_timeout`` counts.
        tiers: bundles (folder or ``.tar`` path, or :class:`~ctxcache.Bundle`), ORT model packages and
            remote stores (``s3://bucket/prefix`` or :class:`~ctxcache.RemoteTier`) consulted in order on
            a local miss, before compiling. A tier entry is verified and copied into this cache.
        on_miss: ``"compile"`` (compile now, the load waits) or ``"background"``: a miss returns at once a
            session on the original model with the ``meanwhile`` providers (outcome ``pending``) and
            compiles in a detached process that outlives the app; the next launch after it is a hit.
        meanwhile: the providers of that session (default: CPU).
        trusted_keys: Ed25519 public keys (``"ed25519:<base64>"`` as ``ctxcache keygen`` prints them, PEM
            public keys, or ``pathlib.Path`` files with one key per line) whose signatures admit a tier's
            entry. Several for a rotation. Default: ``$CTXCACHE_TRUSTED_KEYS`` (comma- or space-separated).
        revoked_keys: key ids (16 hex digits, as ``explain``/``doctor`` show them) or public keys whose
            signatures are refused everywhere, even if also trusted. ``$CTXCACHE_REVOKED_KEYS`` adds to them.
        trusted_dirs: the app's own install folders: a bundle or model package inside one may be unsigned
            (nobody but the installer writes there). Elsewhere an unsigned bundle is refused, because
            nothing in its files can show that the binaries are really the model's its index names.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        app_name: str = "ctxcache",
        app_author: str | None = None,
        strict: bool | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
        on_lock_timeout: Literal["jit", "raise"] = "jit",
        embed: bool = False,
        extra_key: str | None = None,
        verify: Literal["content", "concurrent", "stat", "full"] = "content",
        max_size: int | None = None,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        tiers: Sequence[Any] | None = None,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
        revoked_keys: Sequence[str | os.PathLike[str]] | None = None,
        trusted_dirs: Sequence[str | os.PathLike[str]] | None = None,
        on_miss: Literal["compile", "background"] = "compile",
        meanwhile: Sequence[str] = DEFAULT_MEANWHILE,
    ) -> None:
        self._setup(Config.create(
            cache_dir, app_name=app_name, app_author=app_author, strict=strict, lock_timeout=lock_timeout,
            on_lock_timeout=on_lock_timeout, embed=embed, extra_key=extra_key, verify=verify, max_size=max_size,
            negative_ttl=negative_ttl, tiers=tiers, stall_timeout=stall_timeout, trusted_keys=trusted_keys,
            revoked_keys=revoked_keys, trusted_dirs=trusted_dirs, on_miss=on_miss, meanwhile=meanwhile))

    @classmethod
    def from_config(cls, config: Config) -> ContextCache:
        """A cache on an already validated :class:`Config` (what a background worker receives)."""
        self = cls.__new__(cls)
        self._setup(config)
        return self

    def _setup(self, config: Config) -> None:
        #: the whole configuration, frozen: every path that decides what a load does reads this one object
        self.config = config
        self._store = Store(config.root)
        self._env = _key.Environment(self._store.memo_dir)
        # Paths and URLs become tier objects at the first miss, so a launch that hits imports no tier code.
        self._tiers: list[Tier] | None = None if config.tiers else []
        self._loader = Loader(self._store, config, self._env, self._tier_list, self._after_publish)

    def __repr__(self) -> str:
        return f"ContextCache({str(self.root)!r})"

    # Read-only views of the configuration (``config`` holds the one copy).
    @property
    def root(self) -> Path:
        """The cache folder (absolute): ``cache_dir``, else ``$CTXCACHE_DIR``, else the platform's app-data folder."""
        return self.config.root

    @property
    def max_size(self) -> int | None:
        return self.config.max_size

    @property
    def strict(self) -> bool:
        return self.config.strict

    @property
    def embed(self) -> bool:
        return self.config.embed

    @property
    def extra_key(self) -> str | None:
        return self.config.extra_key

    @property
    def lock_timeout(self) -> float | None:
        return self.config.lock_timeout

    @property
    def negative_ttl(self) -> float:
        return self.config.negative_ttl

    @property
    def trust(self) -> Trust:
        """The trust policy tiers are admitted by (trusted and revoked key ids, the app's own folders)."""
        return self.config.trust

    @property
    def tiers(self) -> list[Tier]:
        """The tiers as objects (:class:`~ctxcache.Bundle`, :class:`~ctxcache.RemoteTier`...), in lookup order."""
        return self._tier_list()

    def _tier_list(self) -> list[Tier]:
        if self._tiers is None:
            from .tiers import coerce

            self._tiers = coerce(self.config.tiers, self.root)
        return self._tiers

    # -- loading ------------------------------------------------------------------------------
    def load(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
             sess_options: ort.SessionOptions | None = None, **ort_kwargs: Any) -> LoadResult:
        """A session for ``model`` on ``providers``, from the cache when possible. Never raises a cache fault.

        ``ort_kwargs``: ``onnxruntime.InferenceSession``'s own keyword arguments (``disabled_optimizers``,
        ``enable_fallback``, ``read_config_from_model``), passed to every session of the load.
        Raises :class:`~ctxcache.errors.CtxCacheError` subclasses for bad input (missing model, not an
        ONNX file, unknown provider, bad option, unknown keyword), before anything in the cache changes.
        """
        return self._loader.load(make_inputs(model, providers, provider_options, sess_options, kwargs=ort_kwargs))

    def plan(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
             sess_options: ort.SessionOptions | None = None, **ort_kwargs: Any) -> Plan:
        """What :meth:`load` would do here, as a typed plan (read-only): ``Bypass(reason)``, ``Serve(entry)``,
        ``Fallback(entry, reason)`` or ``Miss(mode)``; every keyed plan has ``.key``. :meth:`explain`,
        :meth:`key`, :meth:`warm`, :meth:`rebuild` and the background worker all act on this one decision."""
        inputs = make_inputs(model, providers, provider_options, sess_options, kwargs=ort_kwargs)
        return self._loader.plan(inputs)

    def key(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
            sess_options: ort.SessionOptions | None = None, **ort_kwargs: Any) -> Fingerprint | None:
        """The :class:`Fingerprint` a load would use; ``None`` exactly when the load would bypass the cache."""
        decided = self.plan(model, providers=providers, provider_options=provider_options, sess_options=sess_options,
                            **ort_kwargs)
        return None if isinstance(decided, Bypass) else decided.fingerprint

    def warm(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
             sess_options: ort.SessionOptions | None = None) -> _explain.WarmResult:
        """Make sure ``model`` has an intact entry for ``providers`` (installer-time warm-up; idempotent).

        A remembered "compiled no node" is retried; a context known not to load here is not compiled
        again. ``ctxcache warm`` runs this in worker processes.
        """
        from . import _explain

        return _explain.warm(self._loader, self._tier_list(), make_inputs(model, providers, provider_options, sess_options))

    def explain(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
                sess_options: ort.SessionOptions | None = None) -> _explain.Explanation:
        """Would :meth:`load` hit? Its verdict is the outcome the load would have; if not a hit, which key
        parts differ from the nearest entries of this model, and which tier would serve it. Read-only."""
        from . import _explain

        return _explain.explain(self._loader, self._tier_list(), make_inputs(model, providers, provider_options, sess_options))

    def rebuild(self, model: ModelArg, *, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None = None,
                sess_options: ort.SessionOptions | None = None) -> str:
        """Recompile the entry a load of ``model`` serves and replace it once the new context loads (what the
        background worker does when ONNX Runtime prefers a recompiled context). The current entry keeps
        serving if the rebuild fails; the failure is remembered for this environment (retried with backoff).
        Returns what happened, in words."""
        from . import _fill

        return _fill.rebuild(self._loader, make_inputs(model, providers, provider_options, sess_options))

    # -- management ---------------------------------------------------------------------------
    def verdicts(self) -> dict[str, str]:
        """key -> the provider's compatibility verdict on each entry here (``optimal: ...``), asked once
        per entry and environment."""
        from . import _manage

        return _manage.entry_verdicts(self._store, self._env, self.entries())

    def entries(self, *, include_broken: bool = False) -> list[_manage.EntryInfo]:
        """Every committed entry, with hit counts from the stats log; newest use first."""
        from . import _manage

        return _manage.entries(self._store, include_broken=include_broken)

    def select(self, *, models: Sequence[ModelArg] | None = None, provider: str | None = None,
               options: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None) -> list[_manage.EntryInfo]:
        """Entries selected by model file(s) (by content), provider name, a subset of binary options
        (as the key records them) and/or key prefixes; every filter given must match. Sorted by key."""
        from . import _manage

        digests = {resolve_model(m).digest(self._store.memo_dir).digest for m in models} if models else None
        found = _manage.select(self._store, digests=digests, provider=provider, options=options, keys=keys)
        return sorted((_manage.EntryInfo.of(e) for e in found), key=lambda i: i.key)

    def invalidate(self, key: str | None = None, *, model: ModelArg | None = None,
                   reason: str = "invalidated by the application") -> int:
        """Quarantine the entry of a key (or a unique key prefix of 4+ digits), or every entry of a model
        (all provider configurations). Returns the count."""
        from . import _manage

        if (key is None) == (model is None):
            raise ValueError("pass exactly one of key= or model=")
        if key is not None:
            keys = _manage.keys_for_invalidate(self._store, key)
        else:
            assert model is not None
            digest = resolve_model(model).digest(self._store.memo_dir).digest
            keys = [e.key for e in _manage.select(self._store, digests={digest})]
        return sum(1 for k in keys if self._store.evict(k, "invalidated", reason))

    def clear(self) -> int:
        """Remove every entry and everything kept beside them: remembered failures, quarantined copies,
        dead compiles' staging, hash memos, free locks, dead crash markers. An entry being rebuilt by
        another process right now is left to it. Returns the number of entries removed."""
        store = self._store
        n = sum(1 for k in store.list_keys() if store.evict(k, "cleared", "cleared", keep=False))
        _negative.clear(store.negative_dir)
        for item in store.junk(negative_ttl=0.0, lock_age=0.0):
            store.remove_junk(item)
        for name in _fs.names(store.memo_dir):  # memos of files that still exist: a cache of hashes, cheap to redo
            _fs.remove_file(store.memo_dir / name)
        return n

    def wait(self, key: str, timeout: float | None = None) -> bool:
        """Wait for the entry of ``key`` (a ``pending`` load's ``LoadResult.key``) to be committed;
        ``False`` when ``timeout`` passed or its compile ended without an entry."""
        from ._background import Waiter

        return Waiter(self._store, key).wait(timeout)

    def stats(self) -> _stats.Stats:
        """Hits, misses, fallbacks (with reasons), bypasses and compile seconds, over all processes."""
        from . import _stats

        _stats.compact(self._store.events_path)
        return _stats.summarize(self._store.events_path)

    def reset_stats(self) -> None:
        from . import _stats

        _stats.reset(self._store.events_path)

    def size(self) -> int:
        return sum(e.size for e in self.entries())

    def read_only(self) -> bool:
        """Whether the cache folder exists and refuses writes (a read-only mount, a system image): its
        entries still hit; nothing can be compiled into it, removed or counted."""
        return _fs.is_folder(self.root) and not _fs.can_write(self.root)

    def environment(self, provider: str, options: Mapping[str, Any] | None = None) -> dict[str, Any] | str:
        """The machine-side key parts a load with this provider configuration would use here (``doctor``),
        or why the provider cannot run here."""
        from . import _manage

        return _manage.environment(self._env, provider, options or {})

    def verify_entries(self, *, fix: bool = False) -> list[_manage.VerifyResult]:
        """Re-hash every artifact of every entry (``ctxcache verify``); ``fix`` quarantines what fails."""
        from . import _manage

        return _manage.verify(self._store, self._env, fix=fix, trust=self.config.trust)

    def plan_prune(self, *, max_size: int | None = None, older_than: float | None = None,
                   other_environments: bool = True) -> _prune.PrunePlan:
        """What :meth:`prune` would remove (see there); ``plan.execute()`` removes exactly that."""
        from . import _prune

        return _prune.plan_prune(self._store, self._env, max_size=max_size, older_than=older_than,
                                  other_environments=other_environments, negative_ttl=self.negative_ttl)

    def prune(self, *, max_size: int | None = None, older_than: float | None = None, other_environments: bool = True,
              dry_run: bool = False) -> _prune.PruneReport:
        """Remove damaged entries and entries built for another environment (another onnxruntime / EP /
        SDK version), then entries unused for ``older_than`` seconds, then least recently used ones until
        the cache fits in ``max_size`` bytes."""
        plan = self.plan_prune(max_size=max_size, older_than=older_than, other_environments=other_environments)
        return plan.report() if dry_run else plan.execute()

    # -- post-publish jobs (injected into the loader; run after the key lock is released) ------
    def _after_publish(self, entry: Entry) -> None:
        from . import _prune, _stats

        tiers = self._tier_list()
        if tiers:
            from .tiers import _base

            _base.write_back(tiers, entry)
        if self.max_size is not None:
            # Keep the cache under its cap, never the entry just made: entries that cannot be hit on this
            # machine (another onnxruntime / EP version) go first, then least recently used. Entries of
            # other environments are kept while under the cap (a folder may be shared by two apps).
            _prune.plan_prune(self._store, self._env, max_size=self.max_size, other_environments=False,
                               keep={entry.key}, negative_ttl=self.negative_ttl).execute()
        _stats.compact(self._store.events_path)


_default_caches: dict[str, ContextCache] = {}
_default_lock = _thread.allocate_lock()  # not threading: a module the hit needs nowhere else


def default_cache() -> ContextCache:
    """The cache :func:`InferenceSession` uses when none is given (``$CTXCACHE_DIR`` read now)."""
    root = str(resolve_cache_dir(None, "ctxcache", None))
    with _default_lock:
        cache = _default_caches.get(root)
        if cache is None:
            cache = _default_caches[root] = ContextCache(root)
        return cache


def InferenceSession(
    path_or_bytes: ModelArg | None = None,
    sess_options: ort.SessionOptions | None = None,
    providers: ProvidersArg = None,
    provider_options: Sequence[Mapping[str, Any]] | None = None,
    *,
    cache: ContextCache | None = None,
    **kwargs: Any,
) -> ort.InferenceSession:
    """Drop-in for ``onnxruntime.InferenceSession`` that compiles once and loads the cached context after.

    Takes the same arguments (``path_or_bytes``, provider names, ``(name, options)`` tuples,
    ``provider_options``, and onnxruntime's keyword arguments ``disabled_optimizers``,
    ``enable_fallback``, ``read_config_from_model``) and returns a real ``onnxruntime.InferenceSession``.
    ``model=`` is taken for ``path_or_bytes`` too (ctxcache 0.2). A misspelt keyword raises
    :class:`~ctxcache.errors.UnknownArgumentError` (a ``TypeError``). Use :meth:`ContextCache.load` to
    learn whether it was a hit, a miss, a fallback or a bypass.
    """
    if "model" in kwargs:
        if path_or_bytes is not None:
            raise TypeError("InferenceSession() got both path_or_bytes and model; pass one")
        path_or_bytes = kwargs.pop("model")
    if path_or_bytes is None:
        raise TypeError("InferenceSession() missing the model: pass path_or_bytes (a path or bytes)")
    if cache is None:
        # No compiling provider first, or a selection policy: exactly onnxruntime's session, decided from the
        # provider arguments alone, before the model file or the default cache folder is touched at all.
        chain = resolve_providers(providers, provider_options)
        if chosen_by_policy(chain, sess_options) or context_target(chain) is not None:
            checked = check_kwargs(kwargs) if kwargs else {}
            try:
                return plain_session(Raw(path_or_bytes, providers, provider_options), sess_options, checked)
            except Exception as e:
                # Refused: said as a load would say it (a missing file, not an ONNX model), else ORT's own error.
                resolve_model(path_or_bytes).explain_failure(e)
                raise
    inputs = make_inputs(path_or_bytes, providers, provider_options, sess_options, kwargs=kwargs)
    if cache is None:
        # Settings a context cannot honour: the provider's session on the caller's own options, nothing written.
        early = inputs_bypass(inputs)
        if early is not None:
            return bypass_session(inputs, early)
        cache = default_cache()
    return cache._loader.load(inputs).session


def store_of(cache: ContextCache) -> Store:
    """The facade-level modules' way to the store (``ContextCache`` keeps it private)."""
    return cache._store
