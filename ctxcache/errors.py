"""The public exception hierarchy.

Every error ctxcache raises derives from :class:`CtxCacheError`; each subclass also derives from the
builtin that fits, so ``except FileNotFoundError`` or ``except TimeoutError`` in an app keeps working.
Errors carry their data as attributes and survive pickling (they cross process boundaries in
``ctxcache warm --jobs``).
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[CtxCacheError], message: str, attrs: dict[str, Any]) -> CtxCacheError:
    err = cls.__new__(cls)
    CtxCacheError.__init__(err, message, **attrs)
    return err


class CtxCacheError(Exception):
    """Root of every ctxcache error. ``str(err)`` says what happened, to which file, and what to do."""

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self._attrs = attrs
        for name, value in attrs.items():
            setattr(self, name, value)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._attrs))


class ModelNotFoundError(CtxCacheError, FileNotFoundError):
    """The model file (or an external-data file it references) does not exist. Attribute: ``path``."""

    path: str


class InvalidModelError(CtxCacheError, ValueError):
    """The input is not a readable ONNX model. Attributes: ``path``, ``detail``."""

    path: str
    detail: str


class UnknownProviderError(CtxCacheError, ValueError):
    """An execution provider name that ONNX Runtime does not know. Attributes: ``provider``, ``known``."""

    provider: str
    known: list[str]


class ProviderOptionError(CtxCacheError, ValueError):
    """A provider option is misspelt, mistyped or refused. Attributes: ``provider``, ``option``."""

    provider: str
    option: str


class LockTimeoutError(CtxCacheError, TimeoutError):
    """Another process kept compiling this model past ``lock_timeout`` (policy ``"raise"``).

    Attributes: ``lock_path``, ``timeout``.
    """

    lock_path: str
    timeout: float


class CacheFaultError(CtxCacheError, RuntimeError):
    """Strict mode only: a cache fault that would otherwise have been a logged fallback.

    Attributes: ``code`` (machine-readable, see :class:`ctxcache.Reason`), ``key``.
    """

    code: str
    key: str | None


class CacheFormatError(CtxCacheError, ValueError):
    """A manifest or cache file that this version of ctxcache cannot read. Attribute: ``path``."""

    path: str


class BundleError(CtxCacheError, ValueError):
    """A bundle cannot be exported or imported: nothing selected, unsafe archive member, bad signature.

    Attributes: ``path`` (the bundle), ``code`` (``nothing_selected``, ``tier_unsafe``, ``tier_signature``,
    ``tier_record``, ``tier_unreachable``, ``exists``).
    """

    path: str
    code: str
