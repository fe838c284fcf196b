"""What an application set on an ``onnxruntime.SessionOptions`` that ONNX Runtime cannot read back.

A SessionOptions can be neither copied nor listed: its config entries can only be read one known key
at a time, and initializers, external initializers, free-dimension overrides and custom-op libraries
not at all. ctxcache must know about them all the same: a compiled context bakes in the weights and
shapes the compiler saw, so an ``add_initializer`` the context load did not get would be a wrong
output, and a plugin EP's session needs a copy of the options (``add_provider_for_devices`` cannot be
done twice on one object). So the methods that set such things are wrapped once, at ``import
ctxcache``: each call goes through unchanged and is noted against its object (weakly; nothing is kept
alive). ``__init__`` is wrapped too, so an object made after the import is known to be *fully* noted;
one made before it may carry settings nobody saw: its config entries are read by name (see
:func:`config_entries`), the rest cannot be (README, "Differences from onnxruntime.InferenceSession").

Free-dimension overrides are noted with their arguments: they fix the shapes a context is compiled for,
so they are part of the key and are replayed on the compile's and the context session's options. They
travel in the same ``dict[str, str]`` as the compile-affecting config entries, under :data:`FREE_DIMS`
(:func:`apply_config` turns such a dict back into settings).
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import onnxruntime as ort

#: Settings that cannot be carried over to another SessionOptions, nor read back.
UNCOPYABLE = (
    "add_initializer",
    "add_external_initializers",
    "add_external_initializers_from_files_in_memory",
    "add_free_dimension_override_by_name",
    "add_free_dimension_override_by_denotation",
    "register_custom_ops_library",
    "set_ep_context_data_read_func",
    "set_load_cancellation_flag",
)
#: The two of them that ctxcache notes with their arguments and replays (kind as in :data:`FREE_DIMS`).
FREE_DIM_CALLS = {"add_free_dimension_override_by_name": "name",
                  "add_free_dimension_override_by_denotation": "denotation"}

#: ctxcache's own entries in a compile-config dict; never an ONNX Runtime config key (ORT's are
#: ``session.``, ``ep.``, ``optimization.``, ``mlas.``...). An app entry with this prefix means nothing to
#: ORT and is neither keyed nor passed on.
RESERVED = "ctxcache."
#: The free-dimension overrides, as canonical JSON ``[[kind, identifier, value], ...]`` in call order
#: (kind ``name`` or ``denotation``): replayed in that order, ORT resolves repeats its own way.
FREE_DIMS = RESERVED + "free_dimension_overrides"

FreeDim = tuple[str, str, int]


class Notes:
    """What was set on one SessionOptions through the wrapped methods."""

    __slots__ = ("calls", "complete", "config", "free_dims", "probed")

    def __init__(self) -> None:
        self.calls: set[str] = set()
        self.config: dict[str, str] = {}
        #: (kind, identifier, value) of every free-dimension override, in call order
        self.free_dims: list[FreeDim] = []
        #: made after ``import ctxcache``: every setting it has went through a wrapped method
        self.complete = False
        #: config entries of an incomplete object read by name: value, or ``None`` when unset
        self.probed: dict[str, str | None] = {}


_notes: weakref.WeakKeyDictionary[Any, Notes] = weakref.WeakKeyDictionary()


def notes(so: ort.SessionOptions) -> Notes | None:
    """What was noted on ``so`` (``None``: nothing, or it was configured before ``import ctxcache``)."""
    try:
        return _notes.get(so)
    except TypeError:  # not weak-referenceable (a stand-in object): nothing noted
        return None


def complete(so: ort.SessionOptions) -> bool:
    """Whether every setting on ``so`` was noted (it was made after ``import ctxcache``)."""
    found = notes(so)
    return found is not None and found.complete


def _note(so: Any) -> Notes:
    found = _notes.get(so)
    if found is None:
        found = _notes[so] = Notes()
    return found


def config_entries(so: ort.SessionOptions, known: Iterable[str]) -> dict[str, str]:
    """The session-config entries set on ``so``: every one, when ``so`` is fully noted; else the
    ``known`` keys read by name (ORT cannot list entries) with the noted ones over them.

    Reading a key ORT does not hold raises inside ORT: timeit here (onnxruntime 1.32, x86-64, 2 busy
    cores) put it at 45-220 us a key, against 2 us for a set one and nothing for a fully noted object.
    So it is paid only for objects made before ``import ctxcache``, and once per object: what such an
    object held then cannot change except through the wrapped setters, which note the change.
    """
    try:
        found = _note(so)
    except TypeError:  # not weak-referenceable: read it every time
        found = Notes()
    if found.complete:
        return dict(found.config)
    out: dict[str, str] = {}
    for key in known:
        if key not in found.probed:
            try:
                found.probed[key] = so.get_session_config_entry(key)
            except Exception:  # noqa: BLE001 - ORT raises (RuntimeError) when the entry is not set
                found.probed[key] = None
        value = found.probed[key]
        if value is not None:
            out[key] = value
    out.update(found.config)
    return out


def free_dims(so: ort.SessionOptions | None) -> list[FreeDim]:
    """The free-dimension overrides noted on ``so``, in call order."""
    found = notes(so) if so is not None else None
    return list(found.free_dims) if found is not None else []


def encode_free_dims(dims: Iterable[FreeDim]) -> str:
    return json.dumps([list(d) for d in dims], separators=(",", ":"))


def decode_free_dims(text: str) -> list[FreeDim]:
    """The overrides :func:`encode_free_dims` wrote; ``ValueError`` for anything else."""
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError(f"{FREE_DIMS} must be a list, not {type(value).__name__}")
    out: list[FreeDim] = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 3 or item[0] not in ("name", "denotation")
                or not isinstance(item[1], str) or not isinstance(item[2], int) or isinstance(item[2], bool)):
            raise ValueError(f"{FREE_DIMS}: cannot read {item!r}; expected [\"name\"|\"denotation\", str, int]")
        out.append((item[0], item[1], item[2]))
    return out


def apply_config(so: ort.SessionOptions, config: Mapping[str, str]) -> None:
    """Set a compile-config dict (``_inputs.compile_config``'s) on ``so``: config entries as entries,
    :data:`FREE_DIMS` as the override calls it records. What the compile and the background worker use,
    so that the worker's options key exactly as the app's did."""
    for key, value in config.items():
        if key == FREE_DIMS:
            for kind, ident, size in decode_free_dims(value):
                if kind == "name":
                    so.add_free_dimension_override_by_name(ident, size)
                else:
                    so.add_free_dimension_override_by_denotation(ident, size)
        elif key.startswith(RESERVED):
            raise ValueError(f"unknown ctxcache session setting {key!r}")
        else:
            so.add_session_config_entry(key, value)


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            n = _note(self)
            values = [*args, *(kwargs[k] for k in ("arg0", "arg1") if k in kwargs)]
            if name == "add_session_config_entry":
                n.config[str(values[0])] = str(values[1])
            elif name in FREE_DIM_CALLS:
                n.calls.add(name)
                n.free_dims.append((FREE_DIM_CALLS[name], str(values[0]), int(values[1])))
            else:
                n.calls.add(name)
        except (TypeError, IndexError, ValueError):  # not weak-referenceable, or arguments ORT took but we cannot read
            pass
        return result

    wrapper.__ctxcache_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_init(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        try:
            _note(self).complete = True
        except TypeError:
            pass

    init.__ctxcache_wrapped__ = True  # type: ignore[attr-defined]
    return init


def install() -> None:
    """Wrap the setters (and ``__init__``) once per process (idempotent)."""
    cls = ort.SessionOptions
    for name in ("add_session_config_entry", *UNCOPYABLE):
        original = getattr(cls, name, None)
        if original is None or getattr(original, "__ctxcache_wrapped__", False):
            continue
        try:
            setattr(cls, name, _wrap(name, original))
        except (AttributeError, TypeError):  # a build whose type refuses new attributes: nothing noted
            pass
    if not getattr(cls.__init__, "__ctxcache_wrapped__", False):
        try:
            cls.__init__ = _wrap_init(cls.__init__)
        except (AttributeError, TypeError):  # every object then counts as made before the import: read by name
            pass


install()
