"""Where the cache lives and how strict it is: argument > environment variable > platformdirs default.

Read when called, never at import time, so an app (or a test) can set ``CTXCACHE_DIR`` at any point.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ._record import Record
from ._trust import Trust, resolve_trust

ENV_DIR = "CTXCACHE_DIR"
ENV_STRICT = "CTXCACHE_STRICT"
ENV_DEBUG = "CTXCACHE_DEBUG"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None, app_name: str, app_author: str | None) -> Path:
    """The cache folder; :class:`~ctxcache.errors.CacheLocationError` when there is none to be had or it
    is a file."""
    from .errors import CacheLocationError

    if cache_dir is not None:
        path = Path(cache_dir).expanduser()
    elif os.environ.get(ENV_DIR):
        path = Path(os.environ[ENV_DIR]).expanduser()
    else:
        import platformdirs

        # The app-data dir, not the OS cache dir: Android may empty cache/ under storage pressure (and
        # macOS may purge caches), which would throw away what an installer precompiled.
        try:
            if app_name == "ctxcache":
                path = Path(platformdirs.user_data_dir("ctxcache", appauthor=False))
            else:
                path = Path(platformdirs.user_data_dir(app_name, appauthor=app_author or False)) / "ctxcache"
        except RuntimeError as e:  # platformdirs on Android when it cannot find the app's folder
            raise CacheLocationError(
                f"cannot find this app's data folder ({e}); pass cache_dir=... to ContextCache (on Android: "
                "the app's files dir, e.g. from Context.getFilesDir()) or set CTXCACHE_DIR", path="") from None
    if path.is_file():
        raise CacheLocationError(f"{path} is a file, not a folder: pass a folder as the cache (cache_dir / "
                                 "--cache-dir / CTXCACHE_DIR)", path=str(path))
    return path


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return truthy(os.environ.get(ENV_STRICT))


# -- the one configuration -------------------------------------------------------------------------------
# Every default of ContextCache lives here, once; its signature, the background worker and management
# functions take them from here (they used to be restated in three places, and drifted).
DEFAULT_LOCK_TIMEOUT = 600.0
DEFAULT_NEGATIVE_TTL = 7 * 24 * 3600.0
DEFAULT_STALL_TIMEOUT = 5.0
DEFAULT_MEANWHILE = ("CPUExecutionProvider",)

Verify = Literal["content", "concurrent", "stat"]
OnMiss = Literal["compile", "background"]
OnLockTimeout = Literal["jit", "raise"]


class Config(Record):
    """A cache's whole configuration, validated and made absolute once (:meth:`create`).

    Frozen: every path that decides what a load does (load, explain, key, warm, rebuild, the background
    worker) reads this one object. A worker process gets all of it (:meth:`to_json`), never a hand-picked
    subset: a worker that did not know ``max_size`` let a capped cache grow past its cap, and one given a
    relative ``cache_dir`` published into ``cache_dir/cache_dir``. ``tiers`` are the specs as given (paths,
    URLs, tier objects), made into objects at the first miss.
    """

    __slots__ = (
        "embed",
        "extra_key",
        "lock_timeout",
        "max_size",
        "meanwhile",
        "negative_ttl",
        "on_lock_timeout",
        "on_miss",
        "root",
        "stall_timeout",
        "strict",
        "tiers",
        "trust",
        "verify",
    )
    root: Path
    strict: bool
    lock_timeout: float | None
    on_lock_timeout: OnLockTimeout
    embed: bool
    extra_key: str | None
    verify: Verify
    max_size: int | None
    negative_ttl: float
    stall_timeout: float | None
    trust: Trust
    on_miss: OnMiss
    meanwhile: tuple[str, ...]
    tiers: tuple[Any, ...]

    def __init__(self, root: Path, strict: bool = False, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
                 on_lock_timeout: OnLockTimeout = "jit", embed: bool = False, extra_key: str | None = None,
                 verify: Verify = "content", max_size: int | None = None, negative_ttl: float = DEFAULT_NEGATIVE_TTL,
                 stall_timeout: float | None = DEFAULT_STALL_TIMEOUT, trust: Trust | None = None,
                 on_miss: OnMiss = "compile", meanwhile: tuple[str, ...] = DEFAULT_MEANWHILE,
                 tiers: tuple[Any, ...] = ()) -> None:
        self._set(root=root, strict=strict, lock_timeout=lock_timeout, on_lock_timeout=on_lock_timeout, embed=embed,
                  extra_key=extra_key, verify=verify, max_size=max_size, negative_ttl=negative_ttl,
                  stall_timeout=stall_timeout, trust=trust if trust is not None else Trust(), on_miss=on_miss,
                  meanwhile=meanwhile, tiers=tiers)

    @classmethod
    def create(cls, cache_dir: str | os.PathLike[str] | None = None, *, app_name: str = "ctxcache",
               app_author: str | None = None, strict: bool | None = None,
               lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT, on_lock_timeout: str = "jit", embed: bool = False,
               extra_key: str | None = None, verify: str = "content", max_size: int | None = None,
               negative_ttl: float = DEFAULT_NEGATIVE_TTL, tiers: Sequence[Any] | None = None,
               stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
               trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
               revoked_keys: Sequence[str | os.PathLike[str]] | None = None,
               trusted_dirs: Sequence[str | os.PathLike[str]] | None = None,
               on_miss: str = "compile", meanwhile: Sequence[str] = DEFAULT_MEANWHILE) -> Config:
        """Validate the arguments of :class:`~ctxcache.ContextCache` (``ValueError``/``TypeError`` name the
        argument) and resolve what comes from the environment (cache folder, strict, trusted keys) now."""
        if on_lock_timeout not in ("jit", "raise"):
            raise ValueError(f"on_lock_timeout must be 'jit' or 'raise', not {on_lock_timeout!r}")
        if verify == "full":  # the 0.1 name of "content"
            verify = "content"
        if verify not in ("content", "concurrent", "stat"):
            raise ValueError(f"verify must be 'content' (the default), 'concurrent' or 'stat', not {verify!r}")
        if lock_timeout is not None and lock_timeout < 0:
            raise ValueError("lock_timeout must be >= 0 or None")
        if max_size is not None and max_size < 0:
            raise ValueError("max_size must be >= 0 or None")
        if on_miss not in ("compile", "background"):
            raise ValueError(f"on_miss must be 'compile' or 'background', not {on_miss!r}")
        if isinstance(meanwhile, str) or not all(isinstance(m, str) for m in meanwhile):
            raise ValueError("meanwhile is a list of provider names, e.g. ['CPUExecutionProvider']")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError("stall_timeout must be > 0 seconds or None")
        if negative_ttl < 0:
            raise ValueError("negative_ttl must be >= 0 seconds")
        for item in tiers or ():
            # Duck-typed: checking against the Tier protocol would import the tier code at every launch.
            if not isinstance(item, (str, os.PathLike)) and not hasattr(item, "offer"):
                raise TypeError(f"a tier must be a bundle path, a URL or a tier object, not {type(item).__name__}")
        # Absolute once: a worker starts in another folder, and the app may chdir after creating the cache.
        root = Path(os.path.abspath(resolve_cache_dir(cache_dir, app_name, app_author)))
        return cls(root=root, strict=resolve_strict(strict), lock_timeout=lock_timeout,
                   on_lock_timeout=on_lock_timeout,  # type: ignore[arg-type]
                   embed=embed, extra_key=extra_key, verify=verify, max_size=max_size,  # type: ignore[arg-type]
                   negative_ttl=negative_ttl, stall_timeout=stall_timeout,
                   # Parsed now (no cryptography needed): a bad trusted key is bad input.
                   trust=resolve_trust(trusted_keys, revoked_keys, trusted_dirs),
                   on_miss=on_miss, meanwhile=tuple(meanwhile),  # type: ignore[arg-type]
                   tiers=tuple(tiers or ()))

    def portable_tiers(self) -> tuple[list[str], list[str]]:
        """(tier specs a worker can rebuild, descriptions of those it cannot: objects made by the app)."""
        specs: list[str] = []
        objects: list[str] = []
        for t in self.tiers:
            if isinstance(t, (str, os.PathLike)):
                specs.append(os.path.abspath(os.fspath(t)) if "://" not in os.fspath(t) else os.fspath(t))
            else:
                objects.append(type(t).__name__)
        return specs, objects

    def to_json(self) -> dict[str, Any]:
        """Everything, as JSON values (for the background worker). Tier objects an app built itself
        (they may hold private signing keys) are not sent; :meth:`portable_tiers` says which."""
        import base64

        specs, _ = self.portable_tiers()
        return {"root": str(self.root), "strict": self.strict, "lock_timeout": self.lock_timeout,
                "on_lock_timeout": self.on_lock_timeout, "embed": self.embed, "extra_key": self.extra_key,
                "verify": self.verify, "max_size": self.max_size, "negative_ttl": self.negative_ttl,
                "stall_timeout": self.stall_timeout, "on_miss": self.on_miss, "meanwhile": list(self.meanwhile),
                "tiers": specs,
                "trust": {"keys": [[kid, base64.b64encode(raw).decode()] for kid, raw in self.trust.keys],
                          "revoked": sorted(self.trust.revoked), "dirs": list(self.trust.dirs),
                          "problem": self.trust.problem, "refused": list(self.trust.refused)}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Config:
        """The inverse of :meth:`to_json`. The trust is taken as sent, never re-read from this process's
        environment (the worker must admit exactly what the app admits)."""
        import base64

        t = data["trust"]
        trust = Trust(tuple((str(kid), base64.b64decode(raw)) for kid, raw in t["keys"]), frozenset(t["revoked"]),
                      tuple(t["dirs"]), t["problem"], tuple(t.get("refused", ())))
        return cls(root=Path(data["root"]), strict=bool(data["strict"]), lock_timeout=data["lock_timeout"],
                   on_lock_timeout=data["on_lock_timeout"], embed=bool(data["embed"]), extra_key=data["extra_key"],
                   verify=data["verify"], max_size=data["max_size"], negative_ttl=float(data["negative_ttl"]),
                   stall_timeout=data["stall_timeout"], trust=trust, on_miss=data["on_miss"],
                   meanwhile=tuple(data["meanwhile"]), tiers=tuple(data["tiers"]))
