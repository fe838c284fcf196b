"""ctxcache: compile an ONNX Runtime model for its NPU/GPU once per device, launch instantly after."""

from __future__ import annotations

from . import errors
from ._cache import ContextCache, EntryInfo, InferenceSession, default_cache
from ._events import Stats
from ._fingerprint import Fingerprint
from ._loader import LoadResult, Reason, Timings

__version__ = "0.1.0"

__all__ = [
    "ContextCache",
    "EntryInfo",
    "Fingerprint",
    "InferenceSession",
    "LoadResult",
    "Reason",
    "Stats",
    "Timings",
    "__version__",
    "default_cache",
    "errors",
]
