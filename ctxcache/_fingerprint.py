"""The named, ordered parts of a cache key, and how two keys differ.

Each part is a (label, JSON value) pair. The key is the xxh3-128 of their canonical JSON. Every part is
kept in the entry's manifest so that ``ctxcache explain`` can say *which* part changed between a launch
and the entries on disk (JAX's cache_key.py logs its parts for the same reason).

Why each part is there:

- ``format``       ctxcache's on-disk entry format; a new format never reads an old entry.
- ``model``        xxh3-128 of the model bytes and every external-data file (content, not path: the same
                   model reached by two paths shares one entry; an edited weight file makes a new one).
- ``ep``           the execution provider that compiled the context.
- ``ep_options``   only the provider options that change the compiled binary (normalised: sorted keys,
                   string values); run-time options such as QNN's ``htp_performance_mode`` are left out
                   so that changing them does not recompile.
- ``onnxruntime``  the runtime version: the EPContext format and graph optimizers change with it.
- ``ep_versions``  the EP package and SDK versions (e.g. ``onnxruntime_qnn`` and ``qnn_version``).
- ``ep_libraries`` content digests of the EP's native libraries, so a side-loaded SDK update invalidates.
- ``devices``      identity and driver version of the devices ORT hands the provider.
- ``graph_optimization``, ``embed_mode``: compile settings that change the produced context model.
- ``host``         OS and CPU architecture the context was built on.
- ``extra``        the application's own ``extra_key`` (e.g. a model revision it tracks itself).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import xxhash

from ._log import DEBUG, log
from ._record import Record

FORMAT_VERSION = 1

Parts = tuple[tuple[str, Any], ...]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Fingerprint(Record):
    """A key's named, ordered parts; ``key`` is their digest (computed once)."""

    __slots__ = ("_key", "parts")
    parts: Parts

    def __init__(self, parts: Parts) -> None:
        self._set(parts=parts, _key=None)

    @property
    def key(self) -> str:
        found: str | None = self._key  # type: ignore[attr-defined]
        if found is None:
            found = xxhash.xxh3_128_hexdigest(canonical_json([list(p) for p in self.parts]).encode("utf-8"))
            object.__setattr__(self, "_key", found)
        return found

    def as_dict(self) -> dict[str, Any]:
        return dict(self.parts)

    def get(self, label: str) -> Any:
        return self.as_dict().get(label)


def build(parts: Sequence[tuple[str, Any]]) -> Fingerprint:
    # Round-trip through JSON so that the parts compare equal to what a manifest gives back later.
    normalised = tuple((label, json.loads(canonical_json(value))) for label, value in parts)
    fp = Fingerprint(normalised)
    if log.isEnabledFor(DEBUG):
        for label, value in normalised:
            log.debug("key part %-18s %s", label, canonical_json(value))
        log.debug("key %s", fp.key)
    return fp


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The leaf-level differences between two parts dicts, as ``(path, old, new)``.

    Nested dicts are walked, so a changed option reads ``ep_options.soc_model: 60 -> 57`` rather than
    the whole option set. A value missing on one side is ``None``.
    """
    flat_old: dict[str, Any] = {}
    flat_new: dict[str, Any] = {}
    _flatten("", old, flat_old)
    _flatten("", new, flat_new)
    out = []
    for path in list(dict.fromkeys([*flat_old, *flat_new])):
        a, b = flat_old.get(path), flat_new.get(path)
        if a != b:
            out.append((path, a, b))
    return out


def short(value: Any, width: int = 24) -> str:
    """A compact rendering for explanations: digests shortened, ``None`` as 'absent'."""
    if value is None:
        return "absent"
    text = value if isinstance(value, str) else canonical_json(value)
    if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
        return text[:12]
    return text if len(text) <= width else text[: width - 3] + "..."
