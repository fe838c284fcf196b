"""The small public value types every layer shares: outcomes, reason codes, timings, the load result.

Reason codes are defined here once, with what each means; README's table is checked against
:data:`REASONS` by a test, so the two cannot drift.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from ._record import Record

if TYPE_CHECKING:
    import onnxruntime as ort

Outcome = Literal["hit", "miss", "fallback", "bypass", "pending"]

ReasonCode = Literal[
    # bypass: nothing to cache, or the cache cannot be used now
    "nothing_to_compile",
    "provider_unavailable",
    "provider_policy",
    "session_settings",
    "ort_format",
    "not_compilable",
    "context_unloadable",
    "cache_unwritable",
    "cache_insecure",
    "lock_timeout",
    "lock_stalled",
    "device_busy",
    "background_unavailable",
    "prefer_recompilation",
    # fallback: the entry was judged unusable and invalidated
    "manifest_missing",
    "manifest_corrupt",
    "manifest_unreadable",
    "entry_not_folder",
    "artifact_missing",
    "artifact_size",
    "artifact_digest",
    "artifact_not_regular",
    "artifact_unreadable",
    "unsafe_context",
    "incompatible",
    "load_failed",
    "context_recompiles",
    "wrong_provider",
    "crashed_during_load",
    "signer_revoked",
    "tuf_revoked",
    "tuf_unverifiable",
    # fallback: compiling or publishing did not produce an entry
    "compile_failed",
    "publish_failed",
    "source_changed",
    # pending: served on the meanwhile providers while the context compiles elsewhere
    "compiling_in_background",
]

#: Every reason code, with the outcome it comes with and what it means. One table for the code, the
#: README and the CLI.
REASONS: dict[str, tuple[str, str]] = {
    "nothing_to_compile": ("bypass", "no provider that compiles an EP context comes first in the list (CPU, Azure, CUDA, "
                                     "DirectML, none): exactly onnxruntime.InferenceSession, nothing written"),
    "provider_unavailable": ("bypass", "the provider is not installed or lists no device here"),
    "provider_policy": ("bypass", "the session options let ONNX Runtime pick the provider (a selection policy)"),
    "session_settings": ("bypass", "the session settings ask for what a cached context cannot give (optimized_model_filepath, "
                                   "add_initializer, custom-op libraries, disabled_optimizers, ep.context_enable...): "
                                   "the provider's session on the original model, on the caller's own options"),
    "ort_format": ("bypass", "an ORT-format model (.ort): no provider compiles it into an EP context"),
    "not_compilable": ("bypass", "the provider compiled no node of this model (remembered for negative_ttl); open "
                                 "input dimensions are named, with the override that fixes them"),
    "context_unloadable": ("bypass", "a freshly compiled context of this key failed to load (remembered for negative_ttl)"),
    "cache_unwritable": ("bypass", "the cache folder cannot be created or written"),
    "cache_insecure": ("bypass", "a cache folder is owned or writable by another user; the cache is not used"),
    "lock_timeout": ("bypass", "another process held the key's lock past lock_timeout"),
    "lock_stalled": ("bypass", "the holder of the key's lock made no progress for stall_timeout (stopped, frozen, blocked); "
                               "in background mode the launch keeps its meanwhile session (outcome pending)"),
    "device_busy": ("bypass", "the device refused the context for a transient reason (busy, out of memory) even after "
                              "retries: the original model is served and the entry kept"),
    "background_unavailable": ("miss", "on_miss='background', but no background process can be started here "
                                       "(a frozen app, no interpreter, a model given as bytes): compiled in the foreground"),
    "prefer_recompilation": ("hit", "ONNX Runtime reports SUPPORTED_PREFER_RECOMPILATION: served now, rebuilt "
                                    "in a background process for the next launch"),
    "manifest_missing": ("fallback", "the entry folder has no manifest"),
    "manifest_corrupt": ("fallback", "the manifest is not valid JSON or not a manifest of this key"),
    "manifest_unreadable": ("fallback", "the manifest cannot be read (permissions, a link, a FIFO)"),
    "entry_not_folder": ("fallback", "the entry is not a folder (a link or a file)"),
    "artifact_missing": ("fallback", "a file of the entry is missing"),
    "artifact_size": ("fallback", "a file of the entry has another size than recorded"),
    "artifact_digest": ("fallback", "a file of the entry has other content than recorded (bit rot, tampering)"),
    "artifact_not_regular": ("fallback", "a file of the entry is not a regular file (a link?)"),
    "artifact_unreadable": ("fallback", "a file of the entry cannot be read"),
    "unsafe_context": ("fallback", "the context model refers to a file that is not a verified file of its entry"),
    "incompatible": ("fallback", "the provider reports the context UNSUPPORTED on this device"),
    "load_failed": ("fallback", "ONNX Runtime refused the context"),
    "context_recompiles": ("fallback", "the provider would compile the model again instead of loading the context (ONNX "
                                       "Runtime's MODEL_REQUIRES_COMPILATION: a context it ignores, or one with no "
                                       "EPContext node): not served as a slow hit"),
    "wrong_provider": ("fallback", "the context session does not run on the requested provider"),
    "crashed_during_load": ("fallback", "a process died while loading this context"),
    "signer_revoked": ("fallback", "a tier's entry whose signer (or install folder) this device no longer trusts: "
                                   "a revoked or removed key reaches the entries it already brought in"),
    "tuf_revoked": ("fallback", "an entry installed through TUF that its store's current targets no longer list, or list "
                                "as another build (revoked, replaced)"),
    "tuf_unverifiable": ("fallback", "an entry installed through TUF whose store's verified metadata is gone from "
                                     "this cache: it cannot be checked against the current publication"),
    "compile_failed": ("fallback", "the provider failed to compile the model"),
    "publish_failed": ("fallback", "the compiled entry could not be written"),
    "source_changed": ("fallback", "the model changed while it was compiled (an updater?); nothing was published"),
    "compiling_in_background": ("pending", "on_miss='background': served on the meanwhile providers while the "
                                           "context compiles in a detached process"),
}


def _check_table() -> None:
    codes = set(get_args(ReasonCode))
    if codes != set(REASONS):  # pragma: no cover - caught by the test suite at once
        raise AssertionError(f"ReasonCode and REASONS differ: {sorted(codes ^ set(REASONS))}")


_check_table()


class Reason(Record):
    """Why a load was not a plain hit or miss. ``code`` is stable and machine-readable (:data:`REASONS`)."""

    __slots__ = ("code", "message")
    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        self._set(code=code, message=message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Timings(Record):
    """Seconds spent in each step of a load: ``hash`` (the model digest, the key and the plan's checks,
    content verification included), ``lock_wait``, ``fetch`` (copying + verifying an entry from a bundle,
    package or remote tier), ``compile``, ``load`` (the session), ``verify`` (``verify="concurrent"``: waiting
    for the content check after the session was created), ``total``."""

    __slots__ = ("compile", "fetch", "hash", "load", "lock_wait", "total", "verify")
    hash: float
    lock_wait: float
    fetch: float
    compile: float
    load: float
    verify: float
    total: float

    def __init__(self, hash: float = 0.0, lock_wait: float = 0.0, fetch: float = 0.0, compile: float = 0.0,
                 load: float = 0.0, verify: float = 0.0, total: float = 0.0) -> None:
        self._set(hash=hash, lock_wait=lock_wait, fetch=fetch, compile=compile, load=load, verify=verify, total=total)

    @property
    def __dict__(self) -> dict[str, float]:  # type: ignore[override]
        # ``timings.__dict__`` (0.2's dataclass) is what apps and benchmarks serialise.
        return {n: getattr(self, n) for n in self._fields()}


class LoadResult(Record):
    """What :meth:`ContextCache.load` returns: ``session``, ``outcome``, ``key``, ``reason``, ``timings``,
    ``providers`` (what the session actually runs), ``entry_path``, ``model_digest``, ``tier`` (where a hit's
    entry came from during this load: "bundle" / "package" / "remote"; ``None``: local or compiled) and
    ``saved_seconds`` (the compile seconds this hit avoided, for stats)."""

    __slots__ = (
        "_waiter",
        "entry_path",
        "key",
        "model_digest",
        "outcome",
        "providers",
        "reason",
        "saved_seconds",
        "session",
        "tier",
        "timings",
    )
    session: ort.InferenceSession
    outcome: Outcome
    key: str | None
    reason: Reason | None
    timings: Timings
    providers: tuple[str, ...]
    entry_path: Path | None
    model_digest: str | None
    tier: str | None
    saved_seconds: float
    _waiter: object

    def __init__(self, session: ort.InferenceSession, outcome: Outcome, key: str | None = None,
                 reason: Reason | None = None, timings: Timings | None = None, providers: tuple[str, ...] = (),
                 entry_path: Path | None = None, model_digest: str | None = None, tier: str | None = None,
                 saved_seconds: float = 0.0, _waiter: object = None) -> None:
        self._set(session=session, outcome=outcome, key=key, reason=reason,
                  timings=timings if timings is not None else Timings(), providers=providers, entry_path=entry_path,
                  model_digest=model_digest, tier=tier, saved_seconds=saved_seconds, _waiter=_waiter)

    def ready(self, timeout: float | None = 0.0) -> bool:
        """For a ``pending`` load: whether the background compile has published its entry, waiting up to
        ``timeout`` seconds (``None``: until the compile ends). The next load of the model is then a hit;
        swapping to it is the app's choice. ``True`` for every other outcome."""
        wait = getattr(self._waiter, "wait", None)
        if wait is None:
            return self.outcome != "pending"
        return bool(wait(timeout))

    def _replace_waiter(self, waiter: object) -> LoadResult:
        values: dict[str, Any] = {n: getattr(self, n) for n in self._fields()}
        return LoadResult(**values, _waiter=waiter)

    def __repr__(self) -> str:
        why = f", reason={self.reason}" if self.reason else ""
        key = self.key[:12] if self.key else None
        return f"LoadResult(outcome={self.outcome!r}, key={key!r}, total={self.timings.total:.3f}s{why})"


ModelArg = str | bytes | os.PathLike[str]
