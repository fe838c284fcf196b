"""The hit / miss / fallback / bypass state machine over one request; returns a session and a report.

    resolve inputs -> key -> remembered failure? -> look up -> verify -> session on the context   = hit
    no entry -> key lock -> look again -> a tier -> else compile -> publish -> (lock released)
             -> post-publish jobs -> session on the fresh context                             = miss
    a load or verify fault -> invalidate (quarantine, reason kept) -> session on the original   = fallback
    nothing compilable / provider missing / cache unusable -> session on the original          = bypass

The application never sees a cache fault: every fault becomes a fallback with a logged reason, unless
strict mode asks for an exception (for CI). Each step is one method reading one :class:`Request`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import onnxruntime as ort

from . import _events, _fs, _key, _negative, _side
from ._compile import CompileFailed, NothingCompiled
from ._fingerprint import Fingerprint
from ._hashing import ModelDigest, forget_model, identity, model_digest
from ._inputs import (
    Chain,
    Model,
    ProvidersArg,
    Raw,
    cache_blocker,
    check_kwargs,
    chosen_by_policy,
    compile_config,
    context_target,
    plain_session,
    resolve_model,
    resolve_providers,
    session,
)
from ._locking import KeyLock, LockStalled, release, try_lock
from ._manifest import Entry, new_manifest
from ._markers import clear as clear_marker
from ._markers import forget_deaths, mark
from ._onnxproto import WireError, read_facts
from ._seams import hooks
from ._servable import ContentCheck, judge
from ._store import BrokenEntry, InsecureCache, Store
from ._trust import Trust
from ._types import LoadResult, ModelArg, Outcome, Reason, Timings
from ._version import __version__
from .errors import CacheFaultError, CtxCacheError, LockTimeoutError
from .providers import ExecutionProvider

log = logging.getLogger("ctxcache")

# Backoff between attempts to load a context after a transient device failure (bounded: ~1 s in all).
_RETRY_PAUSES = (0.2, 0.8)


class Settings(NamedTuple):
    """The cache's policy knobs, as :class:`ContextCache` was configured."""

    strict: bool = False
    lock_timeout: float | None = 600.0
    on_lock_timeout: Literal["jit", "raise"] = "jit"
    embed: bool = False
    extra_key: str | None = None
    verify: Literal["content", "stat"] = "content"
    negative_ttl: float = 7 * 24 * 3600.0
    stall_timeout: float | None = 5.0
    trust: Trust = Trust()
    on_miss: Literal["compile", "background"] = "compile"
    meanwhile: tuple[str, ...] = ("CPUExecutionProvider",)

    def for_worker(self) -> dict[str, Any]:
        """The settings a background worker needs to make the same key and behave the same (trust and
        tiers stay with the app: the worker only compiles)."""
        return {"strict": self.strict, "lock_timeout": self.lock_timeout, "embed": self.embed,
                "extra_key": self.extra_key, "verify": self.verify, "negative_ttl": self.negative_ttl,
                "stall_timeout": self.stall_timeout}


class Request:
    """One load: its inputs, and what the steps learn about it on the way (key, timings, tier)."""

    __slots__ = ("chain", "digest", "early", "fingerprint", "kwargs", "model", "note", "raw", "sess_options", "silent",
                 "started", "tier", "times", "warm")

    def __init__(self, model: Model, chain: Chain, sess_options: ort.SessionOptions | None, *, warm: bool = False,
                 kwargs: Mapping[str, Any] | None = None, raw: Raw | None = None) -> None:
        self.model = model
        self.chain = chain
        self.sess_options = sess_options
        #: onnxruntime's own keyword arguments (checked), passed to every session of this load
        self.kwargs: dict[str, Any] = dict(kwargs) if kwargs else {}
        #: the caller's arguments as given, for a session that must be exactly onnxruntime's
        self.raw = raw if raw is not None else Raw(model.source, [e.name for e, _ in chain] or None,
                                                   [o for _, o in chain] or None)
        #: a bypass decided from the inputs alone: nothing is written, not even a stats event
        self.silent = False
        self.started = time.perf_counter()
        self.warm = warm
        self.times: dict[str, float] = {}
        self.digest: ModelDigest | None = None
        self.fingerprint: Fingerprint | None = None
        self.tier: str | None = None
        #: why a load that ends as a plain hit or miss took another way on the way (an UNSUPPORTED entry
        #: replaced, a rebuild started, a background compile not possible): reported in LoadResult.reason
        self.note: Reason | None = None
        #: on_miss="background", a model new to this cache: the meanwhile session, already being created
        self.early: Any = None

    @property
    def ep(self) -> ExecutionProvider:
        return self.chain[0][0]

    @property
    def options(self) -> dict[str, str]:
        return self.chain[0][1]

    @property
    def key(self) -> str | None:
        return self.fingerprint.key if self.fingerprint is not None else None

    def timings(self) -> Timings:
        return Timings(**self.times, total=time.perf_counter() - self.started)


class Loader:
    """Runs loads against one store. ``tiers`` gives the tier objects (built at the first miss);
    ``after_publish`` gets every entry this loader published, after the key's lock is released."""

    def __init__(self, store: Store, settings: Settings, env: _key.Environment,
                 tiers: Callable[[], Sequence[Any]], after_publish: Callable[[Entry], None]) -> None:
        self.store = store
        self.settings = settings
        self.env = env
        self._tiers = tiers
        self._after_publish = after_publish

    # ---- entry point -------------------------------------------------------------------------
    def load(self, model: ModelArg, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None,
             sess_options: ort.SessionOptions | None, *, warm: bool = False,
             kwargs: Mapping[str, Any] | None = None) -> LoadResult:
        checked = check_kwargs(kwargs) if kwargs else None
        req = Request(resolve_model(model), resolve_providers(providers, provider_options), sess_options, warm=warm,
                      kwargs=checked, raw=Raw(model, providers, provider_options))
        result = self._run(req)
        self._report(req, result)
        return result

    def fingerprint(self, req: Request) -> Fingerprint:
        """The request's key: the pure function in ``_key`` over this machine's environment parts."""
        assert req.digest is not None
        so = req.sess_options
        return _key.fingerprint(
            model_digest=req.digest.digest, ep=req.ep, options=req.options, env=self.env.parts(req.ep, req.options),
            graph_optimization=_key.graph_level_name(so.graph_optimization_level if so is not None else None),
            embed=self.settings.embed, extra=self.settings.extra_key, session_config=compile_config(so),
        )

    # ---- the steps, top-down -----------------------------------------------------------------
    def _run(self, req: Request) -> LoadResult:
        if chosen_by_policy(req.chain, req.sess_options):
            req.silent = True
            return self._policy(req)
        no_context = context_target(req.chain)
        if no_context is not None:
            # Nothing to cache for this list: exactly onnxruntime.InferenceSession with the caller's own
            # arguments (its warnings for names built for other platforms, its fallback), nothing written.
            req.silent = True
            return self._plain(req, no_context)
        blocked = cache_blocker(req.model, req.sess_options, req.kwargs)
        if blocked is not None:
            # Settings a cached context cannot honour: the provider's session on the original model,
            # with the caller's own SessionOptions object (what cannot be copied stays in it).
            req.silent = True
            return self._original(req, "bypass", blocked, whole=True)
        unusable = self._open_store()
        t = time.perf_counter()
        req.digest = req.model.digest(self.store.memo_dir if unusable is None else None)  # bad input raises here
        req.times["hash"] = time.perf_counter() - t
        if unusable is not None:
            self._fault(None, unusable)
            req.chain = _side.unmanaged(req.chain)
            return self._original(req, "bypass", unusable)
        if self.settings.on_miss == "background" and not req.digest.memo_hit and not req.warm and req.model.path:
            req.early = self._early(req)  # a first launch: its session is made while the key is worked out
        req.fingerprint = self.fingerprint(req)
        assert req.key is not None
        req.chain = _side.govern(self.store, req.key, req.chain)
        remembered = _negative.remembered(self.store.negative_dir, req.key, self.settings.negative_ttl)
        if remembered is not None:
            return self._original(req, "bypass", remembered)
        try:
            entry = self.store.lookup(req.key)
        except BrokenEntry as b:
            return self._fallback(req, None, Reason(b.code, b.message))
        if entry is not None:
            return self._serve(req, entry, "hit")
        return self._miss(req)

    def _open_store(self) -> Reason | None:
        limit = _fs.path_limit()
        if limit is not None and self.store.longest_path() >= limit:
            return Reason("cache_unwritable", f"paths under {self.store.root} would reach {self.store.longest_path()} "
                                              f"characters, over this system's {limit}-character limit: pass a shorter "
                                              "cache_dir (or enable long paths in Windows)")
        try:
            self.store.ensure()
        except InsecureCache as e:
            return Reason("cache_insecure", f"{e.strerror}; not using it")
        except OSError as e:
            return Reason("cache_unwritable", f"cannot create cache at {self.store.root}: {e.strerror or e}")
        return None

    def _serve(self, req: Request, entry: Entry, outcome: Outcome, *, fresh: bool = False) -> LoadResult:
        """A session on ``entry``'s context when the one rule allows it, else a fallback.

        With ``verify="content"`` (the default) every byte of the entry is re-hashed on a thread while
        ONNX Runtime creates the session, and the session is handed out only once the digests agree.
        An entry this process just wrote (compiled, or installed from a tier after its own checks) is
        not re-hashed again.
        """
        written_now = fresh or req.tier is not None
        content = self.settings.verify == "content" and not written_now
        env = self.env.digest(req.ep, req.options)
        why, answer, detail = judge(self.store, entry, req.ep, digests="none" if content or written_now else "changed",
                                    consume_markers=True, fresh=fresh, options=req.options, env=env)
        if why is None:
            hooks.verified(entry)
            check = ContentCheck(self.store, entry) if content else None
            marker = mark(self.store.markers_dir, entry.key)
            t = time.perf_counter()
            sess = None
            try:
                sess, why = self._load_context(req, entry)
            finally:
                req.times["load"] = req.times.get("load", 0.0) + time.perf_counter() - t
                clear_marker(marker)
            if check is not None:
                t = time.perf_counter()
                damaged = check.result()
                req.times["verify"] = time.perf_counter() - t  # the wait beyond the session creation
                if damaged is not None:
                    why, sess = damaged, None  # never hand out a session on bytes that are not the recorded ones
            if why is None and sess is not None:
                if req.ep.name in sess.get_providers():
                    self.store.touch(entry)
                    forget_deaths(self.store.markers_dir, entry.key)
                    if answer == "prefer_recompilation":
                        self._rebuild_later(req, entry, detail, env)
                    return self._finish(req, sess, outcome, entry=entry)
                # ORT silently put the graph on CPU: never report that as the provider's session.
                why = Reason("wrong_provider", f"the context session runs on {sess.get_providers()}, not {req.ep.name}")
        assert why is not None
        if why.code == "device_busy":
            # Transient is not stale: the context that took minutes to build stays for the next launch.
            log.warning("%s: %s", req.model.name, why)
            return self._original(req, "bypass", why)
        if fresh:
            return self._unloadable(req, entry, why)
        if req.tier is not None:
            return self._rejected_from_tier(req, entry, why)
        if why.code == "incompatible" and outcome == "hit":
            # UNSUPPORTED: never loaded. Out of the way, then a tier or a compile, in this very launch.
            self._invalidate(entry.key, entry, why)
            req.note = why
            return self._miss(req)
        return self._fallback(req, entry, why)

    def _rebuild_later(self, req: Request, entry: Entry, detail: str, env: str) -> None:
        """SUPPORTED_PREFER_RECOMPILATION: this launch runs the context; a detached worker rebuilds it for
        the next ones (and replaces it only once the new one loads)."""
        from . import _background

        if req.model.path is None or entry.manifest.get("rebuilt_for") == env or entry.origin is not None:
            return
        job = self._job(req, entry.key, mode="rebuild")
        state, why = _background.start(self.store, entry.key, job, negative_ttl=self.settings.negative_ttl)
        req.note = Reason("prefer_recompilation", f"{detail}; {why}" if state == "started" else f"{detail}; not rebuilt: {why}")

    def _load_context(self, req: Request, entry: Entry) -> tuple[ort.InferenceSession | None, Reason | None]:
        """The session on the entry's context; a failure the provider classes as transient (the device
        busy or short of memory) is retried with a bounded backoff and then reported as ``device_busy``."""
        for attempt, pause in enumerate((*_RETRY_PAUSES, None)):
            try:
                return session(str(entry.context_path), req.chain, req.sess_options, target=True,
                               kwargs=req.kwargs), None
            except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
                text = f"{type(e).__name__}: {e}".strip()[:2000]
                kind = req.ep.load_error_kind(text)
                if kind != "transient":
                    note = "" if kind == "artifact" else " (not a failure the provider knows; treated as the context's)"
                    return None, Reason("load_failed", text + note)
                if pause is None:
                    return None, Reason("device_busy", f"{text} ({attempt + 1} attempts; the entry is kept)")
                log.info("%s: transient load failure (%s); retrying in %.1f s", req.model.name, text[:200], pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _miss(self, req: Request) -> LoadResult:
        if self.settings.on_miss == "background":
            pending = self._background(req)
            if pending is not None:
                return pending
        return self._miss_here(req)

    def _miss_here(self, req: Request) -> LoadResult:
        import filelock

        assert req.key is not None
        lock = KeyLock(self.store.lock_path(req.key))
        try:
            req.times["lock_wait"] = lock.acquire(self.settings.lock_timeout, req.model.name,
                                                  stall_after=self.settings.stall_timeout)
        except LockStalled as e:
            req.times["lock_wait"] = time.perf_counter() - req.started
            return self._lock_timeout(req, stalled=e)
        except filelock.Timeout:
            return self._lock_timeout(req)
        except OSError as e:
            reason = Reason("cache_unwritable", f"cannot create lock in {self.store.locks_dir}: {e.strerror or e}")
            self._fault(req.key, reason)
            return self._original(req, "bypass", reason)
        with lock:
            hooks.locked(req.key)
            entry = self._look_again(req)
            outcome: Outcome = "hit"
            if entry is None and self._tiers():
                entry = self._from_tiers(req)
            if entry is None:
                built = self._compile(req)
                if isinstance(built, LoadResult):
                    return built
                entry, outcome = built, "miss"
        # The lock is released before loading: held across the session load, it made a stampede's
        # waiters load one after another (8 processes: 3.7x one compile + load; see benchmarks/).
        if outcome == "miss" or req.tier is not None:
            hooks.published(entry)
            self._after_publish(entry)
        return self._serve(req, entry, outcome, fresh=outcome == "miss")

    def _background(self, req: Request) -> LoadResult | None:
        """``on_miss="background"``: the original model on the ``meanwhile`` providers now, the compile in a
        detached process (``_background``). ``None``: do it here instead (bytes models; no process can be
        started), with the reason noted."""
        from . import _background

        assert req.key is not None
        if req.model.path is None:
            req.note = Reason("background_unavailable", "a model given as bytes is compiled in the foreground")
            return None
        handle = try_lock(self.store.lock_path(req.key))
        if handle is not None:
            # Free: nobody is compiling. Look again, then ask the tiers (fast next to a compile), here.
            try:
                entry = self._look_again(req)
                if entry is None and self._tiers():
                    entry = self._from_tiers(req)
            finally:
                release(handle)
            if entry is not None:
                if req.tier is not None:
                    hooks.published(entry)
                    self._after_publish(entry)
                return self._serve(req, entry, "hit")
        job = self._job(req, req.key)
        state, detail = _background.start(self.store, req.key, job, negative_ttl=self.settings.negative_ttl)
        if state == "unavailable":
            req.note = Reason("background_unavailable", f"{detail}; compiled in the foreground instead")
            return None
        if state == "given_up":
            return self._original(req, "bypass", Reason("not_compilable", f"remembered: {detail}"))
        return self._meanwhile(req, Reason("compiling_in_background", detail), _background.Waiter(self.store, req.key))

    def _job(self, req: Request, key: str, mode: str = "compile") -> dict[str, Any]:
        """What a background worker needs to make the same key as this load, and compile it."""
        from . import _background

        assert req.model.path is not None
        so = req.sess_options
        return _background.job_for(self.store.base, self.settings.for_worker(), req.model.path,
                                   [(req.ep.name, req.options)],
                                   _key.graph_level_name(so.graph_optimization_level if so is not None else None),
                                   compile_config(so), key, mode)

    def _meanwhile(self, req: Request, reason: Reason, waiter: object) -> LoadResult:
        """A session on the original model with the ``meanwhile`` providers (outcome ``pending``)."""
        sess = req.early.result() if req.early is not None else self._meanwhile_session(req)()
        result = self._finish(req, sess, "pending", reason)
        return result._replace_waiter(waiter)

    def _early(self, req: Request) -> Any:
        from ._background import EarlySession

        return EarlySession(self._meanwhile_session(req))

    def _meanwhile_session(self, req: Request) -> Callable[[], ort.InferenceSession]:
        """What makes the ``meanwhile`` session (now, or on the early thread)."""
        meanwhile = resolve_providers(list(self.settings.meanwhile), None)
        source, so, kwargs = req.model.source, req.sess_options, req.kwargs
        return lambda: session(source, meanwhile, so, target=False, kwargs=kwargs)

    def rebuild(self, model: ModelArg, providers: ProvidersArg, sess_options: ort.SessionOptions | None) -> None:
        """Recompile ``model``'s entry and replace it once the new context loads (the background worker's
        job when ONNX Runtime reports the current one SUPPORTED_PREFER_RECOMPILATION). Under the key's
        lock; the new context is loaded in this (worker) process before it is published, so a context
        that does not load never replaces one that does."""
        import filelock

        req = Request(resolve_model(model), resolve_providers(providers, None), sess_options)
        if (context_target(req.chain) is not None or cache_blocker(req.model, sess_options, {}) is not None
                or self._open_store() is not None):
            return
        req.digest = req.model.digest(self.store.memo_dir)
        req.fingerprint = self.fingerprint(req)
        assert req.key is not None
        req.chain = _side.govern(self.store, req.key, req.chain)
        env = self.env.digest(req.ep, req.options)
        lock = KeyLock(self.store.lock_path(req.key))
        try:
            lock.acquire(self.settings.lock_timeout, req.model.name, stall_after=self.settings.stall_timeout)
        except (filelock.Timeout, LockStalled, OSError):
            return
        with lock:
            try:
                current = self.store.lookup(req.key)
            except BrokenEntry:
                current = None
            if current is not None and current.manifest.get("rebuilt_for") == env:
                return  # rebuilt here once already: ORT still prefers a rebuild, but another would not help
            built = self._compile(req, load_first=True, extra={"rebuilt_for": env})
        if isinstance(built, Entry):
            log.info("rebuilt %s (ONNX Runtime preferred a recompiled context)", req.key[:12])
            self._after_publish(built)

    def _look_again(self, req: Request) -> Entry | None:
        """Under the lock: the process we waited for has probably published it."""
        assert req.key is not None
        try:
            return self.store.look_again(req.key)
        except BrokenEntry as b:
            self.store.quarantine(req.key, b.code, b.message)
            return None

    def _from_tiers(self, req: Request) -> Entry | None:
        """Fill the entry from a bundle / package / remote (verified, published like a compile)."""
        from .tiers import _base

        assert req.key is not None and req.fingerprint is not None
        if _negative.tiers_rejected(self.store.negative_dir, req.key, self.settings.negative_ttl):
            log.info("tiers skipped for %s: an entry from them failed to load recently", req.key[:12])
            return None
        t = time.perf_counter()
        filled = _base.fill(self.store, req.key, req.fingerprint.parts, self._tiers(), strict=self.settings.strict,
                            trust=self.settings.trust)
        req.times["fetch"] = time.perf_counter() - t
        if filled is None:
            return None
        entry, tier = filled
        req.tier = tier.kind
        return entry

    def _compile(self, req: Request, *, load_first: bool = False, extra: dict[str, Any] | None = None) -> Entry | LoadResult:
        """Compile into a private staging folder and publish it by one rename (caller holds the lock)."""
        assert req.key is not None and req.fingerprint is not None and req.digest is not None
        try:
            self.store.ensure()
            self.store.clean_staging(holding=req.key)
            staging = self.store.new_staging(req.key)
        except OSError as e:
            reason = Reason("cache_unwritable", f"cannot write in {self.store.staging_dir}: {e.strerror or e}")
            self._fault(req.key, reason)
            return self._original(req, "bypass", reason)
        so = req.sess_options
        try:
            before = self._source_identity(req)
            level = so.graph_optimization_level if so is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            severity = so.log_severity_level if so is not None else 2
            try:
                req.times["compile"] = hooks.compile(staging, req.model.source, req.ep, req.options, level,
                                                    self.settings.embed, severity, config=compile_config(so))
            except NothingCompiled as e:
                _negative.remember(self.store.negative_dir, req.key, "not_compilable", str(e))
                return self._original(req, "bypass", Reason("not_compilable", f"{req.ep.name} compiled no node of this model"))
            except CompileFailed as e:
                # A compiler that could not write its output (ORT only says "Failed to write context
                # cache file") failed for want of space, not because of the model: remembering that
                # would bypass the cache for this model for negative_ttl after the disk is freed.
                short = _low_space(staging, req.digest.size)
                if short is None:
                    _negative.remember(self.store.negative_dir, req.key, "compile_failed", str(e))
                reason = Reason("compile_failed", (str(e) + (f" ({short}; not remembered)" if short else ""))[:2000])
                self._fault(req.key, reason)
                return self._original(req, "fallback", reason)
            changed = self._source_changed(req, before)
            if changed is not None:
                self._fault(req.key, changed)
                return self._original(req, "fallback", changed)
            if load_first:
                try:
                    session(str(staging / "ctx.onnx"), req.chain, req.sess_options, target=True, kwargs=req.kwargs)
                except Exception as e:  # noqa: BLE001 - the rebuilt context does not load: keep the old one
                    log.warning("rebuilt context of %s does not load (%s); keeping the current entry", req.key[:12], e)
                    return self._original(req, "fallback", Reason("load_failed", f"{type(e).__name__}: {e}"[:2000]))
            try:
                facts = read_facts(staging / "ctx.onnx")
                compat = {k.split(".", 1)[1]: v for k, v in facts.metadata.items() if k.startswith("ep_compatibility_info.")}
                manifest = new_manifest(
                    req.fingerprint, model_name=req.model.name, model_path=str(req.model.path) if req.model.path else None,
                    model_size=req.digest.size, provider=req.ep.name, created=time.time(),
                    compile_seconds=req.times["compile"], compat=compat, version=__version__,
                )
                manifest.update(extra or {})
                entry = self.store.publish(staging, req.key, manifest)
            except (OSError, BrokenEntry, WireError) as e:
                reason = Reason("publish_failed", f"{type(e).__name__}: {e}")
                self._fault(req.key, reason)
                return self._original(req, "fallback", reason)
        finally:
            self.store.discard_staging(staging)
        log.info("compiled %s for %s in %.2f s -> %s", req.model.name, req.ep.name, req.times["compile"], entry.path)
        return entry

    def _source_identity(self, req: Request) -> list[list[object]] | None:
        if req.model.path is None or req.digest is None:
            return None  # bytes: compiled from the very object that was hashed
        try:
            return [identity(p) for p in req.digest.files]
        except OSError:
            return []  # vanished: _source_changed says so

    def _source_changed(self, req: Request, before: list[list[object]] | None) -> Reason | None:
        """Prove, before publishing, that the compiled files are the bytes the key was made of.

        The model is hashed, then compiled by path: an updater replacing it in between would get the
        new model's context published under the old bytes' key, for good. So the files are hashed again
        after the compile (no memo) and their identity (inode, ctime...) compared with the one taken just
        before it: the same digest and no change to any file during the compile means the compiler read
        the hashed bytes. Costs one more hash of the model, on the miss path only.
        """
        if before is None:
            return None
        assert req.digest is not None and req.model.path is not None
        try:
            after = [identity(p) for p in req.digest.files]
            now = model_digest(req.model.path, None).digest
        except (OSError, CtxCacheError) as e:
            now, after = f"unreadable ({e})", []
        if after == before and now == req.digest.digest:
            return None
        # The memo may have vouched for bytes that are gone (the key's digest was never these bytes):
        # drop it, so the next launch hashes the model afresh.
        forget_model(req.model.path, self.store.memo_dir)
        return Reason("source_changed", f"{req.model.path} changed while it was compiled; not publishing that "
                                        "context (the next launch compiles the model as it is then)")

    # ---- the ways a load ends ----------------------------------------------------------------
    def _finish(self, req: Request, sess: ort.InferenceSession, outcome: Outcome, reason: Reason | None = None,
                entry: Entry | None = None) -> LoadResult:
        try:
            providers = tuple(sess.get_providers())
        except Exception:  # noqa: BLE001 - a report never fails the load
            providers = ()
        return LoadResult(
            sess, outcome, req.key, reason or req.note, req.timings(), providers, entry.path if entry is not None else None,
            req.digest.digest if req.digest is not None else None, req.tier,
            entry.compile_seconds if entry is not None and outcome == "hit" else 0.0,
        )

    def _original(self, req: Request, outcome: Outcome, reason: Reason, *, target: bool = True,
                  whole: bool = False) -> LoadResult:
        """A session on the original model; ORT's own error if even that fails (not a cache fault)."""
        try:
            sess = session(req.model.source, req.chain, req.sess_options, target=target and bool(req.chain),
                           kwargs=req.kwargs, whole=whole)
        except Exception as e:
            req.model.explain_failure(e)
            raise
        return self._finish(req, sess, outcome, reason)

    def _plain(self, req: Request, reason: Reason) -> LoadResult:
        """``onnxruntime.InferenceSession`` with the caller's own arguments; ORT's own error if it fails
        (an invalid model is still said to be one)."""
        try:
            sess = plain_session(req.raw, req.sess_options, req.kwargs)
        except Exception as e:
            req.model.explain_failure(e)
            raise
        return self._finish(req, sess, "bypass", reason)

    def _policy(self, req: Request) -> LoadResult:
        # The app let ORT choose (set_provider_selection_policy, e.g. PREFER_NPU) or added providers to
        # its SessionOptions itself. Neither can be read back, so the provider and device ORT will pick
        # cannot be keyed before it picks them: run the app's own options untouched (a copy would drop
        # the policy) and say which provider ORT chose.
        sess = plain_session(req.raw, req.sess_options, req.kwargs)
        text = (f"the session options choose the provider (selection policy or providers added to them); "
                f"ONNX Runtime picked {sess.get_providers()[0]}. Pass providers=[...] to cache its context")
        return self._finish(req, sess, "bypass", Reason("provider_policy", text))

    def _fallback(self, req: Request, entry: Entry | None, reason: Reason) -> LoadResult:
        assert req.key is not None
        self._invalidate(req.key, entry, reason)
        self._fault(req.key, reason)
        return self._original(req, "fallback", reason)

    def _invalidate(self, key: str, entry: Entry | None, reason: Reason) -> None:
        crashed = reason.code == "crashed_during_load"
        # A crash is quarantined even when the lock is busy: left in place, the entry would be loaded
        # (and kill) again by the lock holder or the next launch. expect_id spares an entry replaced meanwhile.
        self.store.evict(key, reason.code, reason.message, expect_id=entry.entry_id if entry else None,
                         even_if_locked=crashed)
        if crashed and self.store.crash_count(key, since=time.time() - self.settings.negative_ttl) >= 2:
            # Recompiled once and killed its loader again: on that device it always will. Without this
            # every other launch would crash (compile, crash, fallback, compile, crash ...).
            _negative.remember(self.store.negative_dir, key, "crashed_during_load",
                               "its context killed the process while loading, twice (recompiled in between)")

    def _rejected_from_tier(self, req: Request, entry: Entry, why: Reason) -> LoadResult:
        """A tier's entry that verified but failed to load: the next launch compiles instead of fetching it."""
        assert req.key is not None
        self.store.evict(req.key, why.code, why.message, expect_id=entry.entry_id)
        _negative.remember_tier_rejection(self.store.negative_dir, req.key, req.tier or "?", why.code)
        self._fault(req.key, why)
        return self._original(req, "fallback", why)

    def _unloadable(self, req: Request, entry: Entry, why: Reason) -> LoadResult:
        """A context compiled a moment ago did not load."""
        assert req.key is not None
        # Only ORT's own refusal of an intact entry says the context cannot load here; an entry that
        # another process cleared, pruned or replaced in the meantime failed for that reason, once (a
        # concurrent clear once cost the model the cache for negative_ttl).
        inherent = why.code in ("load_failed", "wrong_provider") and self._intact(entry)
        self.store.evict(req.key, why.code, why.message, expect_id=entry.entry_id)
        if inherent:
            # It will fail the same way at the next launch (measured: OpenVINO contexts on this kind of
            # machine, 3 of 3): remember it like a compile failure, or every launch pays a compile + JIT.
            _negative.remember(self.store.negative_dir, req.key, "context_unloadable",
                               f"its freshly compiled context failed to load: {why}")
        self._fault(req.key, why)
        return self._original(req, "fallback", why)

    def _intact(self, entry: Entry) -> bool:
        """Whether ``entry`` is still committed, the same one (entry_id) and whole."""
        try:
            now = self.store.lookup(entry.key)
        except BrokenEntry:
            return False
        return now is not None and now.entry_id == entry.entry_id and self.store.verify(now) is None

    def _lock_timeout(self, req: Request, stalled: LockStalled | None = None) -> LoadResult:
        assert req.key is not None
        lock = self.store.lock_path(req.key)
        if self.settings.on_lock_timeout == "raise":
            what = (f"the process compiling {req.model.name} ({stalled.holder}) made no progress for "
                    f"{stalled.seconds:.0f} s" if stalled else
                    f"another process kept compiling {req.model.name} for over {self.settings.lock_timeout} s")
            raise LockTimeoutError(f"{what} (lock {lock}). Raise lock_timeout / stall_timeout, or use on_lock_timeout='jit'.",
                                   lock_path=str(lock), timeout=float(self.settings.lock_timeout or 0))
        if stalled is not None:
            reason = Reason("lock_stalled", f"the process compiling this model ({stalled.holder}) made no progress "
                                            f"for {stalled.seconds:.1f} s (stopped, frozen or blocked); serving the "
                                            "original model meanwhile")
        else:
            reason = Reason("lock_timeout", f"another process is still compiling after {self.settings.lock_timeout} s")
        log.warning("%s: %s", req.model.name, reason)
        return self._original(req, "bypass", reason)

    def _fault(self, key: str | None, reason: Reason) -> None:
        if self.settings.strict:
            raise CacheFaultError(f"cache fault ({reason}); strict mode is on", code=reason.code, key=key)
        log.warning("cache fault for %s: %s", key[:12] if key else "-", reason)

    def _report(self, req: Request, result: LoadResult) -> None:
        if req.silent:
            log.debug("%s: %s (%s)", req.model.name, result.outcome, result.reason)
            return
        try:
            _events.record(self.store.events_path, result.outcome, result.key,
                           result.reason.code if result.reason else None, result.timings.compile,
                           result.saved_seconds, tier=result.tier, warm=req.warm)
        except OSError:
            pass
        level = logging.WARNING if result.outcome == "fallback" else logging.INFO
        why = f" ({result.reason})" if result.reason else ""
        log.log(level, "%s: %s in %.3f s%s", req.model.name, result.outcome, result.timings.total, why)


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
