"""What an application set on an ``onnxruntime.SessionOptions`` that ONNX Runtime cannot read back.

A SessionOptions can be neither copied nor listed: its config entries can only be read one known key
at a time, and initializers, external initializers, free-dimension overrides and custom-op libraries
not at all. ctxcache must know about them all the same: a compiled context bakes in the weights and
shapes the compiler saw, so an ``add_initializer`` the context load did not get would be a wrong
output, and a plugin EP's session needs a copy of the options (``add_provider_for_devices`` cannot be
done twice on one object). So the methods that set such things are wrapped once, at ``import
ctxcache``: each call goes through unchanged and is noted against its object (weakly; nothing is kept
alive). Calls made before ``import ctxcache`` are not seen (README, "Differences from
onnxruntime.InferenceSession").
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
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


class Notes:
    """What was set on one SessionOptions through the wrapped methods."""

    __slots__ = ("calls", "config")

    def __init__(self) -> None:
        self.calls: set[str] = set()
        self.config: dict[str, str] = {}


_notes: weakref.WeakKeyDictionary[Any, Notes] = weakref.WeakKeyDictionary()


def notes(so: ort.SessionOptions) -> Notes | None:
    """What was noted on ``so`` (``None``: nothing, or it was configured before ``import ctxcache``)."""
    try:
        return _notes.get(so)
    except TypeError:  # not weak-referenceable (a stand-in object): nothing noted
        return None


def _note(so: Any) -> Notes:
    found = _notes.get(so)
    if found is None:
        found = _notes[so] = Notes()
    return found


def _wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            n = _note(self)
            if name == "add_session_config_entry":
                key = args[0] if args else kwargs.get("arg0", kwargs.get("key"))
                value = args[1] if len(args) > 1 else kwargs.get("arg1", kwargs.get("value"))
                n.config[str(key)] = str(value)
            else:
                n.calls.add(name)
        except TypeError:  # not weak-referenceable: nothing noted
            pass
        return result

    wrapper.__ctxcache_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap the setters once per process (idempotent)."""
    cls = ort.SessionOptions
    for name in ("add_session_config_entry", *UNCOPYABLE):
        original = getattr(cls, name, None)
        if original is None or getattr(original, "__ctxcache_wrapped__", False):
            continue
        try:
            setattr(cls, name, _wrap(name, original))
        except (AttributeError, TypeError):  # a build whose type refuses new attributes: nothing noted
            pass


install()
