"""The cache key: a pure function of labelled parts (as JAX's ``cache_key``), and the rules that compare
an entry's recorded parts with this machine's.

:func:`fingerprint` is what every caller (load, explain, warm, export, tiers, doctor) uses to know an
entry's key; nothing reaches into the loader for it. The parts that describe the machine and its
software come from :class:`Environment`, collected once per provider configuration and process (they
do not change while a process runs). See ``_fingerprint`` for why each part is there.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import _fingerprint
from ._fingerprint import Fingerprint, canonical_json
from ._hashing import files_digest
from .providers import ExecutionProvider

#: Key parts that describe the machine and its software, not the model or the app's choices.
ENV_PARTS = ("format", "onnxruntime", "ep_versions", "ep_libraries", "devices", "host")
#: The ones that say for sure an entry was built for software this machine does not run. ep_libraries
#: and devices are left out on purpose: the manifest keeps the backend *type*, not the app's
#: backend_path, so an app with a side-loaded SDK would look foreign here while its entries still hit.
#: Removing a usable entry costs a compile at the next launch; keeping a dead one costs only disk.
STALE_PARTS = ("format", "onnxruntime", "ep_versions", "host")
#: Key parts that describe the machine a context was compiled ON rather than the context: a vendor
#: compiles for a Snapdragon target on an x86 build host, so a bundle built there differs from the
#: device in exactly these. ``match="portable"`` tiers ignore them (see :func:`portable_key`).
HOST_PARTS = ("host", "devices", "ep_libraries")


def host_part() -> str:
    """OS and the architecture this Python runs as (``platform.machine()`` is what the interpreter was
    built for: an x64 Python emulated on Windows-on-ARM says AMD64, and its contexts differ)."""
    return f"{sys.platform}-{platform.machine().lower()}"


class Environment:
    """The machine-side key parts for one provider configuration, memoised for the process.

    ``memo_dir`` is where library digests are remembered between processes (``None``: not at all).
    """

    def __init__(self, memo_dir: Path | None) -> None:
        self.memo_dir = memo_dir
        self._parts: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, str] = {}

    def digest(self, ep: ExecutionProvider, options: Mapping[str, str]) -> str:
        """A short digest of :meth:`parts`: what a remembered verdict is valid for (memoised with them)."""
        import xxhash

        memo_key = ep.name + canonical_json(dict(options))
        found = self._digests.get(memo_key)
        if found is None:
            found = self._digests[memo_key] = xxhash.xxh3_64_hexdigest(
                canonical_json([ep.name, self.parts(ep, options)]).encode())
        return found

    def parts(self, ep: ExecutionProvider, options: Mapping[str, str]) -> dict[str, Any]:
        memo_key = ep.name + canonical_json(dict(options))
        parts = self._parts.get(memo_key)
        if parts is None:
            parts = {
                "format": _fingerprint.FORMAT_VERSION,
                "onnxruntime": ort.__version__,
                "ep_versions": ep.versions(),
                "ep_libraries": files_digest(ep.library_files(dict(options)), self.memo_dir),
                "devices": ep.device_identity(options),
                "host": host_part(),
            }
            self._parts[memo_key] = parts
        return parts


def graph_level_name(level: ort.GraphOptimizationLevel | None) -> str:
    return str(level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL).rsplit(".", 1)[-1]


def fingerprint(
    *,
    model_digest: str,
    ep: ExecutionProvider,
    options: Mapping[str, str],
    env: Mapping[str, Any],
    graph_optimization: str,
    embed: bool,
    extra: str | None,
    session_config: Mapping[str, str] | None = None,
) -> Fingerprint:
    """The key of a context: every part, named and in a fixed order. ``session_config`` (the app's
    session-config entries that may change a compile) is a part only when there is one, so a load that
    sets none keeps the key it always had."""
    config = [("session_config", dict(session_config))] if session_config else []
    return _fingerprint.build(
        [
            ("format", env["format"]),
            ("model", model_digest),
            ("ep", ep.name),
            ("ep_options", ep.binary_options(dict(options))),
            ("onnxruntime", env["onnxruntime"]),
            ("ep_versions", env["ep_versions"]),
            ("ep_libraries", env["ep_libraries"]),
            ("devices", env["devices"]),
            ("graph_optimization", graph_optimization),
            ("embed_mode", int(embed)),
            ("host", env["host"]),
            *config,
            ("extra", extra),
        ]
    )


def portable_key(parts: Iterable[Sequence[Any]]) -> str:
    """The key without :data:`HOST_PARTS`: what a context compiled on another host must still match
    (model, provider, binary options, onnxruntime and EP/SDK versions, compile settings, extra_key)."""
    return _fingerprint.build([(str(p[0]), p[1]) for p in parts if p[0] not in HOST_PARTS]).key


def key_of(parts: Iterable[Sequence[Any]]) -> str:
    """The key that recorded parts hash to (a tier's record must hash to the key it claims)."""
    return _fingerprint.build([(str(p[0]), p[1]) for p in parts]).key


def stale_parts(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The :data:`STALE_PARTS` in which an entry's recorded parts differ from this machine's."""
    return _fingerprint.diff({k: recorded.get(k) for k in STALE_PARTS}, {k: here.get(k) for k in STALE_PARTS})


def render(d: tuple[str, Any, Any]) -> str:
    """``ep_options.soc_model 60 -> 69`` (the model part is a digest of the bytes, not a name)."""
    path, old, new = d
    label = "model content" if path == "model" else path
    text = f"{label} {_fingerprint.short(old)} -> {_fingerprint.short(new)}"
    if path == "host" and isinstance(old, str) and isinstance(new, str) and old.split("-")[-1] != new.split("-")[-1]:
        text += (f" (the Python's architecture: {old.split('-')[-1]} -> {new.split('-')[-1]}; an emulated x64 Python's "
                 "contexts do not serve a native ARM64 one)")
    return text
