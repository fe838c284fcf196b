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
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    # The app-data dir, not the OS cache dir: Android and macOS may wipe cache dirs under storage
    # pressure, which would throw away what an installer precompiled.
    if app_name == "ctxcache":
        return Path(platformdirs.user_data_dir("ctxcache", appauthor=False))
    return Path(platformdirs.user_data_dir(app_name, appauthor=app_author or False)) / "ctxcache"


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return truthy(os.environ.get(ENV_STRICT))
