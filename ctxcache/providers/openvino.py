"""Intel OpenVINO execution provider.

Two ways it reaches a Python process:

- ``onnxruntime-openvino``: an onnxruntime build with OpenVINO compiled in. It *replaces* the
  ``onnxruntime`` module (same import name, own venv). ``SessionOptions.add_provider`` takes it, so the
  compile API works. Measured on an AMD EPYC host (onnxruntime-openvino 1.24.1, OpenVINO 2025.4.1): the
  context compiles on CPU, and every load of it fails ("EP_FAIL: Unhandled exception type: 1"), embedded
  or not: ctxcache falls back to the original model, which is the behaviour to keep.
- ``onnxruntime-ep-openvino``: a *plugin* EP for a stock onnxruntime >= 1.23, registered like QNN's.
  Measured: 1.8.1 registers with onnxruntime 1.32 but offers no device on an AMD CPU (its factory lists
  Intel hardware only), so there it is unavailable and a load is a bypass.

Key: the OpenVINO version and the device the blob is built for. ``device_type`` (CPU, GPU.1, NPU,
AUTO:GPU,CPU, HETERO:...) and ``precision`` shape the compiled blob; thread and stream counts and priority
do not. A CPU blob depends on the instruction set it was compiled for, so the CPU's model and ISA level are
keyed too.

OpenVINO's own blob cache (``cache_dir``): measured with onnxruntime-openvino 1.24.1 on CPU, the blob's
file name does not depend on the weights, so two models of one structure in one ``cache_dir`` overwrite
each other's blob at every launch; and a ``cache_dir`` that cannot be created (a file in the way) fails
the session. ctxcache gives it one folder per key instead (``side_cache_layout``): the path the app passed
is not keyed, the fact that a blob cache is kept is.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import onnxruntime as ort

from ..errors import ProviderOptionError
from ._base import ExecutionProvider

# From ONNX Runtime's OpenVINO EP documentation and openvino_provider_factory.cc (1.20-1.24, plugin 1.8).
_KNOWN = frozenset(
    {
        "device_type",
        "device_id",
        "precision",
        "num_of_threads",
        "num_streams",
        "cache_dir",
        "context",
        "enable_opencl_throttling",
        "enable_qdq_optimizer",
        "disable_dynamic_shapes",
        "model_priority",
        "load_config",
        "reshape_input",
        "layout",
        "enable_causallm",
        "enable_npu_fast_compile",
    }
)
_RUNTIME = frozenset(
    {
        "num_of_threads",
        "num_streams",
        "cache_dir",  # where OpenVINO's blob cache lives (whether it is kept is keyed: side_cache_layout)
        "context",  # an OpenCL context pointer
        "enable_opencl_throttling",
        "model_priority",
        "device_id",  # deprecated alias; device_type names the device
    }
)
_BOOL_OPTIONS = ("enable_opencl_throttling", "enable_qdq_optimizer", "disable_dynamic_shapes", "enable_causallm",
                 "enable_npu_fast_compile")
_PRECISIONS = ("FP32", "FP16", "ACCURACY", "BF16", "INT8")
_DEVICE = re.compile(r"^(CPU|GPU(\.\d+)?|NPU(\.\d+)?|(AUTO|HETERO|MULTI):[A-Z0-9.,]+)$")
_PLUGIN_DIST = "onnxruntime-ep-openvino"


def _plugin_module() -> ModuleType | None:
    try:
        import onnxruntime_ep_openvino
    except ImportError:
        return None
    return onnxruntime_ep_openvino  # type: ignore[no-any-return]


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def openvino_version(folder: Path) -> str | None:
    """OpenVINO's version from its library's file name in ``folder``.

    onnxruntime-openvino ships ``libopenvino.so.2025.4.1``; the plugin wheel only the soname tag
    ``libopenvino.so.2641`` (year 26, release 4, patch 1). Windows names carry neither: there the
    library's content digest (``ep_libraries``) is what tells versions apart.
    """
    full, tag = None, None
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for n in names:
        m = re.match(r"^libopenvino\.so\.(\d{4}\.\d+\.\d+)$", n)
        if m:
            full = m.group(1)
        m = re.match(r"^libopenvino\.so\.(\d{4})$", n)
        if m:
            tag = m.group(1)
    if full:
        return full
    if tag:
        return f"20{tag[:2]}.{tag[2]}.{tag[3]} (soname {tag})"
    return None


@lru_cache(maxsize=1)
def cpu_identity() -> dict[str, str]:
    """The CPU model and the instruction-set level a CPU blob may have been compiled for."""
    model, flags = platform.processor() or platform.machine(), set()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                        model = line.split(":", 1)[1].strip()
                    elif line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    return {"model": model, "isa": ",".join(isa)}


class OpenVINOProvider(ExecutionProvider):
    name: ClassVar[str] = "OpenVINOExecutionProvider"
    known_options: ClassVar[frozenset[str] | None] = _KNOWN
    runtime_options: ClassVar[frozenset[str]] = _RUNTIME
    choice_options: ClassVar[dict[str, tuple[str, ...]]] = {"precision": _PRECISIONS}

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        # A build with OpenVINO compiled in wins over the plugin: the plugin cannot register beside it.
        self._builtin = self.name in ort.get_available_providers()
        self._plugin = None if self._builtin else _plugin_module()

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        if self._builtin:
            return None
        if self._plugin is not None:
            # Measured with 1.8.1: the plugin offers Intel CPUs, GPUs and NPUs only.
            return self._plugin_unavailable("onnxruntime-ep-openvino", "offers no device here (it lists Intel hardware only)")
        return (
            "OpenVINO is not available: install onnxruntime-openvino (in its own venv: it replaces onnxruntime) "
            "or the onnxruntime-ep-openvino plugin"
        )

    # -- options ------------------------------------------------------------------------------
    def normalize_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        # The OpenVINO EP reads its switches as "true"/"false" only. Measured with onnxruntime-openvino
        # 1.24.1: enable_qdq_optimizer="1" makes provider creation fail and ORT silently runs the whole
        # session on CPU. Python's True (which other providers get as "1") and 1/0 become true/false.
        fixed: dict[Any, Any] = {}
        for key, value in options.items():
            if key in _BOOL_OPTIONS:
                text = str(value).strip().lower() if isinstance(value, (bool, int, str)) else value
                if isinstance(text, str):
                    value = {"1": "true", "0": "false", "true": "true", "false": "false"}.get(text, value)
            fixed[key] = value
        return super().normalize_options(fixed)

    def validate_options(self, options: dict[str, str]) -> None:
        for key in _BOOL_OPTIONS:
            if key in options and options[key] not in ("true", "false"):
                raise ProviderOptionError(
                    f"OpenVINO option {key!r} must be true/false, got {options[key]!r}.", provider=self.name, option=key
                )
        device = options.get("device_type")
        if device is not None and not _DEVICE.fullmatch(device):
            raise ProviderOptionError(
                f"OpenVINO option 'device_type' must be CPU, GPU, GPU.<n>, NPU or AUTO:/HETERO:/MULTI:<devices>, got {device!r}.",
                provider=self.name,
                option="device_type",
            )
        for key in ("num_of_threads", "num_streams"):
            if key in options and not options[key].isdigit():
                raise ProviderOptionError(
                    f"OpenVINO option {key!r} must be a non-negative integer, got {options[key]!r}.",
                    provider=self.name,
                    option=key,
                )

    def side_cache_layout(self, options: Mapping[str, str]) -> dict[str, str]:
        return {"cache_dir": "openvino"} if options.get("cache_dir") else {}

    def binary_options(self, options: dict[str, str]) -> dict[str, str]:
        out = super().binary_options(options)
        # The EP builds for CPU when no device is named: absent and "CPU" make the same blob.
        out.setdefault("device_type", "CPU")
        return dict(sorted(out.items()))

    # -- key parts ----------------------------------------------------------------------------
    def _library_folder(self) -> Path:
        if self._plugin is not None:
            return Path(self._plugin.get_library_path()).parent
        return Path(ort.__file__).resolve().parent / "capi"

    def versions(self) -> dict[str, str]:
        out = {"openvino": openvino_version(self._library_folder()) or "unknown"}
        if self._plugin is not None:
            out[_PLUGIN_DIST] = _dist_version(_PLUGIN_DIST) or "unknown"
        else:
            out["onnxruntime-openvino"] = _dist_version("onnxruntime-openvino") or "unknown"
        return out

    def library_files(self, options: dict[str, str]) -> list[Path]:
        folder = self._library_folder()
        so = os.name != "nt"
        if so:
            names = ["libonnxruntime_providers_openvino.so", "libonnxruntime_providers_openvino_plugin.so", "libopenvino.so"]
        else:
            names = ["onnxruntime_providers_openvino.dll", "onnxruntime_providers_openvino_plugin.dll", "openvino.dll"]
        device = options.get("device_type", "CPU")
        for dev, plugin in (("CPU", "intel_cpu"), ("GPU", "intel_gpu"), ("NPU", "intel_npu")):
            if dev in device:
                names.append(f"libopenvino_{plugin}_plugin.so" if so else f"openvino_{plugin}_plugin.dll")
        files = []
        for n in names:
            p = folder / n
            if p.is_file():
                files.append(p)
            elif so:
                # The plugin wheel ships libopenvino only under its soname (libopenvino.so.2641).
                files += sorted(q for q in folder.glob(n + ".*") if q.is_file())[:1]
        return files

    def device_identity(self, options: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        device = (options or {}).get("device_type", "CPU")
        out: list[dict[str, Any]] = []
        if "CPU" in device:
            out.append({"type": "CPU", **cpu_identity()})
        if self._plugin is not None:
            for d in self.devices():
                meta = dict(d.ep_metadata)
                meta.pop("library_path", None)
                out.append({"type": str(d.device.type).rsplit(".", 1)[-1], "vendor_id": d.device.vendor_id,
                            "device_id": d.device.device_id, "ep_metadata": meta})
        return sorted(out, key=lambda x: repr(sorted(x.items())))
