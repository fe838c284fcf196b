"""ctxcache: compile an ONNX Runtime model for its NPU/GPU once per device, launch instantly after."""

from __future__ import annotations

# First on purpose: measured, `import ctxcache` costs ~20 ms more (wall and main-thread CPU; ~1,300 more
# page faults, twice the kernel time) when onnxruntime is first imported from inside ctxcache's own
# modules. Cause not pinned down; see benchmarks/README.md, question 2.
import onnxruntime  # noqa: F401  # isort: skip

from typing import TYPE_CHECKING

from . import errors
from ._cache import ContextCache, EntryInfo, InferenceSession, default_cache
from ._events import Stats
from ._fingerprint import Fingerprint
from ._loader import LoadResult, Reason, Timings

__version__ = "0.1.0"

# Tiers are needed only when an app configures them; importing them lazily keeps `import ctxcache`
# (paid at every launch) free of tarfile, hmac and boto3.
_LAZY = {
    "Bundle": "._bundle",
    "export_bundle": "._bundle",
    "import_bundle": "._bundle",
    "ModelPackageTier": "._package",
    "export_model_package": "._package",
    "RemoteTier": "._remote",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ctxcache' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


if TYPE_CHECKING:  # the real types, for type checkers and IDEs
    from ._bundle import Bundle, export_bundle, import_bundle
    from ._package import ModelPackageTier, export_model_package
    from ._remote import RemoteTier

__all__ = [
    "Bundle",
    "ContextCache",
    "EntryInfo",
    "Fingerprint",
    "InferenceSession",
    "LoadResult",
    "ModelPackageTier",
    "Reason",
    "RemoteTier",
    "Stats",
    "Timings",
    "__version__",
    "default_cache",
    "errors",
    "export_bundle",
    "export_model_package",
    "import_bundle",
]
