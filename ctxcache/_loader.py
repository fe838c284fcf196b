"""Executes a load's plan: returns a session and a report.

    Bypass   -> a session on the original model (onnxruntime's own where nothing was cacheable)
    Serve    -> a session on the entry's context                                             = hit
    Fallback -> quarantine the entry (reason kept), a session on the original                = fallback
    Miss     -> fill the entry (``_fill``: a tier, else a compile, here or in a worker)     = miss / pending

What to do is decided once, by :func:`ctxcache._plan.plan`; this module only carries it out, and turns
what happens on the way (a context ONNX Runtime refuses, a busy device, a lock holder that stalls) into a
fallback with a logged reason. The application never sees a cache fault, unless strict mode asks for one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnxruntime as ort

from . import _events, _key, _negative
from ._config import Config
from ._hashing import ModelDigest
from ._inputs import (
    ProvidersArg,
    Raw,
    check_kwargs,
    context_load_reason,
    plain_session,
    resolve_model,
    resolve_providers,
    session,
)
from ._log import INFO, WARNING, log
from ._manifest import Entry
from ._markers import clear as clear_marker
from ._markers import forget_deaths, mark
from ._plan import Bypass, Fallback, Inputs, Plan, Serve, plan
from ._seams import hooks
from ._servable import ContentCheck, judge
from ._store import BrokenEntry, Store
from ._trace import Trace
from ._types import LoadResult, ModelArg, Outcome, Reason
from .errors import CacheFaultError
from .providers._base import Verdict

# Backoff between attempts to load a context after a transient device failure (bounded: ~1 s in all).
_RETRY_PAUSES = (0.2, 0.8)


def make_inputs(model: ModelArg, providers: ProvidersArg, provider_options: Sequence[Mapping[str, Any]] | None,
                sess_options: ort.SessionOptions | None, *, warm: bool = False,
                kwargs: Mapping[str, Any] | None = None) -> Inputs:
    """The application's arguments, resolved and checked (bad input raises here, before anything changes)."""
    checked = check_kwargs(kwargs) if kwargs else {}
    return Inputs(resolve_model(model), resolve_providers(providers, provider_options), sess_options, checked,
                  Raw(model, providers, provider_options), warm)


def bypass_session(inputs: Inputs, decided: Bypass) -> ort.InferenceSession:
    """The session a bypass plan names (no cached context): onnxruntime's own with the caller's arguments
    (``policy``, ``plain``), or the provider's on the original model (``whole``: the caller's own
    SessionOptions object). Needs no store: the drop-in runs it before any cache folder is looked up."""
    if decided.session in ("policy", "plain"):
        return plain(inputs)
    return original_session(inputs, whole=decided.session == "whole")


def original_session(inputs: Inputs, *, target: bool = True, whole: bool = False) -> ort.InferenceSession:
    """A session on the original model; ORT's own error if even that fails (not a cache fault)."""
    try:
        return session(inputs.model.source, inputs.chain, inputs.sess_options, target=target and bool(inputs.chain),
                       kwargs=inputs.kwargs, whole=whole)
    except Exception as e:
        inputs.model.explain_failure(e)
        raise


def plain(inputs: Inputs) -> ort.InferenceSession:
    """``onnxruntime.InferenceSession`` with the caller's own arguments; ORT's own error if it fails
    (an invalid model is still said to be one)."""
    try:
        return plain_session(inputs.as_raw(), inputs.sess_options, inputs.kwargs)
    except Exception as e:
        inputs.model.explain_failure(e)
        raise


class Loader:
    """Runs loads against one store. ``tiers`` gives the tier objects (built at the first miss);
    ``after_publish`` gets every entry this loader published, after the key's lock is released."""

    def __init__(self, store: Store, config: Config, env: _key.Environment,
                 tiers: Callable[[], Sequence[Any]], after_publish: Callable[[Entry], None]) -> None:
        self.store = store
        self.config = config
        self.env = env
        self.tiers = tiers
        self.after_publish = after_publish

    def plan(self, inputs: Inputs, *, act: bool = False) -> Plan:
        return plan(inputs, self.store, self.env, self.config, act=act)

    # ---- entry point -------------------------------------------------------------------------
    def load(self, inputs: Inputs) -> LoadResult:
        trace = Trace()

        def first_launch(digest: ModelDigest) -> None:
            # A model this cache has not seen (its bytes were just hashed) in background mode: a miss is near
            # certain, so its meanwhile session is made on a thread while the key is worked out.
            if (self.config.on_miss == "background" and not digest.memo_hit and not inputs.warm
                    and inputs.model.path is not None):
                from . import _fill
                from ._background import EarlySession

                trace.early = EarlySession(_fill.meanwhile_session(self, inputs))

        t = time.perf_counter()
        decided = plan(inputs, self.store, self.env, self.config, act=True, on_digest=first_launch)
        trace.times["hash"] = time.perf_counter() - t  # the digests, the key and the plan's checks
        result = self.execute(inputs, decided, trace)
        self._report(inputs, decided, result)
        return result

    def execute(self, inputs: Inputs, decided: Plan, trace: Trace) -> LoadResult:
        trace.digest = decided.digest.digest if decided.digest is not None else None
        if isinstance(decided, Bypass):
            trace.key = decided.fingerprint.key if decided.fingerprint is not None else None
            inputs = self._provider_caches(inputs, trace.key)
            if decided.fault:
                self.fault(trace.key, decided.reason)
            return self.bypass(inputs, trace, decided)
        trace.key = decided.key
        inputs = self._provider_caches(inputs, trace.key)
        if isinstance(decided, Serve):
            return self.serve(inputs, trace, decided.entry, "hit", answer=decided.answer, detail=decided.detail,
                              checked=decided.checked)
        if isinstance(decided, Fallback):
            return self.fallback(inputs, trace, decided.entry, decided.reason)
        from . import _fill

        return _fill.miss(self, inputs, trace, decided)

    def _provider_caches(self, inputs: Inputs, key: str | None) -> Inputs:
        """The provider's own caches (OpenVINO ``cache_dir``, TensorRT engines) in the key's folder, or off
        without a key (``_side``); imported only by loads that ask for one, so a hit pays nothing."""
        if not inputs.chain or not inputs.ep.side_cache_layout(inputs.options):
            return inputs
        from . import _side

        return _side.inputs_for(self.store, key, inputs)

    # ---- the ways a load ends ----------------------------------------------------------------
    def bypass(self, inputs: Inputs, trace: Trace, decided: Bypass) -> LoadResult:
        sess = bypass_session(inputs, decided)
        reason = decided.reason
        if decided.session == "policy":
            reason = Reason("provider_policy", f"{reason.message}; ONNX Runtime picked {sess.get_providers()[0]}")
        return self.finish(trace, sess, "bypass", reason)

    def serve(self, inputs: Inputs, trace: Trace, entry: Entry, outcome: Outcome, *, answer: Verdict = "unknown",
              detail: str = "", checked: bool = False, fresh: bool = False) -> LoadResult:
        """A session on ``entry``'s context. A planned entry was judged by the plan (its bytes re-hashed
        there with ``verify="content"``, before any reaches the provider); ``verify="concurrent"`` re-hashes
        them on a thread while ONNX Runtime creates the session and hands the session out only once the
        digests agree. An entry this process just wrote (``fresh``, or from a tier) is judged here, its
        bytes not re-hashed again."""
        written_now = fresh or trace.tier is not None
        if written_now:
            why, answer, detail = judge(self.store, entry, inputs.ep, digests="none", consume_markers=True, fresh=fresh,
                                        options=inputs.options, env=self.env.digest(inputs.ep, inputs.options))
            if why is not None:
                return self._refused(inputs, trace, entry, why, outcome, fresh)
        hooks.verified(entry)
        concurrent = not checked and not written_now and self.config.verify == "concurrent"
        check = ContentCheck(self.store, entry) if concurrent else None
        marker = mark(self.store.markers_dir, entry.key)
        t = time.perf_counter()
        try:
            sess, why = self._load_context(inputs, entry)
        finally:
            trace.times["load"] = trace.times.get("load", 0.0) + time.perf_counter() - t
            clear_marker(marker)
        if check is not None:
            t = time.perf_counter()
            damaged = check.result()
            trace.times["verify"] = time.perf_counter() - t  # the wait beyond the session creation
            if damaged is not None:
                why, sess = damaged, None  # never hand out a session on bytes that are not the recorded ones
        if why is None and sess is not None:
            if inputs.ep.name in sess.get_providers():
                self.store.touch(entry)
                forget_deaths(self.store.markers_dir, entry.key)
                if answer == "prefer_recompilation":
                    from . import _fill

                    _fill.rebuild_later(self, inputs, trace, entry, detail)
                return self.finish(trace, sess, outcome, entry=entry)
            # ORT silently put the graph on CPU: never report that as the provider's session.
            why = Reason("wrong_provider", f"the context session runs on {sess.get_providers()}, not {inputs.ep.name}")
        assert why is not None
        return self._refused(inputs, trace, entry, why, outcome, fresh)

    def _refused(self, inputs: Inputs, trace: Trace, entry: Entry, why: Reason, outcome: Outcome,
                 fresh: bool) -> LoadResult:
        if why.code == "device_busy":
            # Transient is not stale: the context that took minutes to build stays for the next launch.
            log.warning("%s: %s", inputs.model.shown, why)
            return self.original(inputs, trace, "bypass", why)
        if fresh:
            return self._unloadable(inputs, trace, entry, why)
        if trace.tier is not None:
            return self._rejected_from_tier(inputs, trace, entry, why)
        return self.fallback(inputs, trace, entry, why)

    def _load_context(self, inputs: Inputs, entry: Entry) -> tuple[ort.InferenceSession | None, Reason | None]:
        """The session on the entry's context; a failure the provider classes as transient (the device
        busy or short of memory) is retried with a bounded backoff and then reported as ``device_busy``."""
        for attempt, pause in enumerate((*_RETRY_PAUSES, None)):
            try:
                return session(str(entry.context_path), inputs.chain, inputs.sess_options, target=True,
                               kwargs=inputs.kwargs, context=True), None
            except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
                why, transient = context_load_reason(inputs.ep, e)
                if not transient:
                    return None, why
                text = why.message
                if pause is None:
                    return None, Reason("device_busy", f"{text} ({attempt + 1} attempts; the entry is kept)")
                log.info("%s: transient load failure (%s); retrying in %.1f s", inputs.model.shown, text[:200], pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def finish(self, trace: Trace, sess: ort.InferenceSession, outcome: Outcome, reason: Reason | None = None,
               entry: Entry | None = None) -> LoadResult:
        try:
            providers = tuple(sess.get_providers())
        except Exception:  # noqa: BLE001 - a report never fails the load
            providers = ()
        return LoadResult(
            sess, outcome, trace.key, reason or trace.note, trace.timings(), providers,
            entry.path if entry is not None else None, trace.digest, trace.tier,
            entry.compile_seconds if entry is not None and outcome == "hit" else 0.0,
        )

    def original(self, inputs: Inputs, trace: Trace, outcome: Outcome, reason: Reason, *, target: bool = True,
                 whole: bool = False) -> LoadResult:
        return self.finish(trace, original_session(inputs, target=target, whole=whole), outcome, reason)

    def fallback(self, inputs: Inputs, trace: Trace, entry: Entry | None, reason: Reason) -> LoadResult:
        assert trace.key is not None
        self.invalidate(trace.key, entry, reason)
        self.fault(trace.key, reason)
        return self.original(inputs, trace, "fallback", reason)

    def invalidate(self, key: str, entry: Entry | None, reason: Reason) -> None:
        crashed = reason.code == "crashed_during_load"
        # A crash is quarantined even when the lock is busy: left in place, the entry would be loaded
        # (and kill) again by the lock holder or the next launch. expect_id spares an entry replaced meanwhile.
        self.store.evict(key, reason.code, reason.message, expect_id=entry.entry_id if entry else None,
                         even_if_locked=crashed)
        if crashed and self.store.crash_count(key, since=time.time() - self.config.negative_ttl) >= 2:
            # Recompiled once and killed its loader again: on that device it always will. Without this
            # every other launch would crash (compile, crash, fallback, compile, crash ...).
            _negative.remember(self.store.negative_dir, key, "crashed_during_load",
                               "its context killed the process while loading, twice (recompiled in between)")

    def _rejected_from_tier(self, inputs: Inputs, trace: Trace, entry: Entry, why: Reason) -> LoadResult:
        """A tier's entry that verified but failed to load: the next launch compiles instead of fetching it."""
        assert trace.key is not None
        self.store.evict(trace.key, why.code, why.message, expect_id=entry.entry_id)
        _negative.remember_tier_rejection(self.store.negative_dir, trace.key, trace.tier or "?", why.code)
        self.fault(trace.key, why)
        return self.original(inputs, trace, "fallback", why)

    def _unloadable(self, inputs: Inputs, trace: Trace, entry: Entry, why: Reason) -> LoadResult:
        """A context compiled a moment ago did not load."""
        assert trace.key is not None
        # Only ORT's own refusal of an intact entry says the context cannot load here; an entry that
        # another process cleared, pruned or replaced in the meantime failed for that reason, once (a
        # concurrent clear once cost the model the cache for negative_ttl).
        inherent = why.code in ("load_failed", "context_recompiles", "wrong_provider") and self.intact(entry)
        self.store.evict(trace.key, why.code, why.message, expect_id=entry.entry_id)
        if inherent:
            # It will fail the same way at the next launch (measured: OpenVINO contexts on this kind of
            # machine, 3 of 3): remember it like a compile failure, or every launch pays a compile + JIT.
            _negative.remember(self.store.negative_dir, trace.key, "context_unloadable",
                               f"its freshly compiled context failed to load: {why}")
        self.fault(trace.key, why)
        return self.original(inputs, trace, "fallback", why)

    def intact(self, entry: Entry) -> bool:
        """Whether ``entry`` is still committed, the same one (entry_id) and whole."""
        try:
            now = self.store.lookup(entry.key)
        except BrokenEntry:
            return False
        return now is not None and now.entry_id == entry.entry_id and self.store.verify(now) is None

    def fault(self, key: str | None, reason: Reason) -> None:
        if self.config.strict:
            raise CacheFaultError(f"cache fault ({reason}); strict mode is on", code=reason.code, key=key)
        log.warning("cache fault for %s: %s", key[:12] if key else "-", reason)

    def _report(self, inputs: Inputs, decided: Plan, result: LoadResult) -> None:
        if isinstance(decided, Bypass) and decided.silent:
            log.debug("%s: %s (%s)", inputs.model.shown, result.outcome, result.reason)
            return
        try:
            _events.record(self.store.events_path, result.outcome, result.key,
                           result.reason.code if result.reason else None, result.timings.compile,
                           result.saved_seconds, tier=result.tier, warm=inputs.warm)
        except OSError:
            pass
        level = WARNING if result.outcome == "fallback" else INFO
        why = f" ({result.reason})" if result.reason else ""
        log.log(level, "%s: %s in %.3f s%s", inputs.model.shown, result.outcome, result.timings.total, why)
