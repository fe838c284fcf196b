"""ctxcache: compile an ONNX Runtime model for its NPU/GPU once per device, launch instantly after."""

from __future__ import annotations

# First on purpose: measured, `import ctxcache` costs ~20 ms more (wall and main-thread CPU; ~1,300 more
# page faults, twice the kernel time) when onnxruntime is first imported from inside ctxcache's own
# modules. Cause not pinned down; see benchmarks/README.md, question 2.
import onnxruntime  # noqa: F401  # isort: skip

import importlib
from typing import TYPE_CHECKING

from . import errors
from ._cache import ContextCache, InferenceSession, default_cache
from ._fingerprint import Fingerprint
from ._types import REASONS, LoadResult, Reason, Timings
from ._version import __version__

# Management, tiers and transfers are not needed to load a model; importing them lazily keeps
# `import ctxcache` (paid at every launch) free of their dataclasses, tarfile, hmac and boto3.
_LAZY = {
    "Difference": "._explain",
    "EntryInfo": "._manage",
    "Explanation": "._explain",
    "Nearest": "._explain",
    "PruneItem": "._prune",
    "PrunePlan": "._prune",
    "ProviderCheck": "._manage",
    "check_providers": "._manage",
    "known_providers": "._manage",
    "PruneReport": "._prune",
    "Stats": "._stats",
    "Bypass": "._plan",
    "Config": "._config",
    "Fallback": "._plan",
    "Miss": "._plan",
    "Serve": "._plan",
    "TierAnswer": "._explain",
    "VerifyResult": "._manage",
    "WarmResult": "._explain",
    "WarmProcess": "._detach",
    "warm_detached": "._detach",
    "Bundle": ".tiers.bundle",
    "Diagnosis": "._doctor",
    "diagnose": "._doctor",
    "ExportResult": ".tiers.bundle",
    "GeneratedKey": "._trust",
    "generate_signing_key": "._trust",
    "ImportResult": "._transfer",
    "ModelPackageTier": ".tiers.package",
    "PackageExport": ".tiers.package",
    "PushResult": "._transfer",
    "RemoteTier": ".tiers.remote",
    "export_bundle": "._transfer",
    "export_model_package": "._transfer",
    "import_bundle": "._transfer",
    "pull": "._transfer",
    "push": "._transfer",
    "quiet_native_stdout": "._quiet",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ctxcache' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


if TYPE_CHECKING:  # the real types, for type checkers and IDEs
    from ._config import Config
    from ._detach import WarmProcess, warm_detached
    from ._doctor import Diagnosis, diagnose
    from ._explain import Difference, Explanation, Nearest, TierAnswer, WarmResult
    from ._manage import EntryInfo, ProviderCheck, VerifyResult, check_providers, known_providers
    from ._plan import Bypass, Fallback, Miss, Serve
    from ._prune import PruneItem, PrunePlan, PruneReport
    from ._quiet import quiet_native_stdout
    from ._stats import Stats
    from ._transfer import ImportResult, PushResult, export_bundle, export_model_package, import_bundle, pull, push
    from ._trust import GeneratedKey, generate_signing_key
    from .tiers.bundle import Bundle, ExportResult
    from .tiers.package import ModelPackageTier, PackageExport
    from .tiers.remote import RemoteTier

__all__ = [
    "REASONS",
    "Bundle",
    "Bypass",
    "Config",
    "ContextCache",
    "Diagnosis",
    "Difference",
    "EntryInfo",
    "Explanation",
    "ExportResult",
    "Fallback",
    "Fingerprint",
    "GeneratedKey",
    "ImportResult",
    "InferenceSession",
    "LoadResult",
    "Miss",
    "ModelPackageTier",
    "Nearest",
    "PackageExport",
    "ProviderCheck",
    "PruneItem",
    "PrunePlan",
    "PruneReport",
    "PushResult",
    "Reason",
    "RemoteTier",
    "Serve",
    "Stats",
    "TierAnswer",
    "Timings",
    "VerifyResult",
    "WarmProcess",
    "WarmResult",
    "__version__",
    "check_providers",
    "default_cache",
    "diagnose",
    "errors",
    "export_bundle",
    "export_model_package",
    "generate_signing_key",
    "import_bundle",
    "known_providers",
    "pull",
    "push",
    "quiet_native_stdout",
    "warm_detached",
]
