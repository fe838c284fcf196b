"""The device side of the loop: what a device had to compile itself, as a small report the farm plans from.

An entry a device compiled itself (no tier served it: ``origin`` is ``None``) is a cell the fleet
store lacked. Its recorded key parts say exactly what the device computes: the provider, the binary
options and the machine-side parts (EP/SDK versions, library digests, devices, host). The report
carries those and the model's content digest, nothing else: no model name, no path, no model bytes,
no user data (key parts never hold paths: the key records a backend's type, not its location).

It is built from the cache at report time (``ctxcache farm report``), so a load's hit and miss path is
unchanged. ``farm plan --reports`` turns each report item for a model it plans into a device class
(when no class has that target yet), with the key parts that differ from the nearest class it had.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ctxcache

from .. import _fingerprint, _key
from ._devices import DeviceClass, FarmError, auto_name, read_json

REPORT_KIND = "ctxcache-farm-report"
#: At most this many items in a report (newest first): a report stays small whatever the cache holds.
MAX_ITEMS = 256
#: Key parts that are the app's settings, not the device's: the plan takes them from the app.
_SETTINGS = ("graph_optimization", "embed_mode", "extra", "session_config")
#: A report comes from the field, and its options become compile options on the build hosts: only plain
#: values (``60``, ``htp``, ``1``), never one that can name a file or folder (``op_packages`` loads native
#: code, ``*_path`` / ``*_dir`` / ``*_file`` read or write where they point).
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._+-]{0,64}")
_FILE_OPTION = re.compile(r".*(_path|_dir|_file|_files|_packages|_package)$|op_packages")
_MAX_OPTIONS = 32


def device_report(cache: ctxcache.ContextCache, *, limit: int = MAX_ITEMS) -> dict[str, Any]:
    """The report of ``cache``: one item per entry this device compiled itself (newest first, at most
    ``limit``), each the key parts the farm needs to build it."""
    items = []
    for info in sorted(cache.entries(), key=lambda i: i.created, reverse=True):
        if info.origin is not None:
            continue  # served by a tier: the fleet had it
        parts = info.parts
        if not all(p in parts for p in (*_key.ENV_PARTS, "model", "ep", "ep_options")):
            continue  # an entry of an older format: nothing to plan from
        items.append({
            "key": info.key,
            "model_digest": parts["model"],
            "provider": parts["ep"],
            "options": parts["ep_options"],
            "env": {p: parts[p] for p in _key.ENV_PARTS},
            "settings": {p: parts.get(p) for p in _SETTINGS},
            "compile_seconds": round(info.compile_seconds, 3),
        })
        if len(items) >= limit:
            break
    return {"format": 1, "kind": REPORT_KIND, "ctxcache": ctxcache.__version__, "time": int(time.time()),
            "items": items}


def read_reports(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The items of every report file (checked for shape; an item without a target is refused)."""
    items = []
    for path in paths:
        data = read_json(path, "device report")
        if not isinstance(data, dict) or data.get("kind") != REPORT_KIND or not isinstance(data.get("items"), list):
            raise FarmError(f"{path} is not a device report (write one with `ctxcache farm report` on the device)", path=path)
        for i, item in enumerate(data["items"][:MAX_ITEMS]):
            if not (isinstance(item, dict) and isinstance(item.get("model_digest"), str)
                    and isinstance(item.get("provider"), str) and isinstance(item.get("options"), dict)
                    and isinstance(item.get("env"), dict)):
                raise FarmError(f"{path}: items[{i}] is malformed", path=path)
            items.append(dict(item, source=path))
    return items


def differences(dc: DeviceClass, nearest: DeviceClass) -> list[str]:
    """The key parts in which ``dc`` differs from ``nearest``, as ``explain`` renders them."""
    old = {"ep": nearest.provider, "ep_options": nearest.options, **nearest.env}
    new = {"ep": dc.provider, "ep_options": dc.options, **dc.env}
    return [_key.render(d) for d in _fingerprint.diff(old, new)]


def _plain_options(options: dict[str, Any], source: str) -> dict[str, str]:
    """A report's options, refused unless every one is a plain value that names no file."""
    if len(options) > _MAX_OPTIONS:
        raise FarmError(f"{source}: an item has {len(options)} options; a device report has at most {_MAX_OPTIONS}",
                        path=source)
    out = {}
    for k, v in options.items():
        key, value = str(k), str(v)
        if _FILE_OPTION.fullmatch(key) or not _PLAIN_VALUE.fullmatch(key) or not _PLAIN_VALUE.fullmatch(value):
            raise FarmError(f"{source}: option {key[:64]!r}={value[:64]!r} is not a plain value (a report's options become "
                            "compile options on the build hosts: no file, folder or library may be named)", path=source)
        out[key] = value
    return out


def field_classes(items: Sequence[dict[str, Any]], classes: Sequence[DeviceClass],
                  model_digests: Iterable[str]) -> tuple[list[DeviceClass], int]:
    """New device classes from report items about the planned models (a target no class has yet), each
    with ``why``: how it differs from the nearest known class. Also returns the count of items skipped
    (another model, or a target a class already covers)."""
    wanted = set(model_digests)
    known = list(classes)
    new: list[DeviceClass] = []
    skipped = 0
    for item in items:
        if item["model_digest"] not in wanted:
            skipped += 1
            continue
        options = _plain_options(item["options"], str(item["source"]))
        missing = [p for p in _key.ENV_PARTS if p not in item["env"]]
        if missing:
            raise FarmError(f"{item['source']}: an item lacks {', '.join(missing)}", path=str(item["source"]))
        env = {p: item["env"][p] for p in _key.ENV_PARTS}
        try:
            (check,) = ctxcache.check_providers([(item["provider"], options)])
        except ctxcache.errors.CtxCacheError as e:
            raise FarmError(f"{item['source']}: {e}", path=str(item["source"])) from None
        options = dict(check.binary_options)
        candidate = DeviceClass(auto_name(check.name, options, env), check.name, options, env)
        if any(candidate.same_target(k) for k in known):
            skipped += 1
            continue
        peers = [k for k in known if k.provider == candidate.provider] or known
        why: tuple[str, ...] = ()
        if peers:
            nearest = min(peers, key=lambda k: len(differences(candidate, k)))
            why = (f"seen in the field; differs from class {nearest.name} in: "
                   + ", ".join(differences(candidate, nearest)),)
        dc = DeviceClass(candidate.name, candidate.provider, options, env, why)
        known.append(dc)
        new.append(dc)
    return new, skipped
