"""The public exception hierarchy.

Every error ctxcache raises derives from :class:`CtxCacheError`; each subclass also derives from the
builtin that fits, so ``except FileNotFoundError`` or ``except TimeoutError`` in an app keeps working.
Each class takes its data as named keyword arguments (a misspelt one is a ``TypeError``, not a silent
new attribute), keeps it as attributes, and survives pickling (errors cross process boundaries in
``ctxcache warm --jobs``).
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[CtxCacheError], message: str, state: dict[str, Any]) -> CtxCacheError:
    err = cls.__new__(cls)
    CtxCacheError.__init__(err, message)
    err.__dict__.update(state)
    return err


class CtxCacheError(Exception):
    """Root of every ctxcache error. ``str(err)`` says what happened, to which file, and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def attributes(self) -> dict[str, Any]:
        """The error's data (everything but the message), e.g. ``{"path": "/x/model.onnx"}``."""
        return {k: v for k, v in self.__dict__.items() if k != "message" and not k.startswith("_")}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors cannot be rebuilt from ``args``: rebuild from the instance's dict.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


class ModelNotFoundError(CtxCacheError, FileNotFoundError):
    """The model file (or an external-data file it references) does not exist."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class InvalidModelError(CtxCacheError, ValueError):
    """The input is not a readable ONNX model (or one of its data files is not a plain file)."""

    def __init__(self, message: str, *, path: str, detail: str) -> None:
        super().__init__(message)
        self.path = path
        self.detail = detail


class UnknownProviderError(CtxCacheError, ValueError):
    """An execution provider name that ONNX Runtime does not know; ``known`` lists the names it does."""

    def __init__(self, message: str, *, provider: str, known: list[str]) -> None:
        super().__init__(message)
        self.provider = provider
        self.known = known


class UnknownArgumentError(CtxCacheError, TypeError):
    """A keyword argument that neither ctxcache nor ONNX Runtime's ``InferenceSession`` takes (ONNX Runtime
    would silently ignore it). ``argument`` is the name given, ``accepted`` the names that are taken."""

    def __init__(self, message: str, *, argument: str, accepted: list[str]) -> None:
        super().__init__(message)
        self.argument = argument
        self.accepted = accepted


class ProviderOptionError(CtxCacheError, ValueError):
    """A provider option is misspelt, mistyped or out of range (raised before anything is written)."""

    def __init__(self, message: str, *, provider: str, option: str) -> None:
        super().__init__(message)
        self.provider = provider
        self.option = option


class LockTimeoutError(CtxCacheError, TimeoutError):
    """Another process kept the key's lock past the deadline (``on_lock_timeout="raise"``, or an import)."""

    def __init__(self, message: str, *, lock_path: str, timeout: float) -> None:
        super().__init__(message)
        self.lock_path = lock_path
        self.timeout = timeout


class CacheFaultError(CtxCacheError, RuntimeError):
    """Strict mode only: a cache fault that would otherwise have been a logged fallback.

    ``code`` is the machine-readable reason (see :data:`ctxcache.REASONS`); ``key`` the entry's key.
    """

    def __init__(self, message: str, *, code: str, key: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.key = key


class CacheFormatError(CtxCacheError, ValueError):
    """A manifest or cache file that this version of ctxcache cannot read."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class CacheLocationError(CtxCacheError, OSError):
    """The cache folder cannot be used: it is a file, it cannot be found (Android), or it is unsafe."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class TierError(CtxCacheError, RuntimeError):
    """A tier's entry was refused or the tier could not be read.

    ``code``: ``tier_digest``, ``tier_signature``, ``tier_record``, ``tier_unsafe``, ``tier_bad_context``
    (the bytes were wrong), ``tier_unreachable`` (the tier is absent or down), ``tier_untrusted`` (no
    signature from a trusted key where one is required, or a revoked key's). One table:
    ``ctxcache.tiers._base.TIER_CODES`` (README, "Signatures and trust").
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BundleError(CtxCacheError, ValueError):
    """A bundle or model package cannot be exported or imported.

    ``path`` is the bundle; ``code`` is ``nothing_selected``, ``exists``, ``copy_failed`` or a
    :class:`TierError` code (``tier_unsafe``, ``tier_signature``, ``tier_untrusted``, ``tier_record``,
    ``tier_unreachable``).
    """

    def __init__(self, message: str, *, path: str, code: str) -> None:
        super().__init__(message)
        self.path = path
        self.code = code


class SigningKeyError(CtxCacheError, ValueError):
    """A signing key, a trusted or revoked public key, or a key file cannot be used (malformed, wrong
    kind, missing, or a key file that would be overwritten). ``path`` names the file or setting."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class DetachError(CtxCacheError, RuntimeError):
    """A warm-up could not be started in a process of its own (``ctxcache.warm_detached``): a frozen app,
    an embedded runtime without an interpreter, or the OS refused the process. ``reason`` says which;
    warm in the foreground instead (``ContextCache.warm``, or ``ctxcache warm`` without ``--detach``)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
