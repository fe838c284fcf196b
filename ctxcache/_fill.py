"""Carrying out a :class:`~ctxcache._plan.Miss`: fill the key's entry from a tier or a compile, here or in a
detached worker, and the rebuild of an entry ONNX Runtime prefers recompiled.

    here:       key lock -> look again -> a tier -> else compile into staging -> publish (one rename)
                -> lock released -> post-publish jobs -> session on the fresh context           = miss
    background: (lock free: look again, a tier) else start one worker -> meanwhile session      = pending
    pending:    a worker is compiling it already -> meanwhile session                          = pending
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import onnxruntime as ort

from . import _negative
from ._compile import CompileFailed, NothingCompiled
from ._hashing import forget_model, identity, model_digest
from ._inputs import compile_config, resolve_providers, session
from ._locking import KeyLock, LockStalled, release, try_lock
from ._manifest import Entry, new_manifest
from ._onnxproto import WireError, read_facts
from ._plan import Inputs, Miss
from ._seams import hooks
from ._store import BrokenEntry
from ._trace import Trace
from ._types import LoadResult, Outcome, Reason
from ._version import __version__
from .errors import CtxCacheError, LockTimeoutError

if TYPE_CHECKING:
    from ._loader import Loader

log = logging.getLogger("ctxcache")


class Failed(NamedTuple):
    """A compile that published nothing: how the load ends, and why (already logged as a fault)."""

    outcome: Outcome
    reason: Reason


def miss(loader: Loader, inputs: Inputs, trace: Trace, decided: Miss) -> LoadResult:
    if decided.replace is not None:
        loader.invalidate(decided.key, decided.replace, decided.note or Reason("incompatible", "unsupported here"))
    if decided.note is not None:
        trace.note = decided.note
    if decided.mode == "pending":
        why = decided.note if decided.note is not None and decided.note.code == "lock_stalled" else \
            Reason("compiling_in_background", "a compile of this model is already running in another process")
        return meanwhile(loader, inputs, trace, why, decided.key)
    if decided.mode == "background":
        pending = background(loader, inputs, trace, decided)
        if pending is not None:
            return pending
    return here(loader, inputs, trace, decided)


def here(loader: Loader, inputs: Inputs, trace: Trace, decided: Miss) -> LoadResult:
    import filelock

    store, config = loader.store, loader.config
    lock = KeyLock(store.lock_path(decided.key))
    try:
        trace.times["lock_wait"] = lock.acquire(config.lock_timeout, inputs.model.shown, stall_after=config.stall_timeout)
    except LockStalled as e:
        trace.times["lock_wait"] = time.perf_counter() - trace.started
        return lock_timeout(loader, inputs, trace, e)
    except filelock.Timeout:
        return lock_timeout(loader, inputs, trace)
    except OSError as e:
        reason = Reason("cache_unwritable", f"cannot create lock in {store.locks_dir}: {e.strerror or e}")
        loader.fault(decided.key, reason)
        return loader.original(inputs, trace, "bypass", reason)
    with lock:
        hooks.locked(decided.key)
        entry = look_again(loader, decided.key)
        outcome: Outcome = "hit"
        if entry is None and loader.tiers():
            entry = from_tiers(loader, trace, decided)
        if entry is None:
            built = compile_entry(loader, trace, inputs, decided)
            if isinstance(built, Failed):
                return loader.original(inputs, trace, built.outcome, built.reason)
            entry, outcome = built, "miss"
    # The lock is released before loading: held across the session load, it made a stampede's
    # waiters load one after another (8 processes: 3.7x one compile + load; see benchmarks/).
    if outcome == "miss" or trace.tier is not None:
        hooks.published(entry)
        loader.after_publish(entry)
    if outcome == "hit" and trace.tier is None:
        return found(loader, inputs, trace, decided, entry)
    return loader.serve(inputs, trace, entry, outcome, fresh=outcome == "miss")


def found(loader: Loader, inputs: Inputs, trace: Trace, decided: Miss, entry: Entry) -> LoadResult:
    """An entry another process published after this load's plan was made (found by looking again): judged
    by the plan's own rule for a committed entry (trust, files, every byte, the verdict), as any hit is."""
    from ._plan import Serve, of_entry

    again = of_entry(inputs, loader.store, loader.env, loader.config, decided.fingerprint, decided.digest, entry,
                     act=True)
    if not isinstance(again, Serve):
        return loader.execute(inputs, again, trace)
    return loader.serve(inputs, trace, again.entry, "hit", answer=again.answer, detail=again.detail,
                        checked=again.checked)


def background(loader: Loader, inputs: Inputs, trace: Trace, decided: Miss) -> LoadResult | None:
    """The original model on the ``meanwhile`` providers now, the compile in a detached process.
    ``None``: do it here instead (no process could be started), with the reason noted."""
    from . import _background

    store = loader.store
    handle = try_lock(store.lock_path(decided.key))
    if handle is not None:
        # Free: nobody is compiling. Look again, then ask the tiers (fast next to a compile), here.
        try:
            entry = look_again(loader, decided.key)
            if entry is None and loader.tiers():
                entry = from_tiers(loader, trace, decided)
        finally:
            release(handle)
        if entry is not None:
            if trace.tier is None:
                return found(loader, inputs, trace, decided, entry)
            hooks.published(entry)
            loader.after_publish(entry)
            return loader.serve(inputs, trace, entry, "hit")
    def give_up(why: str) -> None:
        _negative.remember(store.negative_dir, decided.key, "compile_failed", why)

    state, detail = _background.start(store, decided.key, job(loader, inputs, decided.key), give_up=give_up)
    if state == "unavailable":
        trace.note = Reason("background_unavailable", f"{detail}; compiled in the foreground instead")
        return None
    if state == "given_up":
        return loader.original(inputs, trace, "bypass", Reason("not_compilable", f"remembered: {detail}"))
    return meanwhile(loader, inputs, trace, Reason("compiling_in_background", detail), decided.key)


def job(loader: Loader, inputs: Inputs, key: str, mode: str = "compile") -> dict[str, Any]:
    """What a background worker needs to make the same plan as this load: the whole configuration, the
    model, the providers and the session settings that are key parts."""
    from . import _key

    assert inputs.model.path is not None
    so = inputs.sess_options
    return {"config": loader.config.to_json(), "model": str(inputs.model.path),
            "providers": [[inputs.ep.name, inputs.options]],
            "graph_optimization": _key.graph_level_name(so.graph_optimization_level if so is not None else None),
            "session_config": compile_config(so), "key": key, "mode": mode}


def meanwhile(loader: Loader, inputs: Inputs, trace: Trace, reason: Reason, key: str) -> LoadResult:
    """A session on the original model with the ``meanwhile`` providers (outcome ``pending``)."""
    from ._background import Waiter

    sess = trace.early.result() if trace.early is not None else meanwhile_session(loader, inputs)()
    result = loader.finish(trace, sess, "pending", reason)
    return result._replace_waiter(Waiter(loader.store, key))


def meanwhile_session(loader: Loader, inputs: Inputs) -> Callable[[], ort.InferenceSession]:
    """What makes the ``meanwhile`` session (now, or on the early thread)."""
    chain = resolve_providers(list(loader.config.meanwhile), None)
    source, so, kwargs = inputs.model.source, inputs.sess_options, inputs.kwargs
    return lambda: session(source, chain, so, target=False, kwargs=kwargs)


def look_again(loader: Loader, key: str) -> Entry | None:
    """Under the lock: the process we waited for has probably published it."""
    try:
        return loader.store.look_again(key)
    except BrokenEntry as b:
        loader.store.quarantine(key, b.code, b.message)
        return None


def from_tiers(loader: Loader, trace: Trace, decided: Miss) -> Entry | None:
    """Fill the entry from a bundle / package / remote (verified, published like a compile)."""
    from .tiers import _base

    store, config = loader.store, loader.config
    if _negative.tiers_rejected(store.negative_dir, decided.key, config.negative_ttl):
        log.info("tiers skipped for %s: an entry from them failed to load recently", decided.key[:12])
        return None
    t = time.perf_counter()
    filled = _base.fill(store, decided.key, decided.fingerprint.parts, loader.tiers(), strict=config.strict,
                        trust=config.trust)
    trace.times["fetch"] = time.perf_counter() - t
    if filled is None:
        return None
    entry, tier = filled
    trace.tier = tier.kind
    return entry


def compile_entry(loader: Loader, trace: Trace, inputs: Inputs, decided: Miss, *, rebuild: bool = False,
                  extra: dict[str, Any] | None = None) -> Entry | Failed:
    """Compile into a private staging folder and publish it by one rename (caller holds the lock).

    ``rebuild``: replacing an entry that still serves. The new context must load in this process before it
    is published, and a failure is the rebuild's (remembered for its environment, with backoff), never
    the key's: the old entry keeps serving.
    """
    store, key = loader.store, decided.key
    with ExitStack() as stack:
        try:
            store.ensure()
            store.clean_staging(holding=key)
            staging = stack.enter_context(store.staging(key))
        except OSError as e:
            reason = Reason("cache_unwritable", f"cannot write in {store.staging_dir}: {e.strerror or e}")
            loader.fault(key, reason)
            return Failed("bypass", reason)
        built = _build(loader, inputs, trace, decided, staging, rebuild=rebuild, extra=extra)
        if isinstance(built, Failed):
            return built
    log.info("compiled %s for %s in %.2f s -> %s", inputs.model.shown, inputs.ep.name, trace.times["compile"], built.path)
    return built


def _build(loader: Loader, inputs: Inputs, trace: Trace, decided: Miss, staging: Path, *, rebuild: bool,
           extra: dict[str, Any] | None) -> Entry | Failed:
    store, key = loader.store, decided.key
    so = inputs.sess_options
    before = _source_identity(inputs, decided)
    level = so.graph_optimization_level if so is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    severity = so.log_severity_level if so is not None else 2
    try:
        trace.times["compile"] = hooks.compile(staging, inputs.model.source, inputs.ep, inputs.options, level,
                                               loader.config.embed, severity, config=compile_config(so))
    except NothingCompiled as e:
        if not rebuild:
            _negative.remember(store.negative_dir, key, "not_compilable", str(e))
        return Failed("bypass", Reason("not_compilable", str(e)))  # names open input dimensions and the fix
    except CompileFailed as e:
        # A compiler that could not write its output (ORT only says "Failed to write context cache
        # file") failed for want of space, not because of the model: remembering that would bypass
        # the cache for this model for negative_ttl after the disk is freed.
        short = _low_space(staging, decided.digest.size)
        if short is None and not rebuild:
            _negative.remember(store.negative_dir, key, "compile_failed", str(e))
        reason = Reason("compile_failed", (str(e) + (f" ({short}; not remembered)" if short else ""))[:2000])
        loader.fault(key, reason)
        return Failed("fallback", reason)
    changed = _source_changed(loader, inputs, decided, before)
    if changed is not None:
        loader.fault(key, changed)
        return Failed("fallback", changed)
    if rebuild:
        try:
            session(str(staging / "ctx.onnx"), inputs.chain, so, target=True, kwargs=inputs.kwargs, context=True)
        except Exception as e:  # noqa: BLE001 - the rebuilt context does not load: keep the old one
            log.warning("rebuilt context of %s does not load (%s); keeping the current entry", key[:12], e)
            return Failed("fallback", Reason("load_failed", f"{type(e).__name__}: {e}"[:2000]))
    try:
        facts = read_facts(staging / "ctx.onnx")
        compat = {k.split(".", 1)[1]: v for k, v in facts.metadata.items() if k.startswith("ep_compatibility_info.")}
        manifest = new_manifest(
            decided.fingerprint, model_name=inputs.model.name,
            model_path=str(inputs.model.path) if inputs.model.path else None, model_size=decided.digest.size,
            provider=inputs.ep.name, created=time.time(), compile_seconds=trace.times["compile"], compat=compat,
            version=__version__,
        )
        manifest.update(extra or {})
        return store.publish(staging, key, manifest)
    except (OSError, BrokenEntry, WireError) as e:
        reason = Reason("publish_failed", f"{type(e).__name__}: {e}")
        loader.fault(key, reason)
        return Failed("fallback", reason)


def _source_identity(inputs: Inputs, decided: Miss) -> list[list[object]] | None:
    if inputs.model.path is None:
        return None  # bytes: compiled from the very object that was hashed
    try:
        return [identity(p) for p in decided.digest.files]
    except OSError:
        return []  # vanished: _source_changed says so


def _source_changed(loader: Loader, inputs: Inputs, decided: Miss, before: list[list[object]] | None) -> Reason | None:
    """Prove, before publishing, that the compiled files are the bytes the key was made of.

    The model is hashed, then compiled by path: an updater replacing it in between would get the new
    model's context published under the old bytes' key, for good. So the files are hashed again after the
    compile (no memo) and their identity (inode, ctime...) compared with the one taken just before it.
    Costs one more hash of the model, on the miss path only.
    """
    if before is None:
        return None
    assert inputs.model.path is not None
    try:
        after = [identity(p) for p in decided.digest.files]
        now = model_digest(inputs.model.path, None).digest
    except (OSError, CtxCacheError) as e:
        now, after = f"unreadable ({e})", []
    if after == before and now == decided.digest.digest:
        return None
    # The memo may have vouched for bytes that are gone: drop it, so the next launch hashes afresh.
    forget_model(inputs.model.path, loader.store.memo_dir)
    return Reason("source_changed", f"{inputs.model.path} changed while it was compiled; not publishing that "
                                    "context (the next launch compiles the model as it is then)")


# ---- rebuilds (ONNX Runtime prefers a recompiled context) -----------------------------------------------
def rebuild_later(loader: Loader, inputs: Inputs, trace: Trace, entry: Entry, detail: str) -> None:
    """SUPPORTED_PREFER_RECOMPILATION: this launch runs the context; a detached worker rebuilds it for the
    next ones, and replaces it only once the new one loads. A failed rebuild is remembered for this
    environment and retried with backoff, never at every launch, and never costs the working entry."""
    from . import _background

    store = loader.store
    env = loader.env.digest(inputs.ep, inputs.options)
    if inputs.model.path is None or entry.manifest.get("rebuilt_for") == env or entry.origin is not None:
        return
    failed, waiting = _negative.rebuild_failed(store.negative_dir, entry.key, env)
    if waiting:
        trace.note = Reason("prefer_recompilation", f"{detail}; not rebuilt now: {failed.message if failed else ''}")
        return

    def give_up(why: str) -> None:
        _negative.remember_rebuild_failure(store.negative_dir, entry.key, env, why)

    state, why = _background.start(store, entry.key, job(loader, inputs, entry.key, mode="rebuild"), give_up=give_up)
    trace.note = Reason("prefer_recompilation", f"{detail}; {why}" if state == "started" else f"{detail}; not rebuilt: {why}")


def rebuild(loader: Loader, inputs: Inputs) -> str:
    """Recompile the entry a load of ``inputs`` serves, and replace it once the new context loads in this
    process (the background worker's job when ONNX Runtime reports the current one
    SUPPORTED_PREFER_RECOMPILATION). Under the key's lock. Returns what happened, in words."""
    import filelock

    from ._plan import Serve

    decided = loader.plan(inputs)
    if not isinstance(decided, Serve):
        return f"nothing to rebuild: a load would not serve an entry ({type(decided).__name__})"
    store = loader.store
    env = loader.env.digest(inputs.ep, inputs.options)
    if decided.entry.manifest.get("rebuilt_for") == env:
        return "rebuilt here once already: ONNX Runtime still prefers a rebuild, but another would not help"
    lock = KeyLock(store.lock_path(decided.key))
    try:
        lock.acquire(loader.config.lock_timeout, inputs.model.shown, stall_after=loader.config.stall_timeout)
    except (filelock.Timeout, LockStalled, OSError) as e:
        return f"not rebuilt now: the key's lock ({e})"
    trace = Trace()
    trace.key = decided.key
    with lock:
        current = look_again(loader, decided.key)
        if current is None or current.entry_id != decided.entry.entry_id:
            return "not rebuilt: the entry was replaced or removed meanwhile"
        built = compile_entry(loader, trace, inputs, Miss(decided.fingerprint, decided.digest), rebuild=True,
                              extra={"rebuilt_for": env})
    if isinstance(built, Failed):
        _negative.remember_rebuild_failure(store.negative_dir, decided.key, env, str(built.reason))
        return f"rebuild failed; the current entry keeps serving ({built.reason})"
    _negative.forget_rebuild(store.negative_dir, decided.key)
    log.info("rebuilt %s (ONNX Runtime preferred a recompiled context)", decided.key[:12])
    loader.after_publish(built)
    return "rebuilt"


def lock_timeout(loader: Loader, inputs: Inputs, trace: Trace, stalled: LockStalled | None = None) -> LoadResult:
    assert trace.key is not None
    config = loader.config
    lock = loader.store.lock_path(trace.key)
    if config.on_lock_timeout == "raise":
        what = (f"the process compiling {inputs.model.shown} ({stalled.holder}) made no progress for "
                f"{stalled.seconds:.0f} s" if stalled else
                f"another process kept compiling {inputs.model.shown} for over {config.lock_timeout} s")
        raise LockTimeoutError(f"{what} (lock {lock}). Raise lock_timeout / stall_timeout, or use on_lock_timeout='jit'.",
                               lock_path=str(lock), timeout=float(config.lock_timeout or 0))
    if stalled is not None:
        reason = Reason("lock_stalled", f"the process compiling this model ({stalled.holder}) made no progress "
                                        f"for {stalled.seconds:.1f} s (stopped, frozen or blocked); serving the "
                                        "original model meanwhile")
    else:
        reason = Reason("lock_timeout", f"another process is still compiling after {config.lock_timeout} s")
    log.warning("%s: %s", inputs.model.shown, reason)
    return loader.original(inputs, trace, "bypass", reason)


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
