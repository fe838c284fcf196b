"""What ``ctxcache warm`` is asked to warm: model paths, globs and folders, a plan file, provider
configurations and free-dimension overrides, each checked before anything starts (bad input is exit 2)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ctxcache

from ._common import (
    ProviderConfig,
    UsageError,
    preset,
    provider_name,
    providers_or_default,
    shown,
)

_GLOB_CHARS = set("*?[")


# -- what to warm -----------------------------------------------------------------------------------
@dataclass
class Task:
    id: int
    model: str
    provider: ProviderConfig
    result: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    #: free-dimension overrides (--free-dim...), as (kind, identifier, size)
    dims: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{shown(Path(self.model).name)} [{self.provider.label()}]"


def expand_models(specs: list[str], base: Path | None = None, where: str = "") -> list[Path]:
    """Model files from paths, globs (``**`` recurses) and folders (every ``*.onnx`` below)."""
    found: list[Path] = []
    for spec in specs:
        p = Path(os.path.expanduser(spec))
        if base is not None and not p.is_absolute():
            p = base / p
        if _GLOB_CHARS & set(spec):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise UsageError(f"{where}no file matches {spec!r}")
            found += matches
        elif p.is_dir():
            matches = sorted(q for q in p.rglob("*.onnx") if q.is_file())
            if not matches:
                raise UsageError(f"{where}no .onnx file in folder {p}")
            found += matches
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"{where}model not found: {p}")
    unique: dict[str, Path] = {}
    for f in found:
        unique.setdefault(os.path.realpath(f), Path(os.path.abspath(f)))
    return list(unique.values())


def _provider_from_plan(item: Any, where: str) -> list[ProviderConfig]:
    """``{"name": "qnn", "options": {...}}``, ``{"preset": "qnn-htp"}``, or a bare name; ``options`` may be a
    list of option sets (one configuration each: the "x options" axis of a plan)."""
    if isinstance(item, str):
        return [ProviderConfig(provider_name(item))]
    if not isinstance(item, dict):
        raise UsageError(f"{where}: a provider is a name or a table with 'name' or 'preset', not {item!r}")
    unknown = set(item) - {"name", "preset", "options"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use name, preset, options")
    if "preset" in item:
        name, base = preset(str(item["preset"]))
        label = str(item["preset"])
    elif "name" in item:
        name, base, label = provider_name(str(item["name"])), {}, None
    else:
        raise UsageError(f"{where}: give 'name' or 'preset'")
    option_sets = item.get("options", {})
    if isinstance(option_sets, dict):
        option_sets = [option_sets]
    if not isinstance(option_sets, list) or not all(isinstance(o, dict) for o in option_sets):
        raise UsageError(f"{where}: 'options' is a table of KEY = VALUE or a list of such tables")
    return [ProviderConfig(name, {**base, **{str(k): v for k, v in o.items()}}, preset=label) for o in option_sets or [{}]]


def read_plan(path: Path) -> tuple[list[tuple[Path, ProviderConfig]], dict[str, Any]]:
    """Tasks and settings (``cache_dir``, ``jobs``) of a JSON or TOML plan file.

    Shape: ``{"models": [...], "providers": [...]}`` or ``{"targets": [{"models", "providers"}, ...]}``;
    paths are relative to the plan's folder.
    """
    try:
        # "-": the plan on standard input (how ctxcache.warm_detached hands a warm-up its work, all paths absolute)
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UsageError(f"{path}: TOML plans need Python 3.11+ (tomllib); write the plan as JSON") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the plan must be a table/object with 'models' and 'providers' or 'targets'")
    unknown = set(data) - {"models", "providers", "targets", "cache_dir", "jobs"}
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; use models, providers, targets, cache_dir, jobs")
    base = Path.cwd() if str(path) == "-" else path.resolve().parent
    groups = data.get("targets", [])
    if not isinstance(groups, list):
        raise UsageError(f"{path}: 'targets' must be a list")
    if "models" in data or "providers" in data:
        groups = [{"models": data.get("models", []), "providers": data.get("providers")}, *groups]
    if not groups:
        raise UsageError(f"{path}: the plan lists no models")
    tasks: list[tuple[Path, ProviderConfig]] = []
    for i, g in enumerate(groups):
        where = f"{path.name}: " + (f"targets[{i}]" if "targets" in data else "")
        if not isinstance(g, dict) or not isinstance(g.get("models"), list) or not g["models"]:
            raise UsageError(f"{where} needs a non-empty 'models' list")
        models = expand_models([str(m) for m in g["models"]], base, where=f"{where} ")
        plist = g.get("providers")
        if plist is None:
            configs = providers_or_default(None)
        elif isinstance(plist, list) and plist:
            configs = [c for j, p in enumerate(plist) for c in _provider_from_plan(p, f"{where} providers[{j}]")]
        else:
            raise UsageError(f"{where} 'providers' must be a non-empty list")
        tasks += [(m, c) for m in models for c in configs]
    settings: dict[str, Any] = {}
    if "cache_dir" in data:
        settings["cache_dir"] = str(base / os.path.expanduser(str(data["cache_dir"])))
    if "jobs" in data:
        if not isinstance(data["jobs"], int) or data["jobs"] < 0:
            raise UsageError(f"{path}: 'jobs' must be a whole number >= 0")
        settings["jobs"] = data["jobs"]
    return tasks, settings


def _validate(configs: list[ProviderConfig]) -> dict[int, str]:
    """Check names and options before anything runs (bad input is exit 2); returns unavailable ones."""
    unavailable: dict[int, str] = {}
    for cfg in configs:
        (check,) = ctxcache.check_providers([cfg.as_tuple()])  # UnknownProviderError / ProviderOptionError -> usage
        if not check.compiles:
            raise UsageError(f"{check.name} compiles no context, so there is nothing to warm; pass e.g. --preset qnn-htp")
        if check.unavailable is not None:
            unavailable[id(cfg)] = check.unavailable
    return unavailable


def free_dims(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``--free-dim NAME=VALUE`` / ``--free-dim-denotation DENOTATION=VALUE`` as (kind, identifier, size),
    in the order given: what warm_one sets on the SessionOptions of each compile."""
    out: list[tuple[str, str, int]] = []
    for flag, kind, items in (("--free-dim", "name", args.free_dim or []),
                              ("--free-dim-denotation", "denotation", args.free_dim_denotation or [])):
        for item in items:
            ident, sep, value = item.partition("=")
            if not sep or not ident.strip() or not value.strip().isdigit():
                raise UsageError(f"{flag} takes NAME=VALUE with a whole number, e.g. {flag} "
                                 f"{'batch' if kind == 'name' else 'DATA_BATCH'}=1; not {item!r}")
            out.append((kind, ident.strip(), int(value)))
    return out
