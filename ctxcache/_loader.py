"""The hit / miss / fallback / bypass state machine; returns a session and a report of what happened.

    load -> resolve providers -> fingerprint -> lookup -> verify -> session on the context   = hit
    no entry -> per-key lock -> look again -> compile into staging -> publish -> session    = miss
    load or verify fails -> invalidate (quarantine, reason kept) -> session on the original  = fallback
    nothing compilable / provider missing / cache unusable -> session on the original       = bypass

The application never sees a cache fault: every fault becomes a fallback with a logged reason, unless
strict mode asks for an exception (for CI).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnxruntime as ort

from . import _events, _fingerprint, providers
from ._compile import CompileFailed, NothingCompiled, compile_into
from ._hashing import ModelDigest, bytes_digest, files_digest, model_digest
from ._onnxproto import WireError, read_facts, read_facts_from_bytes
from ._store import BrokenEntry, Entry, InsecureCache
from .errors import CacheFaultError, InvalidModelError, LockTimeoutError, ModelNotFoundError, ProviderOptionError
from .providers import ExecutionProvider

if TYPE_CHECKING:
    from ._cache import ContextCache

log = logging.getLogger("ctxcache")

Outcome = Literal["hit", "miss", "fallback", "bypass"]
ModelArg = str | bytes | os.PathLike[str]
ProvidersArg = Sequence[str | tuple[str, Mapping[str, Any]]] | None

# Session-config entries copied onto the sessions ctxcache creates. ORT has no way to list the entries
# of a SessionOptions, so the useful documented ones are copied by name; ep.context_* are left out on
# purpose (they would make ORT dump its own contexts beside ours).
_CONFIG_KEYS = (
    "session.disable_cpu_ep_fallback",
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.use_env_allocators",
    "session.disable_prepacking",
    "session.set_denormal_as_zero",
    "session.use_device_allocator_for_initializers",
    "session.intra_op_thread_affinities",
    "session.disable_quant_qdq",
    "session.enable_quant_qdq_cleanup",
    "session.qdq_matmulnbits_accuracy_level",
    "session.disable_aot_function_inlining",
    "session.dynamic_block_base",
)
_SO_ATTRS = (
    "enable_cpu_mem_arena",
    "enable_mem_pattern",
    "enable_mem_reuse",
    "enable_profiling",
    "execution_mode",
    "execution_order",
    "graph_optimization_level",
    "inter_op_num_threads",
    "intra_op_num_threads",
    "log_severity_level",
    "log_verbosity_level",
    "logid",
    "profile_file_prefix",
    "use_deterministic_compute",
    "use_per_session_threads",
)


@dataclass(frozen=True)
class Reason:
    """Why a load was a fallback or a bypass. ``code`` is stable and machine-readable.

    Codes: ``nothing_to_compile``, ``provider_unavailable``, ``not_compilable``, ``cache_unwritable``,
    ``lock_timeout``, ``compile_failed``, ``manifest_missing``, ``manifest_corrupt``,
    ``manifest_unreadable``, ``artifact_missing``, ``artifact_size``, ``artifact_digest``,
    ``artifact_not_regular``, ``artifact_unreadable``, ``crashed_during_load``, ``incompatible``,
    ``load_failed``, ``wrong_provider``, ``publish_failed``, ``provider_policy``, ``unsafe_context`` (the
    context model refers to a file that is not a verified artifact of its entry), ``entry_not_folder``,
    ``cache_insecure`` (the cache folder is writable by other users).
    """

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class Timings:
    """Seconds spent in each step of a load."""

    hash: float = 0.0
    lock_wait: float = 0.0
    fetch: float = 0.0  # copying + verifying an entry from a bundle or remote tier
    compile: float = 0.0
    load: float = 0.0
    total: float = 0.0


@dataclass
class LoadResult:
    """What :meth:`ContextCache.load` returns."""

    session: ort.InferenceSession
    outcome: Outcome
    key: str | None = None
    reason: Reason | None = None
    timings: Timings = field(default_factory=Timings)
    providers: list[str] = field(default_factory=list)
    entry_path: Path | None = None
    model_digest: str | None = None
    #: where a hit's entry came from during this load: "bundle" / "remote" (None: local cache or compile)
    tier: str | None = None
    #: compile seconds this hit avoided (the entry's recorded compile time), for stats
    saved_seconds: float = field(default=0.0, repr=False)

    def __repr__(self) -> str:
        why = f", reason={self.reason}" if self.reason else ""
        key = self.key[:12] if self.key else None
        return f"LoadResult(outcome={self.outcome!r}, key={key!r}, total={self.timings.total:.3f}s{why})"


# -- inputs ---------------------------------------------------------------------------------------
@dataclass
class _Model:
    path: Path | None
    data: bytes | None

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else str(self.path)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<bytes>"


def _model_arg(model: ModelArg) -> _Model:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _Model(None, bytes(model))
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.path.abspath(os.fspath(model)))
        if not path.exists():
            raise ModelNotFoundError(
                f"model file not found: {path}. Check the path, or pass the model as bytes.", path=str(path)
            )
        if not path.is_file():
            raise InvalidModelError(
                f"{path} is not a file. Pass the path of an .onnx model file.", path=str(path), detail="not a file"
            )
        return _Model(path, None)
    raise TypeError(f"model must be a path or bytes, not {type(model).__name__}")


Chain = list[tuple[ExecutionProvider, dict[str, str]]]
_Done = Callable[..., "LoadResult"]


def resolve_providers(providers_arg: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None) -> Chain:
    """Turn ORT's ``providers=`` / ``provider_options=`` forms into provider modules + normalised options."""
    if providers_arg is None:
        return []
    if isinstance(providers_arg, (str, bytes)):
        raise ProviderOptionError(
            f"providers must be a list, e.g. [{providers_arg!r}], not a string.", provider=str(providers_arg), option="providers"
        )
    items = list(providers_arg)
    if provider_options is not None:
        opts_list = list(provider_options)
        if len(opts_list) != len(items):
            raise ProviderOptionError(
                f"provider_options has {len(opts_list)} item(s) for {len(items)} provider(s); give one dict per provider.",
                provider="",
                option="provider_options",
            )
        if any(isinstance(p, tuple) for p in items):
            raise ProviderOptionError(
                "pass options either as (name, options) tuples or in provider_options, not both.",
                provider="",
                option="provider_options",
            )
        items = [(p, o) for p, o in zip(items, opts_list)]  # type: ignore[misc]
    chain: Chain = []
    for item in items:
        opts: Mapping[str, Any]
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
            name, opts = item[0], item[1]
        else:
            raise ProviderOptionError(
                f"cannot read provider entry {item!r}; use 'Name' or ('Name', {{options}}).", provider=str(item), option=""
            )
        ep = providers.get(name)
        chain.append((ep, ep.normalize_options(opts)))
    return chain


def context_target(chain: Chain) -> Reason | None:
    """Why ``chain`` gets no cached context (outcome ``bypass``), or ``None`` when ``chain[0]`` does.

    ORT gives nodes to providers in list order: a non-compiling provider first (CPU) takes them all, so
    only a compiling, available provider at the head of the list is worth a context. One rule for
    loads, :meth:`ContextCache.key` and ``explain``.
    """
    if not chain or not chain[0][0].compiles:
        text = "no execution provider given" if not chain else f"{chain[0][0].name} comes first and compiles no context"
        return Reason("nothing_to_compile", text)
    unavailable = chain[0][0].unavailable_reason()
    if unavailable is not None:
        return Reason("provider_unavailable", unavailable)
    return None


def clone_session_options(src: ort.SessionOptions | None) -> ort.SessionOptions:
    """A fresh SessionOptions with the user's settings.

    A plugin EP is added to a SessionOptions with ``add_provider_for_devices``, which ORT refuses to
    do twice on one object; copying keeps the caller's object untouched and reusable.
    """
    dst = ort.SessionOptions()
    if src is None:
        return dst
    for attr in _SO_ATTRS:
        if hasattr(src, attr):
            try:
                setattr(dst, attr, getattr(src, attr))
            except Exception:
                pass
    for key in _CONFIG_KEYS:
        try:
            dst.add_session_config_entry(key, src.get_session_config_entry(key))
        except Exception:
            pass
    return dst


# -- the state machine ----------------------------------------------------------------------------
class Loader:
    def __init__(self, cache: ContextCache) -> None:
        self.cache = cache
        self.store = cache.store
        # Versions, library digests and devices do not change within a process; a second load of any
        # model skips collecting them.
        self._env_parts: dict[str, list[tuple[str, Any]]] = {}

    # ---- helpers
    def _session(
        self, source: str | bytes, chain: Chain, target: int | None, so: ort.SessionOptions | None
    ) -> ort.InferenceSession:
        if target is None:
            names = [ep.name for ep, _ in chain]
            opts = [o for _, o in chain]
            kw: dict[str, Any] = {"providers": names, "provider_options": opts} if chain else {}
            return ort.InferenceSession(source, sess_options=clone_session_options(so), **kw)
        ep, options = chain[target]
        rest = [(e.name, o) for e, o in chain[target + 1 :]]
        return ep.session(source, clone_session_options(so), options, rest)

    def _original(
        self, model: _Model, chain: Chain, target: int | None, so: ort.SessionOptions | None
    ) -> ort.InferenceSession:
        """A session on the original model; ORT's own error if even that fails (not a cache fault)."""
        try:
            return self._session(model.source, chain, target, so)
        except Exception as e:
            if isinstance(e, (InvalidModelError, ModelNotFoundError)):
                raise
            try:
                if model.data is not None:
                    read_facts_from_bytes(model.data)
                else:
                    assert model.path is not None
                    read_facts(model.path)
            except (WireError, OSError, ValueError) as bad:
                where = str(model.path) if model.path else "<bytes>"
                raise InvalidModelError(
                    f"{where} is not a valid ONNX model ({bad}). Re-export it, or check that the download is complete.",
                    path=where,
                    detail=str(bad),
                ) from e
            raise

    def _env(self, ep: ExecutionProvider, options: dict[str, str]) -> list[tuple[str, Any]]:
        memo_key = ep.name + _fingerprint.canonical_json(options)
        parts = self._env_parts.get(memo_key)
        if parts is None:
            parts = [
                ("onnxruntime", ort.__version__),
                ("ep_versions", ep.versions()),
                ("ep_libraries", files_digest(ep.library_files(options), self.store.memo_dir)),
                ("devices", ep.device_identity(options)),
                ("host", f"{sys.platform}-{platform.machine().lower()}"),
            ]
            self._env_parts[memo_key] = parts
        return parts

    def fingerprint(
        self, digest: str, ep: ExecutionProvider, options: dict[str, str], so: ort.SessionOptions | None
    ) -> _fingerprint.Fingerprint:
        level = (so.graph_optimization_level if so is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        env = dict(self._env(ep, options))
        return _fingerprint.build(
            [
                ("format", _fingerprint.FORMAT_VERSION),
                ("model", digest),
                ("ep", ep.name),
                ("ep_options", ep.binary_options(options)),
                ("onnxruntime", env["onnxruntime"]),
                ("ep_versions", env["ep_versions"]),
                ("ep_libraries", env["ep_libraries"]),
                ("devices", env["devices"]),
                ("graph_optimization", str(level).rsplit(".", 1)[-1]),
                ("embed_mode", int(self.cache.embed)),
                ("host", env["host"]),
                ("extra", self.cache.extra_key),
            ]
        )

    def digest(self, model: _Model, *, memo: bool = True) -> ModelDigest:
        if model.data is not None:
            try:
                read_facts_from_bytes(model.data)
            except WireError as e:
                raise InvalidModelError(
                    f"<bytes> is not a valid ONNX model ({e}).", path="<bytes>", detail=str(e)
                ) from None
            return ModelDigest(bytes_digest(model.data), (), len(model.data), False)
        assert model.path is not None
        return model_digest(model.path, self.store.memo_dir if memo else None)

    # ---- entry point
    def load(
        self,
        model_arg: ModelArg,
        providers_arg: ProvidersArg,
        provider_options: Sequence[Mapping[str, Any]] | None,
        so: ort.SessionOptions | None,
    ) -> LoadResult:
        start = time.perf_counter()
        model = _model_arg(model_arg)
        chain = resolve_providers(providers_arg, provider_options)
        result = self._load(model, chain, so)
        result.timings.total = time.perf_counter() - start
        try:
            result.providers = list(result.session.get_providers())
        except Exception:
            pass
        self._report(model, result)
        return result

    def _report(self, model: _Model, result: LoadResult) -> None:
        try:
            _events.record(
                self.store.events_path,
                result.outcome,
                result.key,
                result.reason.code if result.reason else None,
                result.timings.compile,
                result.saved_seconds,
                tier=result.tier,
            )
        except OSError:
            pass
        level = logging.WARNING if result.outcome == "fallback" else logging.INFO
        why = f" ({result.reason})" if result.reason else ""
        log.log(level, "%s: %s in %.3f s%s", model.name, result.outcome, result.timings.total, why)

    def _fault(self, key: str | None, reason: Reason) -> None:
        if self.cache.strict:
            raise CacheFaultError(f"cache fault ({reason}); strict mode is on", code=reason.code, key=key)
        log.warning("cache fault for %s: %s", key[:12] if key else "-", reason)

    def _load(self, model: _Model, chain: Chain, so: ort.SessionOptions | None) -> LoadResult:
        timings = Timings()
        if not chain and so is not None and getattr(so, "has_providers", lambda: False)():
            # The app let ORT choose (set_provider_selection_policy, e.g. PREFER_NPU) or added providers
            # to its SessionOptions itself. Neither can be read back, so the provider and device ORT will
            # pick cannot be keyed before it picks them: run the app's own options untouched (a copy
            # would drop the policy) and say which provider ORT chose.
            session = ort.InferenceSession(model.source, sess_options=so)
            text = (f"the session options choose the provider (selection policy or providers added to them); "
                    f"ONNX Runtime picked {session.get_providers()[0]}. Pass providers=[...] to cache its context")
            return LoadResult(session, "bypass", reason=Reason("provider_policy", text), timings=timings)
        no_context = context_target(chain)
        if no_context is not None:
            if no_context.code == "provider_unavailable":
                # The app still gets the rest of its list, without the provider that is missing.
                chain = [(e, o) for e, o in chain[1:] if e.unavailable_reason() is None]
            return LoadResult(self._original(model, chain, None, so), "bypass", reason=no_context, timings=timings)
        target = 0
        ep, options = chain[target]

        try:
            self.store.ensure()
            unwritable = None
        except InsecureCache as e:
            unwritable = Reason("cache_insecure", f"{e.strerror}; not using it")
        except OSError as e:
            unwritable = Reason("cache_unwritable", f"cannot create cache at {self.store.root}: {e.strerror or e}")
        t = time.perf_counter()
        digest = self.digest(model, memo=unwritable is None)  # bad input raises here, before any entry changes
        timings.hash = time.perf_counter() - t
        if unwritable is not None:
            self._fault(None, unwritable)
            return LoadResult(self._original(model, chain, target, so), "bypass", reason=unwritable, timings=timings,
                              model_digest=digest.digest)
        fp = self.fingerprint(digest.digest, ep, options, so)
        key = fp.key

        def done(session: ort.InferenceSession, outcome: Outcome, reason: Reason | None = None, entry: Entry | None = None) -> LoadResult:
            saved = entry.compile_seconds if (entry is not None and outcome == "hit") else 0.0
            return LoadResult(session, outcome, key, reason, timings, entry_path=entry.path if entry else None,
                              model_digest=digest.digest, saved_seconds=saved)

        failed = self.store.failure(key, self.cache.negative_ttl)
        if failed is not None:
            remembered = failed.get("code")
            code = remembered if isinstance(remembered, str) and remembered in ("crashed_during_load", "context_unloadable") else "not_compilable"
            reason = Reason(code, f"remembered: {failed.get('message', '')}")
            return done(self._original(model, chain, target, so), "bypass", reason)

        # ---- hit?
        try:
            entry = self.store.lookup(key)
        except BrokenEntry as b:
            return self._fallback(model, chain, target, so, key, None, Reason(b.code, b.message), done)
        if entry is not None:
            session, why = self._open(entry, chain, target, so, timings)
            if session is not None:
                return done(session, "hit", entry=entry)
            assert why is not None
            return self._fallback(model, chain, target, so, key, entry, why, done)

        # ---- miss: compile under the key's lock
        return self._miss(model, chain, target, so, key, fp, digest, timings, done)

    def _open(
        self, entry: Entry, chain: Chain, target: int, so: ort.SessionOptions | None, timings: Timings,
        *, fresh: bool = False,
    ) -> tuple[ort.InferenceSession | None, Reason | None]:
        ep, _ = chain[target]
        if self.store.poisoned(entry.key):
            return None, Reason("crashed_during_load", "a process died while loading this context; not loading it again")
        problem = self.store.verify(entry, full=self.cache.verify == "full")
        if problem is not None:
            return None, Reason(*problem)
        for ep_name, info in entry.manifest.get("compat", {}).items():
            if not fresh and ep_name == ep.name and isinstance(info, str):
                verdict = ep.compatibility(info)
                if verdict is not None:
                    return None, Reason("incompatible", verdict)
        marker = self.store.mark_loading(entry.key)
        t = time.perf_counter()
        try:
            session = self._session(str(entry.context_path), chain, target, so)
        except Exception as e:
            return None, Reason("load_failed", f"{type(e).__name__}: {e}".strip()[:2000])
        finally:
            timings.load = time.perf_counter() - t
            self.store.clear_marker(marker)
        if ep.name not in session.get_providers():
            # ORT silently put the graph on CPU: never report that as the provider's session.
            return None, Reason("wrong_provider", f"the context session runs on {session.get_providers()}, not {ep.name}")
        self.store.touch(entry)
        return session, None

    def _fallback(self, model: _Model, chain: Chain, target: int, so: ort.SessionOptions | None, key: str,
                  entry: Entry | None, reason: Reason, done: _Done) -> LoadResult:
        self.invalidate_broken(key, entry, reason)
        self._fault(key, reason)
        return done(self._original(model, chain, target, so), "fallback", reason)

    def invalidate_broken(self, key: str, entry: Entry | None, reason: Reason) -> None:
        from ._locking import release, try_lock

        # Under the key's lock when it is free: a compiler holding it may be replacing this very entry
        # (it will find and handle the broken one itself). The entry_id check covers the rest.
        crashed = reason.code == "crashed_during_load"
        handle = try_lock(self.store.lock_path(key))
        if handle is None and not crashed:
            log.info("entry %s is being rebuilt by another process; leaving it to that process", key[:12])
            return
        # A crash is quarantined even when the lock is busy: the dead loader's marker is consumed now,
        # and left in place this entry would be loaded (and kill) again by the lock holder or the next
        # launch. expect_id spares an entry the holder just replaced.
        try:
            self.store.quarantine(key, reason.code, reason.message, expect_id=entry.entry_id if entry else None)
        finally:
            if handle is not None:
                release(handle)
        if crashed and self.store.crash_count(key) >= 2:
            # Recompiled once and killed its loader again: on that device it always will. Without this
            # every other launch would crash (compile, crash, fallback, compile, crash ...).
            self.store.remember_failure(
                key, "crashed_during_load",
                "its context killed the process while loading, twice (recompiled in between)",
            )

    def _miss(self, model: _Model, chain: Chain, target: int, so: ort.SessionOptions | None, key: str,
              fp: _fingerprint.Fingerprint, digest: ModelDigest, timings: Timings, done: _Done) -> LoadResult:
        import filelock

        from ._locking import key_lock

        with contextlib.ExitStack() as stack:
            try:
                waited = stack.enter_context(key_lock(self.store.lock_path(key), self.cache.lock_timeout, model.name))
            except filelock.Timeout:
                return self._lock_timeout(model, chain, target, so, key, done)
            except OSError as e:
                reason = Reason("cache_unwritable", f"cannot create lock in {self.store.locks_dir}: {e.strerror or e}")
                self._fault(key, reason)
                return done(self._original(model, chain, target, so), "bypass", reason)
            timings.lock_wait = waited.seconds
            # Look again: the process we waited for has probably published it.
            try:
                entry = self.store.lookup(key)
            except BrokenEntry as b:
                self.store.quarantine(key, b.code, b.message)
                entry = None
            if entry is not None:
                # Let go of the lock before loading: held across the session load, it made a stampede's
                # waiters load one after another (8 processes: 3.7x one compile + load; see benchmarks/).
                stack.close()
                session, why = self._open(entry, chain, target, so, timings)
                if session is not None:
                    return done(session, "hit", entry=entry)
                assert why is not None
                return self._fallback(model, chain, target, so, key, entry, why, done)
            if self.cache.tiers:
                tiered = self._from_tiers(model, chain, target, so, key, timings, done, fp.parts)
                if tiered is not None:
                    return tiered
            return self._compile_and_publish(model, chain, target, so, key, fp, digest, timings, done)

    def _from_tiers(self, model: _Model, chain: Chain, target: int, so: ort.SessionOptions | None, key: str,
                    timings: Timings, done: _Done, parts: _fingerprint.Parts = ()) -> LoadResult | None:
        """Fill the entry from a bundle / remote tier (verified, published like a compile), then open it.

        ``None`` when no tier has it (or every offer was refused): the caller compiles. A filled entry that
        fails to load is a fallback like any entry's, and the tiers are skipped for this key next time.
        """
        from . import _tiers

        t = time.perf_counter()
        filled = _tiers.fill_from_tiers(self.cache, key, parts)
        timings.fetch = time.perf_counter() - t
        if filled is None:
            return None
        entry, tier = filled
        self.cache._after_publish(entry)
        session, why = self._open(entry, chain, target, so, timings)
        if session is not None:
            result = done(session, "hit", entry=entry)
            result.tier = tier.kind
            return result
        assert why is not None
        self.store.quarantine(key, why.code, why.message, expect_id=entry.entry_id)
        _tiers.remember_rejection(self.cache, key, tier, why.code)
        self._fault(key, why)
        result = done(self._original(model, chain, target, so), "fallback", why)
        result.tier = tier.kind
        return result

    def _lock_timeout(self, model: _Model, chain: Chain, target: int, so: ort.SessionOptions | None, key: str,
                      done: _Done) -> LoadResult:
        if self.cache.on_lock_timeout == "raise":
            raise LockTimeoutError(
                f"another process kept compiling {model.name} for over {self.cache.lock_timeout} s "
                f"(lock {self.store.lock_path(key)}). Raise lock_timeout, or use on_lock_timeout='jit'.",
                lock_path=str(self.store.lock_path(key)),
                timeout=float(self.cache.lock_timeout or 0),
            )
        reason = Reason("lock_timeout", f"another process is still compiling after {self.cache.lock_timeout} s")
        return done(self._original(model, chain, target, so), "bypass", reason)

    def _compile_and_publish(self, model: _Model, chain: Chain, target: int, so: ort.SessionOptions | None, key: str,
                             fp: _fingerprint.Fingerprint, digest: ModelDigest, timings: Timings, done: _Done) -> LoadResult:
        import shutil

        ep, options = chain[target]
        try:
            self.store.ensure(force=True)
            self.store.clean_staging()
            staging = self.store.new_staging(key)
        except OSError as e:
            reason = Reason("cache_unwritable", f"cannot write in {self.store.staging_dir}: {e.strerror or e}")
            self._fault(key, reason)
            return done(self._original(model, chain, target, so), "bypass", reason)
        try:
            level = so.graph_optimization_level if so is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            severity = so.log_severity_level if so is not None else 2
            try:
                timings.compile = compile_into(staging, model.source, ep, options, level, self.cache.embed, severity)
            except NothingCompiled as e:
                self.store.remember_failure(key, "not_compilable", str(e)[:500])
                reason = Reason("not_compilable", f"{ep.name} compiled no node of this model")
                return done(self._original(model, chain, target, so), "bypass", reason)
            except CompileFailed as e:
                # A compiler that could not write its output (ORT only says "Failed to write context
                # cache file") failed for want of space, not because of the model: remembering that
                # would bypass the cache for this model for negative_ttl after the disk is freed.
                short = _low_space(staging, digest.size)
                if short is None:
                    self.store.remember_failure(key, "compile_failed", str(e)[:500])
                reason = Reason("compile_failed", (str(e) + (f" ({short}; not remembered)" if short else ""))[:2000])
                self._fault(key, reason)
                return done(self._original(model, chain, target, so), "fallback", reason)
            try:
                facts = read_facts(staging / "ctx.onnx")
                compat = {
                    k.split(".", 1)[1]: v for k, v in facts.metadata.items() if k.startswith("ep_compatibility_info.")
                }
                manifest = {
                    "parts": [list(p) for p in fp.parts],
                    "model": {"name": model.name, "path": str(model.path) if model.path else None, "size": digest.size},
                    "provider": ep.name,
                    "created": time.time(),
                    "compile_seconds": round(timings.compile, 4),
                    "compat": compat,
                    "ctxcache_version": _version(),
                }
                entry = self.store.publish(staging, key, manifest)
            except (OSError, BrokenEntry, WireError) as e:
                reason = Reason("publish_failed", f"{type(e).__name__}: {e}")
                self._fault(key, reason)
                return done(self._original(model, chain, target, so), "fallback", reason)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("compiled %s for %s in %.2f s -> %s", model.name, ep.name, timings.compile, entry.path)
        self.cache._after_publish(entry)
        session, why = self._open(entry, chain, target, so, timings, fresh=True)
        if session is not None:
            return done(session, "miss", entry=entry)
        assert why is not None
        # Only ORT's own refusal of an intact entry says the context cannot load here; an entry that
        # another process cleared, pruned or replaced in the meantime failed for that reason, once
        # (found by the soak in tests/test_reliability_concurrency.py: a concurrent clear cost the model
        # the cache for negative_ttl).
        inherent = why.code in ("load_failed", "wrong_provider") and self._intact(entry)
        self.store.quarantine(key, why.code, why.message, expect_id=entry.entry_id)
        if inherent:
            # A context that fails to load right after it was compiled here will fail the same way at the
            # next launch (measured: OpenVINO contexts on this kind of machine, 3 of 3). Remember it like a
            # compile failure, or every launch pays a compile plus a JIT session.
            self.store.remember_failure(key, "context_unloadable", f"its freshly compiled context failed to load: {why}"[:500])
        self._fault(key, why)
        return done(self._original(model, chain, target, so), "fallback", why)

    def _intact(self, entry: Entry) -> bool:
        """Whether ``entry`` is still committed, the same one (entry_id) and whole."""
        try:
            now = self.store.lookup(entry.key)
        except BrokenEntry:
            return False
        return now is not None and now.entry_id == entry.entry_id and self.store.verify(now) is None


def _low_space(folder: Path, model_size: int) -> str | None:
    """Why a failed compile in ``folder`` may be the disk's fault (too little free space), else ``None``.

    A context is about the size of the model's weights (fp16 halves them, headers add a little); less
    free space than the model plus a margin after a failure means the failure is not the model's.
    """
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"cannot check free space: {e.strerror or e}"
    if free < model_size + (16 << 20):
        return f"only {free} bytes free in {folder}"
    return None


def _version() -> str:
    from . import __version__

    return __version__
