"""The plan: models x device classes -> cells, each with the key its devices will compute.

A cell's key is ``_key.fingerprint`` (the loader's own key function) over the model's digest, the
provider and options, the app's key settings and the device class's machine-side parts. The model's
digest and the option normalisation come from the public ``ContextCache.key`` on this host, so nothing
here re-states a key rule. Cells are idempotent by key: a cell the remote store already holds (its key
exactly, or one built on another host that the device's portable match takes) is ``done``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ctxcache
from ctxcache import providers as _providers

from .. import _key
from ._devices import DeviceClass, FarmError, parse_devices, read_json

log = logging.getLogger("ctxcache")

PLAN_KIND = "ctxcache-farm-plan"
CellState = Literal["todo", "done"]


@dataclass(frozen=True)
class Settings:
    """The application's key settings, as its ``ContextCache(embed=, extra_key=)`` has them."""

    embed: bool = False
    extra_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"embed": self.embed, "extra_key": self.extra_key}


@dataclass(frozen=True)
class Cell:
    """One model for one device class: what to compile, and the key the device will look for."""

    model: str
    model_name: str
    device_class: str
    provider: str
    options: dict[str, str]
    key: str
    parts: tuple[tuple[str, Any], ...]
    #: ``done``: the store holds it (``held`` says how: ``exact``, or ``portable`` = built on another host)
    state: CellState = "todo"
    held: str | None = None

    @property
    def id(self) -> str:
        return f"{self.key[:12]}@{self.device_class}"

    @property
    def portable_key(self) -> str:
        return _key.portable_key(self.parts)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "model_name": self.model_name, "class": self.device_class,
                "provider": self.provider, "options": dict(self.options), "key": self.key,
                "parts": [list(p) for p in self.parts], "state": self.state, "held": self.held}


@dataclass(frozen=True)
class Plan:
    """Cells to build (``todo``) and those the store already holds (``done``), with the inputs."""

    cells: tuple[Cell, ...]
    classes: tuple[DeviceClass, ...]
    settings: Settings = field(default_factory=Settings)
    store: str | None = None

    @property
    def todo(self) -> tuple[Cell, ...]:
        return tuple(c for c in self.cells if c.state == "todo")

    def as_dict(self, *, include_done: bool = True) -> dict[str, Any]:
        cells = self.cells if include_done else self.todo
        return {"format": 1, "kind": PLAN_KIND, "store": self.store, "settings": self.settings.as_dict(),
                "classes": [c.as_dict() for c in self.classes], "cells": [c.as_dict() for c in cells]}


def cell_fingerprint(cache: ctxcache.ContextCache, model: str, dc: DeviceClass) -> ctxcache.Fingerprint:
    """The key a device of class ``dc`` computes for ``model``: the loader's key function with the
    device's parts. ``cache`` gives the model digest and the app's key settings (``ContextCache.key``)."""
    here = cache.key(model, providers=[(dc.provider, dict(dc.options))])
    if here is None:
        raise FarmError(f"{model}: a load with {dc.provider} would bypass the cache (nothing to compile)", path=model)
    return _key.fingerprint(
        model_digest=here.get("model"), ep=_providers.get(dc.provider), options=dc.options, env=dc.env,
        graph_optimization=here.get("graph_optimization"), embed=bool(here.get("embed_mode")),
        extra=here.get("extra"), session_config=here.get("session_config"),
    )


def make_cells(cache: ctxcache.ContextCache, models: Sequence[str], classes: Sequence[DeviceClass]) -> list[Cell]:
    """Every model x class, keyed (no store consulted)."""
    cells = []
    for path in models:
        for dc in classes:
            fp = cell_fingerprint(cache, path, dc)
            cells.append(Cell(path, os.path.basename(path), dc.name, dc.provider, dict(dc.options), fp.key,
                              tuple((str(k), v) for k, v in fp.parts)))
    return cells


def _record_behind(remote: ctxcache.RemoteTier, cell: Cell) -> bool:
    """Whether a portable pointer leads to a record: the pointer is written after the record, but a
    record removed from the store by hand leaves its pointer behind."""
    try:
        with remote.offer(cell.key, cell.parts) as offer:
            return offer is not None
    except ctxcache.errors.TierError as e:
        if e.code == "tier_unreachable":
            raise
        log.warning("the store's entry for cell %s is unreadable (%s); planning it again", cell.id, e)
        return False


def mark_held(cells: Iterable[Cell], remote: ctxcache.RemoteTier) -> list[Cell]:
    """Each cell, ``done`` when ``remote`` holds it (its lookup: the key, else a portable pointer with a
    record behind it)."""
    out = []
    for c in cells:
        held = remote.lookup(c.key, c.parts)
        if held == "portable" and not _record_behind(remote, c):
            held = None
        out.append(Cell(c.model, c.model_name, c.device_class, c.provider, c.options, c.key, c.parts,
                        "done" if held else "todo", held))
    return out


def plan(models: Sequence[str | os.PathLike[str]], classes: Sequence[DeviceClass], *,
         remote: ctxcache.RemoteTier | None = None, settings: Settings | None = None,
         reports: Sequence[dict[str, Any]] = ()) -> Plan:
    """Models x device classes -> keyed cells; with ``remote``, the cells it already holds are ``done``.
    ``reports`` (items of ``farm report`` files) add a class for each target seen in the field that no
    class covers, for the models planned here."""
    from ._report import field_classes

    settings = settings or Settings()
    paths = [os.path.abspath(os.fspath(m)) for m in models]
    with tempfile.TemporaryDirectory(prefix="ctxcache-farm-plan-") as tmp:
        # A private cache: only its model-digest memo is written, and it goes with the folder.
        cache = ctxcache.ContextCache(tmp, embed=settings.embed, extra_key=settings.extra_key)
        classes = list(classes)
        if reports:
            probe = classes[0] if classes else None
            digests = set()
            for path in paths:
                provider, options = (probe.provider, probe.options) if probe else (reports[0]["provider"], reports[0]["options"])
                fp = cache.key(path, providers=[(provider, dict(options))])
                if fp is not None:
                    digests.add(fp.get("model"))
            new, _ = field_classes(reports, classes, digests)
            classes += new
        if not classes:
            raise FarmError("no device class: give a devices file (ctxcache farm device writes one) or field reports",
                            path="-")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise FarmError(f"device class names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}", path="-")
        cells = make_cells(cache, paths, classes)
    if remote is not None:
        cells = mark_held(cells, remote)
    return Plan(tuple(cells), tuple(classes), settings, remote.url if remote is not None else None)


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """A plan written by ``ctxcache farm plan --out``; every cell's parts must hash to its key."""
    p = os.fspath(path)
    data = read_json(p, "plan")
    if not isinstance(data, dict) or data.get("kind") != PLAN_KIND or not isinstance(data.get("cells"), list):
        raise FarmError(f"{p} is not a farm plan (write one with `ctxcache farm plan --out`)", path=p)
    classes = parse_devices({"classes": data.get("classes") or []}, p) if data.get("classes") else []
    s = data.get("settings") or {}
    settings = Settings(bool(s.get("embed", False)), s.get("extra_key") if isinstance(s.get("extra_key"), str) else None)
    cells = []
    for i, c in enumerate(data["cells"]):
        try:
            parts = tuple((str(k), v) for k, v in c["parts"])
            cell = Cell(str(c["model"]), str(c.get("model_name") or Path(c["model"]).name), str(c["class"]),
                        str(c["provider"]), {str(k): str(v) for k, v in dict(c["options"]).items()}, str(c["key"]),
                        parts, "done" if c.get("state") == "done" else "todo", c.get("held"))
        except (KeyError, TypeError, ValueError) as e:
            raise FarmError(f"{p}: cells[{i}] is malformed ({type(e).__name__}: {e})", path=p) from None
        if _key.key_of(cell.parts) != cell.key:
            raise FarmError(f"{p}: cells[{i}]: its key parts do not hash to its key (edited by hand?); plan again", path=p)
        cells.append(cell)
    return Plan(tuple(cells), tuple(classes), settings, data.get("store") if isinstance(data.get("store"), str) else None)
