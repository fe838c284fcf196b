"""The public entry points: :class:`ContextCache` and the drop-in :func:`InferenceSession`."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort

from . import _events
from ._config import resolve_cache_dir, resolve_strict
from ._loader import Loader, LoadResult, ModelArg, ProvidersArg
from ._store import Entry, Store

log = logging.getLogger("ctxcache")


@dataclass
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
    broken: str | None = None  # why the entry is unusable, if it is

    @classmethod
    def from_entry(cls, entry: Entry) -> EntryInfo:
        m = entry.manifest
        raw = m.get("model")
        model: dict[str, Any] = raw if isinstance(raw, dict) else {}
        return cls(
            key=entry.key,
            path=entry.path,
            model_name=str(model.get("name", "?")),
            provider=str(m.get("provider", "?")),
            size=entry.size,
            created=float(m.get("created", 0.0)),
            last_used=entry.last_used(),
            compile_seconds=entry.compile_seconds,
            parts=entry.parts,
        )


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
        verify: ``"stat"`` (re-hash an artifact only when its stat signature changed) or ``"full"``
            (re-hash everything at every hit; slow for big models).
        max_size: bytes; after each compile, least-recently-used entries are pruned to stay under it.
        negative_ttl: seconds to remember that a model cannot compile for a key (no retry each launch).
        tiers: read-only bundles (folder or ``.tar`` path, or :class:`~ctxcache.Bundle`) and remote stores
            (``s3://bucket/prefix`` or :class:`~ctxcache.RemoteTier`) consulted in order on a local miss,
            before compiling. A tier entry is verified and copied into this cache; see README, "Tiers".
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        app_name: str = "ctxcache",
        app_author: str | None = None,
        strict: bool | None = None,
        lock_timeout: float | None = 600.0,
        on_lock_timeout: Literal["jit", "raise"] = "jit",
        embed: bool = False,
        extra_key: str | None = None,
        verify: Literal["stat", "full"] = "stat",
        max_size: int | None = None,
        negative_ttl: float = 7 * 24 * 3600.0,
        tiers: Sequence[Any] | None = None,
    ) -> None:
        if on_lock_timeout not in ("jit", "raise"):
            raise ValueError(f"on_lock_timeout must be 'jit' or 'raise', not {on_lock_timeout!r}")
        if verify not in ("stat", "full"):
            raise ValueError(f"verify must be 'stat' or 'full', not {verify!r}")
        if lock_timeout is not None and lock_timeout < 0:
            raise ValueError("lock_timeout must be >= 0 or None")
        self.root = resolve_cache_dir(cache_dir, app_name, app_author)
        self.store = Store(self.root)
        self.strict = resolve_strict(strict)
        self.lock_timeout = lock_timeout
        self.on_lock_timeout = on_lock_timeout
        self.embed = embed
        self.extra_key = extra_key
        self.verify = verify
        self.max_size = max_size
        self.negative_ttl = negative_ttl
        # Bundles / packages / remote stores consulted on a local miss, in order (see _tiers.coerce). Paths
        # and URLs become tier objects at the first miss, so a launch that hits imports no tier code.
        for item in tiers or ():
            if not isinstance(item, (str, os.PathLike)) and not hasattr(item, "fetch"):
                raise TypeError(f"a tier must be a bundle path, a URL or a tier object, not {type(item).__name__}")
        self._tier_specs: list[Any] = list(tiers or ())
        self._tiers: list[Any] | None = None if self._tier_specs else []
        self._loader = Loader(self)

    def __repr__(self) -> str:
        return f"ContextCache({str(self.root)!r})"

    @property
    def tiers(self) -> list[Any]:
        """The tiers as objects (:class:`~ctxcache.Bundle`, :class:`~ctxcache.RemoteTier`...), in lookup order."""
        if self._tiers is None:
            from . import _tiers

            self._tiers = _tiers.coerce(self._tier_specs)
        return self._tiers

    # -- loading ------------------------------------------------------------------------------
    def load(
        self,
        model: ModelArg,
        *,
        providers: ProvidersArg,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        sess_options: ort.SessionOptions | None = None,
    ) -> LoadResult:
        """A session for ``model`` on ``providers``, from the cache when possible. Never raises a cache fault.

        Raises :class:`~ctxcache.errors.CtxCacheError` subclasses for bad input (missing model, not an
        ONNX file, unknown provider, bad option), before anything in the cache changes.
        """
        return self._loader.load(model, providers, provider_options, sess_options)

    def key(
        self,
        model: ModelArg,
        *,
        providers: ProvidersArg,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        sess_options: ort.SessionOptions | None = None,
    ) -> Any:
        """The :class:`Fingerprint` a load would use (``None`` when the load would bypass the cache)."""
        from ._loader import _model_arg, context_target, resolve_providers

        m = _model_arg(model)
        chain = resolve_providers(providers, provider_options)
        if context_target(chain) is not None:
            return None
        ep, options = chain[0]
        digest = self._loader.digest(m)
        return self._loader.fingerprint(digest.digest, ep, options, sess_options)

    # -- management ---------------------------------------------------------------------------
    def entries(self, *, include_broken: bool = False) -> list[EntryInfo]:
        """Every committed entry, with hit counts from the stats log; newest use first."""
        hits = _events.summarize(self.store.events_path).per_key_hits
        out: list[EntryInfo] = []
        for item in self.store.iter_entries():
            if isinstance(item, Entry):
                info = EntryInfo.from_entry(item)
                info.hits = hits.get(item.key, 0)
                out.append(info)
            elif include_broken:
                key, err = item
                out.append(
                    EntryInfo(key, self.store.entry_path(key), "?", "?", 0, 0.0, 0.0, 0.0, broken=f"{err.code}: {err.message}")
                )
        out.sort(key=lambda e: e.last_used, reverse=True)
        return out

    def invalidate(self, key: str | None = None, *, model: ModelArg | None = None, reason: str = "invalidated by the application") -> int:
        """Quarantine entries by key (or unique key prefix) or by model (every provider config). Returns the count."""
        if (key is None) == (model is None):
            raise ValueError("pass exactly one of key= or model=")
        keys: list[str]
        if key is not None:
            keys = [k for k in self.store.keys() if k.startswith(key)]
        else:
            from ._loader import _model_arg

            digest = self._loader.digest(_model_arg(model)).digest  # type: ignore[arg-type]
            keys = [e.key for e in self.entries() if e.parts.get("model") == digest]
        return sum(1 for k in keys if self.store.quarantine(k, "invalidated", reason))

    def clear(self) -> int:
        """Remove every entry (and remembered compile failures). Returns the number of entries removed."""
        n = sum(1 for k in self.store.keys() if self.store.remove(k))
        self.store.forget_failures()
        return n

    def stats(self) -> _events.Stats:
        """Hits, misses, fallbacks (with reasons), bypasses and compile seconds, over all processes."""
        return _events.summarize(self.store.events_path)

    def reset_stats(self) -> None:
        _events.reset(self.store.events_path)

    def size(self) -> int:
        return sum(e.size for e in self.entries())

    # Policy for verify / prune / explain lives in _manage; these are the public doors to it.
    def verify_entries(self, *, fix: bool = False) -> list[Any]:
        """Re-hash every artifact of every entry (``ctxcache verify``); ``fix`` quarantines what fails.

        Returns one :class:`~ctxcache._manage.VerifyResult` per entry.
        """
        from . import _manage

        return _manage.verify(self, fix=fix)

    def prune(
        self,
        *,
        max_size: int | None = None,
        older_than: float | None = None,
        other_environments: bool = True,
        dry_run: bool = False,
    ) -> Any:
        """Remove damaged entries and entries built for another environment (another onnxruntime / EP /
        SDK version), then entries unused for ``older_than`` seconds, then least recently used ones until
        the cache fits in ``max_size`` bytes. Returns a :class:`~ctxcache._manage.PruneReport`.
        """
        from . import _manage

        return _manage.prune(
            self, max_size=max_size, older_than=older_than, other_environments=other_environments, dry_run=dry_run
        )

    def explain(
        self,
        model: ModelArg,
        *,
        providers: ProvidersArg,
        provider_options: Sequence[Mapping[str, Any]] | None = None,
        sess_options: ort.SessionOptions | None = None,
    ) -> Any:
        """Would :meth:`load` hit? If not, which key parts differ from the nearest entries of this model.

        Read-only. Returns an :class:`~ctxcache._manage.Explanation` (``verdict``, ``reason``,
        ``nearest[i].differences`` such as ``onnxruntime 1.31.1 -> 1.32.0``).
        """
        from . import _manage

        return _manage.explain(
            self, model, providers=providers, provider_options=provider_options, sess_options=sess_options
        )

    def _after_publish(self, entry: Entry) -> None:
        if self.tiers:
            from . import _tiers

            _tiers.write_back(self, entry)
        if self.max_size is None:
            return
        # Keep the cache under its cap, never the entry just made: entries that cannot be hit on this
        # machine (another onnxruntime / EP version) go first, then least recently used. Entries of
        # other environments are kept while under the cap (a folder may be shared by two apps).
        from . import _manage

        _manage.prune(self, max_size=self.max_size, other_environments=False, keep={entry.key})


_default_caches: dict[str, ContextCache] = {}
_default_lock = threading.Lock()


def default_cache() -> ContextCache:
    """The cache :func:`InferenceSession` uses when none is given (``$CTXCACHE_DIR`` read now)."""
    root = str(resolve_cache_dir(None, "ctxcache", None))
    with _default_lock:
        cache = _default_caches.get(root)
        if cache is None:
            cache = _default_caches[root] = ContextCache(root)
        return cache


def InferenceSession(  # noqa: N802 - named after the class it stands in for
    model: ModelArg,
    sess_options: ort.SessionOptions | None = None,
    providers: ProvidersArg = None,
    provider_options: Sequence[Mapping[str, Any]] | None = None,
    *,
    cache: ContextCache | None = None,
) -> ort.InferenceSession:
    """Drop-in for ``onnxruntime.InferenceSession`` that compiles once and loads the cached context after.

    Takes the same argument forms (provider names, ``(name, options)`` tuples, ``provider_options``)
    and returns a real ``onnxruntime.InferenceSession``. Use :meth:`ContextCache.load` to learn whether
    it was a hit, a miss, a fallback or a bypass.
    """
    c = cache if cache is not None else default_cache()
    return c.load(model, providers=providers, provider_options=provider_options, sess_options=sess_options).session
