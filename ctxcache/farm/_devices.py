"""Device classes: what a farm cell is compiled for, as data.

A device class is a provider, its binary options and the machine-side key parts a device of that class
reports (``_key.ENV_PARTS``: format, onnxruntime, EP/SDK versions, EP library digests, devices, host).
Those parts cannot be worked out on a build host: they come from the device, written by
``ctxcache farm device`` there, or read from ``ctxcache doctor --format json`` output (its
``key_parts``), or from a field report (``ctxcache farm report``). With them, the planner computes the
key the device will compute, with the loader's own key function.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctxcache
from ctxcache import errors

from .._key import ENV_PARTS

#: Largest device-class, plan or report file read (they are small JSON documents).
MAX_FILE = 16 << 20
DEVICES_KIND = "ctxcache-farm-devices"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class FarmError(errors.CtxCacheError, ValueError):
    """A farm input (device classes, plan, report) cannot be used: ``path`` names the file."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class DeviceClass:
    """One kind of device: ``provider`` with binary ``options`` (as the key records them), on devices
    that report the machine-side key parts ``env``. ``why`` (field classes): how it differs from the
    nearest class the farm already had."""

    name: str
    provider: str
    options: dict[str, str]
    env: dict[str, Any]
    why: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "provider": self.provider, "options": dict(self.options),
                               "env": dict(self.env)}
        if self.why:
            out["why"] = list(self.why)
        return out

    def same_target(self, other: DeviceClass) -> bool:
        return (self.provider, self.options, self.env) == (other.provider, other.options, other.env)


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """A small JSON file given by the user (never a cache file): bounded, with errors that name it."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        raise FarmError(f"cannot read the {what} {p}: {e.strerror or e}", path=str(p)) from None
    if len(raw) > MAX_FILE:
        raise FarmError(f"the {what} {p} is larger than {MAX_FILE >> 20} MiB; is it the right file?", path=str(p))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FarmError(f"the {what} {p} is not valid JSON ({e})", path=str(p)) from None


def _checked(name: Any, provider: Any, options: Any, env: Any, where: str, path: str) -> DeviceClass:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise FarmError(f"{path}: {where}: the name {name!r} must be 1-100 letters, digits, '.', '_', '+' or '-'",
                        path=path)
    if not isinstance(provider, str) or not provider:
        raise FarmError(f"{path}: class {name}: 'provider' must be a provider name", path=path)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise FarmError(f"{path}: class {name}: 'options' must be an object of provider options", path=path)
    if not isinstance(env, dict):
        raise FarmError(f"{path}: class {name}: 'env' must be the key parts the device reports", path=path)
    missing = [p for p in ENV_PARTS if p not in env]
    if missing:
        raise FarmError(f"{path}: class {name}: 'env' lacks {', '.join(missing)}; write the file on the device with "
                        "`ctxcache farm device` (or take `ctxcache doctor --format json` output there)", path=path)
    try:
        (check,) = ctxcache.check_providers([(provider, {str(k): str(v) for k, v in options.items()})])
    except errors.CtxCacheError as e:
        raise FarmError(f"{path}: class {name}: {e}", path=path) from None
    return DeviceClass(name, check.name, dict(check.binary_options), {p: env[p] for p in ENV_PARTS})


def _label_options(label: str) -> tuple[str, dict[str, str]]:
    """``QNN htp_arch=73 soc_model=60`` (doctor's label of a configuration) -> provider and options."""
    short, *pairs = label.split()
    name = short if short.endswith("ExecutionProvider") else short + "ExecutionProvider"
    options = dict(p.split("=", 1) for p in pairs if "=" in p)
    return name, options


def auto_name(provider: str, options: Mapping[str, str], env: Mapping[str, Any]) -> str:
    """A readable name for a class nobody named: ``QNN-60-73-3f2a9c1e``, the digest over its env parts."""
    import xxhash

    short = provider.removesuffix("ExecutionProvider")
    picks = [str(options[k]) for k in ("soc_model", "htp_arch", "device_type", "device_id") if k in options]
    digest = xxhash.xxh3_64_hexdigest(json.dumps([provider, dict(options), dict(env)], sort_keys=True).encode())[:8]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join([short, *picks, digest]))[:100]


def parse_devices(data: Any, path: str) -> list[DeviceClass]:
    """Device classes from a farm devices file (``{"classes": [...]}``) or ``doctor --format json`` output."""
    if isinstance(data, dict) and isinstance(data.get("key_parts"), list):  # doctor's output
        out = []
        for i, item in enumerate(data["key_parts"]):
            if not isinstance(item, dict) or not isinstance(item.get("parts"), dict) or not isinstance(item.get("provider"), str):
                continue  # a provider that cannot run on that device: no key parts to build for
            provider, options = _label_options(item["provider"])
            try:
                (check,) = ctxcache.check_providers([(provider, options)])
            except errors.CtxCacheError as e:
                raise FarmError(f"{path}: key_parts[{i}]: {e}", path=path) from None
            out.append(_checked(auto_name(check.name, check.binary_options, item["parts"]), check.name, options,
                                item["parts"], f"key_parts[{i}]", path))
        if not out:
            raise FarmError(f"{path}: this doctor output has no key parts (the provider cannot run there)", path=path)
        return out
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise FarmError(f"{path}: not a device classes file ({{\"classes\": [...]}}, from `ctxcache farm device`) "
                        "nor `ctxcache doctor --format json` output", path=path)
    classes = []
    for i, item in enumerate(data["classes"]):
        if not isinstance(item, dict):
            raise FarmError(f"{path}: classes[{i}] is not an object", path=path)
        classes.append(_checked(item.get("name"), item.get("provider"), item.get("options", {}), item.get("env"),
                                f"classes[{i}]", path))
    return classes


def load_devices(paths: Iterable[str | os.PathLike[str]]) -> list[DeviceClass]:
    """Every class of every file, names unique (a class given twice under one name is one class)."""
    out: dict[str, DeviceClass] = {}
    for path in paths:
        for dc in parse_devices(read_json(path, "device classes file"), os.fspath(path)):
            if dc.name in out and not dc.same_target(out[dc.name]):
                raise FarmError(f"{path}: two different device classes are named {dc.name}; rename one", path=os.fspath(path))
            out[dc.name] = dc
    return list(out.values())


def this_device(name: str | None, provider: str, options: Mapping[str, Any] | None = None,
                cache: ctxcache.ContextCache | None = None) -> DeviceClass:
    """The class of THIS machine for ``provider`` with ``options``: run it on a device (``ctxcache farm
    device``); its ``env`` is what a load here puts in the key."""
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    (check,) = ctxcache.check_providers([(provider, opts)])
    cache = cache if cache is not None else ctxcache.ContextCache()
    env = cache.environment(check.name, opts)
    if isinstance(env, str):
        raise FarmError(f"{check.name} cannot run on this machine ({env}): no key parts to describe it", path="-")
    binary = dict(check.binary_options)
    return DeviceClass(name or auto_name(check.name, binary, env), check.name, binary, env)


def devices_document(classes: Iterable[DeviceClass]) -> dict[str, Any]:
    return {"format": 1, "kind": DEVICES_KIND, "classes": [c.as_dict() for c in classes]}
