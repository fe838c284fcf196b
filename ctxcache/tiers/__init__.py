"""Tiers: where entries come from before a compile (bundles, ORT model packages, a remote store).

``_base`` is the protocol and the one install path; ``bundle``, ``package`` and ``remote`` implement
it and import only ``_base`` and the store, never the cache facade. Imported only on a local miss with
tiers configured (or by the commands that move entries), so a launch that hits pays nothing for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ._base import Tier


def coerce(items: Iterable[object] | None, cache_root: str | os.PathLike[str] | None = None) -> list[Tier]:
    """``ContextCache(tiers=...)`` items: tier objects, bundle paths (folder or .tar), ORT model package
    folders, ``s3://`` and other fsspec URLs. A tier that keeps state of its own (a remote's verified TUF
    metadata) is told ``cache_root`` through its ``attach``, so that state stays inside the cache."""
    out: list[Tier] = []
    for item in items or ():
        if isinstance(item, (str, os.PathLike)):
            text = os.fspath(item)
            if "://" in text:  # s3:// via boto3, any other scheme via fsspec
                from .remote import RemoteTier

                out.append(RemoteTier(text))
                continue
            from .package import ModelPackageTier, is_model_package

            if is_model_package(text):
                out.append(ModelPackageTier(text))
            else:
                from .bundle import Bundle

                out.append(Bundle(text))
        elif isinstance(item, Tier):
            out.append(item)
        else:
            raise TypeError(f"a tier must be a bundle path, a URL or a tier object, not {type(item).__name__}")
    for tier in out if cache_root is not None else ():
        attach = getattr(tier, "attach", None)
        if callable(attach):
            attach(cache_root)
    return out


__all__ = ["Tier", "coerce"]
