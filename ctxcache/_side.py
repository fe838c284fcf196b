"""A provider's own cache (OpenVINO's ``cache_dir``, TensorRT's engine and timing caches) under the key.

Providers keep caches of their own beside an EP context, keyed far more loosely than ctxcache keys a
context: TensorRT's engine cache by graph or file name (onnxruntime issues 6455, 32254: two models of one
structure share an engine, the second runs with the first one's weights), OpenVINO's blob cache without
the weights in the blob's name. When the app turns one on, every session of the load gets it in a folder
of the key's own (``Store.side_dir``), whatever path the app gave: the path is not keyed, the fact that a
cache is kept is (``ExecutionProvider.binary_options``). The store counts that folder in the entry's size
and removes, prunes and quarantines it with the entry.
"""

from __future__ import annotations

import logging

from . import _fs
from ._inputs import Chain
from ._store import Store

log = logging.getLogger("ctxcache")


def govern(store: Store, key: str, chain: Chain) -> Chain:
    """``chain`` with the first provider's own caches pointed into ``key``'s side folder (created,
    owner-only and checked, here). A folder that cannot be made or trusted turns those caches off for
    this load: a provider that cannot create its ``cache_dir`` fails the whole session (measured with
    OpenVINO), and a cache elsewhere would be shared."""
    if not chain:
        return chain
    ep, options = chain[0]
    layout = ep.side_cache_layout(options)
    if not layout:
        return chain
    folder = store.side_dir(key)
    try:
        store.check(store.side_root)
        _fs.make_folder(folder)
        for sub in sorted(set(layout.values())):
            _fs.make_folder(folder / sub)
        governed = ep.side_cache_options(options, folder)
    except OSError as e:
        log.warning("cannot keep %s's own cache for %s in %s (%s); the provider runs without it this time",
                    ep.name, key[:12], folder, e)
        governed = ep.without_side_cache(options)
    return [(ep, governed), *chain[1:]]


def unmanaged(chain: Chain) -> Chain:
    """``chain`` with the first provider's own caches off: for a load that has no key (the cache folder
    is unusable), where no folder of ctxcache's can hold them."""
    if not chain or not chain[0][0].side_cache_layout(chain[0][1]):
        return chain
    ep, options = chain[0]
    return [(ep, ep.without_side_cache(options)), *chain[1:]]
