"""Qualcomm QNN execution provider (Snapdragon HTP NPU; also the x86 HTP compiler + simulator).

Two ways QNN reaches a Python process:

- the ``onnxruntime-qnn`` package, a *plugin* EP: its library must be registered with
  ``register_execution_provider_library`` and added with ``add_provider_for_devices``. The classic
  ``providers=[("QNNExecutionProvider", ...)]`` form silently runs on CPU with it (FIELD-NOTES), which is
  exactly the mistake ctxcache saves its users from;
- an onnxruntime build with QNN compiled in (older Windows-on-ARM wheels), driven the classic way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import onnxruntime as ort

from ..errors import ProviderOptionError
from ._base import ExecutionProvider, LoadErrorKind, Verdict, ort_verdict

# From onnxruntime's QNN EP documentation and provider-option parser (1.2x-1.32).
_KNOWN = frozenset(
    {
        "backend_type",
        "backend_path",
        "profiling_level",
        "profiling_file_path",
        "rpc_control_latency",
        "vtcm_mb",
        "htp_performance_mode",
        "qnn_saver_path",
        "qnn_context_priority",
        "htp_graph_finalization_optimization_mode",
        "soc_model",
        "htp_arch",
        "device_id",
        "enable_htp_fp16_precision",
        "offload_graph_io_quantization",
        "enable_htp_spill_fill_buffer",
        "enable_htp_shared_memory_allocator",
        "dump_json_qnn_graph",
        "json_qnn_graph_dir",
        "op_packages",
        "enable_htp_weight_sharing",
        "skip_qnn_version_check",
        "extended_udma",
        "htp_bf16_enable",
    }
)

# Options read when a session runs, not when the context binary is built. Everything else, including
# names this list does not know yet, is keyed: a needless recompile is cheap, a wrong binary is not.
_RUNTIME = frozenset(
    {
        "htp_performance_mode",
        "profiling_level",
        "profiling_file_path",
        "rpc_control_latency",
        "qnn_context_priority",
        "qnn_saver_path",
        "dump_json_qnn_graph",
        "json_qnn_graph_dir",
        "enable_htp_shared_memory_allocator",
        "device_id",
        "skip_qnn_version_check",
    }
)

# Ranges wide enough for every SoC and HTP generation QNN knows (soc_model ids run into the hundreds,
# htp_arch is 68-81 today), narrow enough that a typo or a bool is refused.
_INT_OPTIONS = {"soc_model": (0, 10_000), "htp_arch": (0, 1_000), "vtcm_mb": (0, 1_024), "device_id": (0, 1_024),
                "rpc_control_latency": (0, 100_000_000)}
_BOOL_OPTIONS = (
    "enable_htp_fp16_precision",
    "offload_graph_io_quantization",
    "enable_htp_spill_fill_buffer",
    "enable_htp_weight_sharing",
    "enable_htp_shared_memory_allocator",
)
_BACKEND_TYPES = ("htp", "cpu", "gpu", "saver", "ir")


def _plugin_module() -> ModuleType | None:
    try:
        import onnxruntime_qnn
    except ImportError:
        return None
    return onnxruntime_qnn  # type: ignore[no-any-return]  # untyped package


def _backend_library_name(backend_type: str) -> str:
    stem = "Qnn" + {"htp": "Htp", "cpu": "Cpu", "gpu": "Gpu", "saver": "Saver", "ir": "Ir"}[backend_type]
    return f"{stem}.dll" if os.name == "nt" else f"lib{stem}.so"


class QNNProvider(ExecutionProvider):
    name: ClassVar[str] = "QNNExecutionProvider"
    known_options: ClassVar[frozenset[str] | None] = _KNOWN
    runtime_options: ClassVar[frozenset[str]] = _RUNTIME
    int_options: ClassVar[dict[str, tuple[int, int]]] = _INT_OPTIONS
    flag_options: ClassVar[frozenset[str]] = frozenset(_BOOL_OPTIONS)
    choice_options: ClassVar[dict[str, tuple[str, ...]]] = {"backend_type": _BACKEND_TYPES}

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._plugin = _plugin_module()

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        if self._plugin is not None:
            return self._plugin_unavailable("onnxruntime-qnn", "ONNX Runtime lists no QNN device")
        if self.name in ort.get_available_providers():
            return None
        return "QNN is not available: install onnxruntime-qnn (pip install 'ctxcache[qnn]')"

    # -- options ------------------------------------------------------------------------------
    def _typed(self, key: str, value: Any) -> str:
        if key in ("soc_model", "htp_arch") and isinstance(value, str) and "," in value:
            # A multi-SoC ("flexible") context compiles here but no session loads it, for any member SoC
            # (tests/test_providers_qnn_smaller.py): refused until one can be verified, not cached to fail.
            raise ProviderOptionError(
                f"QNN option {key!r}={value!r} asks for a multi-SoC context, which ctxcache does not build yet: "
                "the QNN simulator cannot load one to verify it. Pass one SoC per load (e.g. soc_model='60').",
                provider=self.name,
                option=key,
            )
        return super()._typed(key, value)

    def validate_options(self, options: dict[str, str]) -> None:
        if "backend_type" in options and "backend_path" in options:
            raise ProviderOptionError(
                "QNN options 'backend_type' and 'backend_path' are mutually exclusive; pass one.",
                provider=self.name,
                option="backend_type",
            )
        path = options.get("backend_path")
        if path and os.sep in path and not os.path.isfile(path):
            raise ProviderOptionError(
                f"QNN option 'backend_path' points to {path}, which does not exist. "
                "With onnxruntime-qnn use onnxruntime_qnn.get_qnn_htp_path().",
                provider=self.name,
                option="backend_path",
            )
        if options.get("enable_htp_fp16_precision") == "1" and "soc_model" not in options and self._plugin is not None:
            # Measured: QNN 2.7 refuses fp16 without soc_model at provider creation.
            raise ProviderOptionError(
                "QNN option 'enable_htp_fp16_precision=1' needs 'soc_model' too (e.g. soc_model='60').",
                provider=self.name,
                option="enable_htp_fp16_precision",
            )

    def _backend_path(self, options: dict[str, str]) -> Path | None:
        if "backend_path" in options:
            p = Path(options["backend_path"])
            if p.is_absolute():
                return p
            if self._plugin is not None:
                return Path(self._plugin.get_library_path()).parent / p.name
            return None
        lib = _backend_library_name(options.get("backend_type", "htp"))
        if self._plugin is not None:
            return Path(self._plugin.get_library_path()).parent / lib
        return None

    def binary_options(self, options: dict[str, str]) -> dict[str, str]:
        out = super().binary_options(options)
        # The backend library's *location* differs between machines and venvs; what it is matters,
        # and its content is keyed separately in ep_libraries.
        path = out.pop("backend_path", None)
        if path is not None:
            base = os.path.basename(path).lower()
            for kind in _BACKEND_TYPES:
                if base in (f"libqnn{kind}.so", f"qnn{kind}.dll"):
                    out["backend_type"] = kind
                    break
            else:
                out["backend_type"] = base
        out.setdefault("backend_type", "htp")
        return dict(sorted(out.items()))

    # -- key parts ----------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        if self._plugin is None:
            return {"qnn": "built into onnxruntime " + ort.__version__}
        info = getattr(self._plugin, "build_and_package_info", None)
        return {
            "onnxruntime_qnn": str(getattr(self._plugin, "__version__", "unknown")),
            "qnn_sdk": str(getattr(info, "qnn_version", "unknown")),
        }

    def library_files(self, options: dict[str, str]) -> list[Path]:
        if self._plugin is None:
            return []
        ep_lib = Path(self._plugin.get_library_path())
        files = [ep_lib]
        backend = self._backend_path(options)
        if backend is not None:
            files.append(backend)
            # The HTP backend hands graph finalisation to libHtpPrepare: it shapes the binary too.
            prepare = backend.parent / ("HtpPrepare.dll" if os.name == "nt" else "libHtpPrepare.so")
            if "htp" in backend.name.lower() and prepare.exists():
                files.append(prepare)
        return files

    def device_identity(self, options: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        if self._plugin is None:
            return []
        out = []
        for d in self.devices():
            hw = d.device
            meta = dict(d.ep_metadata)
            meta.pop("library_path", None)  # where the EP lives is not what it is
            out.append(
                {
                    "type": str(hw.type).rsplit(".", 1)[-1],
                    "vendor": hw.vendor,
                    "vendor_id": hw.vendor_id,
                    "device_id": hw.device_id,
                    "device_metadata": dict(hw.metadata),
                    "ep_metadata": meta,
                }
            )
        return sorted(out, key=lambda x: repr(sorted(x.items())))

    # -- sessions -----------------------------------------------------------------------------
    def configure(self, so: ort.SessionOptions, options: dict[str, str]) -> None:
        if self._plugin is not None and "backend_path" not in options:
            # The plugin ships its backends beside itself; they are not on the loader's search path,
            # so a bare backend_type (or nothing: HTP) is turned into the wheel's own library path.
            options = dict(options)
            backend = self._backend_path(options)
            options.pop("backend_type", None)
            options["backend_path"] = str(backend)
        super().configure(so, options)

    # QNN's own codes in "Failed to create context from binary. Error code: N" (QNN SDK QnnContext.h /
    # QnnCommon.h): 5005 is out of resources, seen intermittently while another process holds the NPU
    # (onnxruntime #25128, onnxruntime-genai #1806); a subsystem restart (SSR) is ENGINE_ERROR; 1002 is a
    # failed allocation. 5000 and 5001-5004 are a binary this device cannot use (Qualcomm: "5000 usually
    # means incompatible context binaries").
    load_errors: ClassVar[tuple[tuple[LoadErrorKind, str], ...]] = (
        ("transient", "Error code: 5005"),
        ("transient", "Error code: 1002"),
        ("transient", "subsystem restart"),
        ("artifact", "Error code: 5000"),
        ("artifact", "Error code: 5001"),
        ("artifact", "Error code: 5002"),
        ("artifact", "Error code: 5003"),
        ("artifact", "Error code: 5004"),
        *ExecutionProvider.load_errors,
    )

    def compatibility(self, info: str) -> tuple[Verdict, str]:
        if self._plugin is None:
            return "unknown", "QNN built into onnxruntime: no compatibility check"
        devices = self.devices()
        # QNN 2.7 answers only for NPU devices and raises otherwise ("only supports
        # OrtHardwareDeviceType_NPU", measured here); worse, the same call SEGFAULTS when made after a
        # compile in the same process. So ask only where there is an NPU to ask about (the loader also
        # skips it right after a compile: a fresh context is fine).
        npus = [d for d in devices if str(d.device.type).endswith("NPU")]
        if not npus:
            return "unknown", "QNN answers only for NPU devices, and this machine has none"
        return ort_verdict(npus, info)
