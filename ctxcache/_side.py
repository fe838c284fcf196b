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

import os
import stat
from pathlib import Path
from typing import Any

from . import _fs
from ._inputs import Chain
from ._log import log
from ._plan import Inputs
from ._store import Store


def inputs_for(store: Store, key: str | None, inputs: Inputs) -> Inputs:
    """``inputs`` as the sessions of a load with ``key`` get them: the provider's own caches in the key's
    folder, or off when the load has no key. The one call the loader makes, once the plan knows the key
    and before any session is created (the compile, a background job and a rebuild inherit it)."""
    governed = govern(store, key, inputs.chain) if key is not None else unmanaged(inputs.chain)
    return inputs if governed is inputs.chain else inputs.replace(chain=governed)


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
        swept = sweep(folder)
        if swept:
            log.warning("removed %d planted link(s), FIFO(s) or other non-files from %s", swept, folder)
        governed = ep.side_cache_options(options, folder)
    except OSError as e:
        log.warning("cannot keep %s's own cache for %s in %s (%s); the provider runs without it this time",
                    ep.name, key[:12], folder, e)
        governed = ep.without_side_cache(options)
    return [(ep, governed), *chain[1:]]


def describe(store: Store, key: str | None, chain: Chain) -> dict[str, Any] | None:
    """What ``explain`` shows: the key's provider-cache folder, which caches, and its size (``None``: no
    provider cache asked for, or no key)."""
    if key is None or not chain:
        return None
    layout = chain[0][0].side_cache_layout(chain[0][1])
    if not layout:
        return None
    return {"folder": str(store.side_dir(key)), "caches": layout, "size": store.side_size(key)}


def unmanaged(chain: Chain) -> Chain:
    """``chain`` with the first provider's own caches off: for a load that has no key (the cache folder
    is unusable), where no folder of ctxcache's can hold them."""
    if not chain or not chain[0][0].side_cache_layout(chain[0][1]):
        return chain
    ep, options = chain[0]
    return [(ep, ep.without_side_cache(options)), *chain[1:]]


#: More names than a provider cache of one key ever holds (OpenVINO writes one blob per subgraph, TensorRT
#: an engine and a profile per subgraph): beyond it the folder is reset rather than walked further.
_MAX_NAMES = 4096


def sweep(folder: Path, depth: int = 3) -> int:
    """Remove from ``folder`` (a side folder, before a provider is handed it) every name a provider would
    follow or block on: symlinks (a blob written through one lands outside the cache), FIFOs, sockets,
    devices (opening one blocks the launch), files with other hard links (written through, they change a
    file elsewhere), and folders others can write. Providers open their cache files by name with plain
    ``open``; this keeps those names to regular files of this user. Returns how many were removed;
    raises ``OSError`` (the cache is then off for this load) when the folder cannot be judged."""
    removed = 0
    names = os.listdir(folder)
    if len(names) > _MAX_NAMES:
        raise OSError(f"{folder} holds {len(names)} names; more than a provider cache of one key")
    for name in names:
        path = folder / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and depth > 0 and _fs.folder_problem(st, path) is None:
            removed += sweep(path, depth - 1)
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            continue
        if not _fs.remove_tree(path):
            raise OSError(f"cannot remove {path} from a provider cache folder")
        removed += 1
    return removed
