"""Execution provider modules, picked in one place.

:func:`get` maps a provider name to the module that knows it; a name ONNX Runtime knows but ctxcache
has no module for gets the conservative generic behaviour (every option keyed).
"""

from __future__ import annotations

import importlib

import onnxruntime as ort

from ..errors import UnknownProviderError
from ._base import ExecutionProvider

# Provider name -> "module:Class". Imported on first use: an app loading one provider does not pay for
# the others' modules at `import ctxcache` (TensorRT's driver probes and ctypes setup, for one).
_MODULES: dict[str, str] = {
    "CoreMLExecutionProvider": "coreml:CoreMLProvider",
    "CPUExecutionProvider": "cpu:CPUProvider",
    "DmlExecutionProvider": "directml:DirectMLProvider",
    "OpenVINOExecutionProvider": "openvino:OpenVINOProvider",
    "QNNExecutionProvider": "qnn:QNNProvider",
    "TensorrtExecutionProvider": "tensorrt:TensorRTProvider",
}


def _provider_class(name: str) -> type[ExecutionProvider] | None:
    spec = _MODULES.get(name)
    if spec is None:
        return None
    module, cls = spec.split(":")
    found: type[ExecutionProvider] = getattr(importlib.import_module(f".{module}", __name__), cls)
    return found


#: Provider names (current and earlier onnxruntime releases) that never produce an EP context: a load
#: with one of them first is exactly onnxruntime's session, nothing written (see ``plain``).
NO_CONTEXT = frozenset({
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "AzureExecutionProvider",
    "CUDAExecutionProvider",
    "DnnlExecutionProvider",
    "JsExecutionProvider",
    "NnapiExecutionProvider",
    "ROCMExecutionProvider",
    "RknpuExecutionProvider",
    "SNPEExecutionProvider",
    "TvmExecutionProvider",
    "VSINPUExecutionProvider",
    "WebGpuExecutionProvider",
    "WebNNExecutionProvider",
    "XnnpackExecutionProvider",
})

#: Short names the command line accepts (``--provider qnn``); the library suggests the full name for them.
ALIASES: dict[str, str] = {
    "qnn": "QNNExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "nv": "NvTensorRTRTXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}


def nearest_provider(name: str, known: list[str] | None = None) -> tuple[str, str | None] | None:
    """The provider a mistyped ``name`` most likely means, as ``(full name, alias or None)``: an alias
    (``cpu``), the same name in another case or without ``ExecutionProvider``, or a close spelling of
    either (``qnnn``, ``QNNExecutionProvidr``), among ``known`` (default: every name known here).
    ``None``: nothing close. The one rule behind both the library's "did you mean" and the command line's."""
    low = name.strip().lower()
    if low in ALIASES:
        return ALIASES[low], low
    known = sorted(set(known_names() if known is None else known) | set(ALIASES.values()))
    for full in known:
        if full.lower() in (low, low + "executionprovider"):
            return full, None
    import difflib

    by_lower = {a: (full, a) for a, full in ALIASES.items()} | {k.lower(): (k, None) for k in known}
    close = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.7)
    return by_lower[close[0]] if close else None


# One instance per provider per process: QNN's plugin registration is process-wide state.
_instances: dict[str, ExecutionProvider] = {}


def known_names() -> list[str]:
    names = set(ort.get_all_providers()) | set(_MODULES) | NO_CONTEXT
    try:
        names |= {d.ep_name for d in ort.get_ep_devices()}
    except Exception:  # noqa: BLE001 - older ORT without the plugin-EP API
        pass
    return sorted(names)


def get(name: str) -> ExecutionProvider:
    inst = _instances.get(name)
    if inst is not None:
        return inst
    cls = _provider_class(name)
    if cls is None and name in NO_CONTEXT:
        from .plain import PlainProvider

        inst = PlainProvider(name)
    elif cls is None:
        known = known_names()
        if name not in known:
            # Names are case-sensitive in ONNX Runtime: a name that differs only in case gets that name.
            close = nearest_provider(name, known)
            hint = (f"; did you mean {close[0]!r}?" if close and close[0] != name
                    else f". Known providers: {', '.join(known)}")
            raise UnknownProviderError(
                f"unknown execution provider {name!r}{hint}", provider=name, known=known
            )
        inst = ExecutionProvider(name)
    else:
        inst = cls()
    _instances[name] = inst
    return inst


__all__ = ["ALIASES", "ExecutionProvider", "get", "known_names", "nearest_provider"]
