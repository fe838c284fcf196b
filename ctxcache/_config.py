"""Where the cache lives and how strict it is: argument > environment variable > platformdirs default.

Read when called, never at import time, so an app (or a test) can set ``CTXCACHE_DIR`` at any point.
"""

from __future__ import annotations

import os
from pathlib import Path

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
