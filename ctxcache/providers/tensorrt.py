"""NVIDIA TensorRT execution provider (``onnxruntime-gpu`` + the ``tensorrt`` wheels or a system TensorRT).

What shapes a TensorRT engine, and so the key:

- the TensorRT library version (read from the libnvinfer this process loads, ``getInferLibVersion``),
  the CUDA driver version and the display driver version (a driver update may change kernels);
- the GPU: engines are built for one compute capability (and, by default, one GPU model). With
  ``trt_engine_hw_compatible=1`` TensorRT builds an Ampere-or-newer "hardware compatible" engine,
  so the key then names that class instead of the exact GPU;
- the builder options: precision (``trt_fp16_enable``, ``trt_bf16_enable``, ``trt_int8_enable`` and
  its calibration table's *content*), workspace, optimisation profiles, builder optimisation level,
  tactic sources, DLA, sparsity, partitioning limits, excluded op types, plugin libraries' content.

What is left out: where caches live, logging and debug dumps, CUDA graphs, the stream, ``device_id``
(the selected GPU's identity is keyed instead: two identical cards share an entry).

ONNX Runtime's own engine cache keys on the model's *file name* or graph name (onnxruntime issues 6455,
32254): two models called ``model.onnx`` share one engine and the second runs with the first one's
weights. ctxcache never uses that cache across models: it compiles into the entry's own staging folder,
keyed on content, and when the app turns the engine or timing cache on (``trt_engine_cache_enable``,
``trt_timing_cache_enable``) their paths are pointed into a folder of the key's own
(``side_cache_layout``), whatever path the app gave. This EP has no runtime cache option (1.31.1's library
lists none; the runtime cache belongs to the TensorRT-RTX EP, which ctxcache has no module for).

The context is produced the way the TensorRT EP documents it (a session on the original model with
``ep.context_enable`` and ``trt_dump_ep_context_model``), which works with every onnxruntime-gpu since
1.17, rather than with ``ModelCompiler``: that needs ``SessionOptions.add_provider`` to create the
TensorRT EP up front, which onnxruntime-gpu 1.31.1 refuses as "not supported" whenever one of its CUDA
libraries is missing (measured here), and which could not be tried with a GPU. TensorRT's timing cache is written into
the entry too, so the tactic timings stay with the engine they produced.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnxruntime as ort

from ..errors import ProviderOptionError
from . import _nvidia
from ._base import ExecutionProvider

# TensorRT EP provider options, from ONNX Runtime's documentation and tensorrt_execution_provider_info.cc
# (1.17-1.32); checked against the option names in onnxruntime-gpu 1.31.1's TensorRT EP library.
_KNOWN = frozenset(
    {
        "device_id",
        "user_compute_stream",
        "has_user_compute_stream",
        "trt_max_partition_iterations",
        "trt_min_subgraph_size",
        "trt_max_workspace_size",
        "trt_fp16_enable",
        "trt_bf16_enable",
        "trt_int8_enable",
        "trt_int8_calibration_table_name",
        "trt_int8_use_native_calibration_table",
        "trt_dla_enable",
        "trt_dla_core",
        "trt_dump_subgraphs",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_engine_cache_prefix",
        "trt_engine_decryption_enable",
        "trt_engine_decryption_lib_path",
        "trt_force_sequential_engine_build",
        "trt_context_memory_sharing_enable",
        "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_force_timing_cache",
        "trt_detailed_build_log",
        "trt_build_heuristics_enable",
        "trt_sparsity_enable",
        "trt_builder_optimization_level",
        "trt_auxiliary_streams",
        "trt_tactic_sources",
        "trt_extra_plugin_lib_paths",
        "trt_profile_min_shapes",
        "trt_profile_max_shapes",
        "trt_profile_opt_shapes",
        "trt_cuda_graph_enable",
        "trt_dump_ep_context_model",
        "trt_ep_context_file_path",
        "trt_ep_context_embed_mode",
        "trt_weight_stripped_engine_enable",
        "trt_onnx_model_folder_path",
        "trt_onnx_bytestream",
        "trt_onnx_bytestream_size",
        "trt_external_data_bytestream",
        "trt_external_data_bytestream_size",
        "trt_engine_hw_compatible",
        "trt_op_types_to_exclude",
        "trt_preview_features",
        "trt_load_user_initializer",
    }
)

# Options ctxcache sets itself while compiling (where the context, engine and timing cache go). The
# user's values are not keyed; the ep-context ones are also stripped from sessions, where they would
# make ORT write files beside the user's model.
_MANAGED = frozenset(
    {
        "trt_dump_ep_context_model",
        "trt_ep_context_file_path",
        "trt_ep_context_embed_mode",
        "trt_engine_cache_enable",
        "trt_engine_cache_path",
        "trt_engine_cache_prefix",
        "trt_timing_cache_enable",
        "trt_timing_cache_path",
        "trt_force_timing_cache",
    }
)
_EP_CONTEXT_OPTIONS = ("trt_dump_ep_context_model", "trt_ep_context_file_path", "trt_ep_context_embed_mode")

# Read when a session runs, or only locations / debug output: they do not change the engine. Everything
# else, including options this list does not know yet, is keyed (a needless rebuild is cheap, a wrong
# engine is not).
_RUNTIME = _MANAGED | frozenset(
    {
        "device_id",  # which GPU; that GPU's model and compute capability are keyed instead
        "user_compute_stream",
        "has_user_compute_stream",
        "trt_dump_subgraphs",
        "trt_detailed_build_log",
        "trt_cuda_graph_enable",
        "trt_context_memory_sharing_enable",
        "trt_force_sequential_engine_build",
        "trt_engine_decryption_enable",
        "trt_engine_decryption_lib_path",
        "trt_onnx_model_folder_path",
        "trt_onnx_bytestream",
        "trt_onnx_bytestream_size",
        "trt_external_data_bytestream",
        "trt_external_data_bytestream_size",
    }
)

_BOOL_OPTIONS = (
    "has_user_compute_stream",
    "trt_fp16_enable",
    "trt_bf16_enable",
    "trt_int8_enable",
    "trt_int8_use_native_calibration_table",
    "trt_dla_enable",
    "trt_dump_subgraphs",
    "trt_engine_cache_enable",
    "trt_engine_decryption_enable",
    "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable",
    "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable",
    "trt_force_timing_cache",
    "trt_detailed_build_log",
    "trt_build_heuristics_enable",
    "trt_sparsity_enable",
    "trt_cuda_graph_enable",
    "trt_dump_ep_context_model",
    "trt_weight_stripped_engine_enable",
    "trt_engine_hw_compatible",
    "trt_load_user_initializer",
)
# Off by default in every ORT release since 1.14: "0" and absent build the same engine, so both key alike.
_DEFAULT_OFF = frozenset(_BOOL_OPTIONS) - {"trt_load_user_initializer"}
_INT_OPTIONS = {
    "device_id": (0, 1_024),
    "trt_max_partition_iterations": (0, 1_000_000),
    "trt_min_subgraph_size": (0, 1_000_000),
    "trt_max_workspace_size": (0, 1 << 50),
    "trt_dla_core": (0, 64),
    "trt_builder_optimization_level": (0, 5),
    "trt_auxiliary_streams": (-1, 1_024),
    "trt_ep_context_embed_mode": (0, 1),
}
_PROFILE_OPTIONS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
_PROFILE_ITEM = re.compile(r"^([^:,]+):(\d+(?:x\d+)*)$")
_TRUE = {"1", "true", "True", "TRUE"}
_FALSE = {"0", "false", "False", "FALSE"}


def parse_profile(option: str, value: str) -> dict[str, list[list[int]]]:
    """``"in1:1x3x224x224,in2:1x8"`` as ``{"in1": [[1,3,224,224]], ...}``.

    An input may appear more than once: ORT then builds one optimisation profile per occurrence, in order.
    """
    out: dict[str, list[list[int]]] = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        m = _PROFILE_ITEM.match(item)
        if m is None:
            raise ProviderOptionError(
                f"TensorRT option {option!r}: cannot read {item!r}; write input:dims, e.g. 'input:1x3x224x224'.",
                provider=TensorRTProvider.name,
                option=option,
            )
        out.setdefault(m.group(1), []).append([int(d) for d in m.group(2).split("x")])
    return out


def _canonical_profile(parsed: dict[str, list[list[int]]]) -> str:
    # ORT reads the list into a map by input name: listing order between inputs does not matter.
    return ",".join(f"{name}:{'x'.join(map(str, dims))}" for name in sorted(parsed) for dims in parsed[name])


def provider_library() -> Path | None:
    """ONNX Runtime's TensorRT EP library (onnxruntime-gpu ships it beside the Python bindings)."""
    capi = Path(ort.__file__).resolve().parent / "capi"
    name = "onnxruntime_providers_tensorrt.dll" if os.name == "nt" else "libonnxruntime_providers_tensorrt.so"
    path = capi / name
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def provider_library_problem() -> str | None:
    """Why ONNX Runtime's TensorRT EP library cannot load in this process, ``None`` if it can.

    onnxruntime-gpu lists TensorRT as available even when the EP library's own dependencies (cuBLAS,
    cuDNN, libnvinfer, libnvonnxparser) are missing; ORT then logs an error and silently runs the session
    on the next provider. A compile attempted then would record a "not compilable" model for days.
    Loading the library the way ORT will (same file, same process) gives the loader's own reason instead.
    """
    lib = provider_library()
    if lib is None or os.name == "nt":
        # Windows resolves a DLL's dependencies with other search rules than ORT's loader: a probe there
        # could refuse a library ORT would load, so ORT is left to judge.
        return None
    try:
        ctypes.CDLL(str(lib))
    except OSError as e:
        return str(e)
    return None


class TensorRTProvider(ExecutionProvider):
    name: ClassVar[str] = "TensorrtExecutionProvider"
    known_options: ClassVar[frozenset[str] | None] = _KNOWN
    runtime_options: ClassVar[frozenset[str]] = _RUNTIME
    int_options: ClassVar[dict[str, tuple[int, int]]] = _INT_OPTIONS

    # -- availability -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        # onnxruntime-gpu lists TensorRT as available whether or not a GPU or libnvinfer is present;
        # a session then silently runs on CUDA or CPU. Ask the driver and the library instead.
        if self.name not in ort.get_available_providers():
            return (
                "TensorRT is not in this onnxruntime build: install onnxruntime-gpu and the tensorrt wheels "
                "(see README, 'Installing with another ONNX Runtime flavour')"
            )
        info = _nvidia.driver_info()
        if not info.gpus:
            return f"TensorRT needs an NVIDIA GPU: {info.problem}"
        version, _ = _nvidia.tensorrt_library()
        if version is None:
            return ("the TensorRT library (libnvinfer) cannot be loaded: pip install tensorrt-cu12 (or -cu13), "
                    "or add TensorRT's lib folder to the loader path")
        problem = provider_library_problem()
        if problem is not None:
            return (f"ONNX Runtime's TensorRT EP library cannot load ({problem}); install the CUDA libraries "
                    "it needs (onnxruntime.preload_dlls() loads pip-installed ones)")
        return None

    # -- options ------------------------------------------------------------------------------
    def normalize_options(self, options: Mapping[str, Any]) -> dict[str, str]:
        # ORT accepts true/false spellings for its bool options; make them one value so they key alike.
        fixed: dict[Any, Any] = {}
        for key, value in options.items():
            if key in _BOOL_OPTIONS and isinstance(value, str):
                value = "1" if value in _TRUE else "0" if value in _FALSE else value
            fixed[key] = value
        return super().normalize_options(fixed)

    def validate_options(self, options: dict[str, str]) -> None:
        for key in _BOOL_OPTIONS:
            if key in options and options[key] not in ("0", "1"):
                raise ProviderOptionError(
                    f"TensorRT option {key!r} must be 0 or 1 (or true/false), got {options[key]!r}.",
                    provider=self.name,
                    option=key,
                )
        level = options.get("trt_builder_optimization_level")
        if level is not None and not 0 <= int(level) <= 5:
            raise ProviderOptionError(
                f"TensorRT option 'trt_builder_optimization_level' must be 0-5, got {level}.",
                provider=self.name,
                option="trt_builder_optimization_level",
            )
        given = [k for k in _PROFILE_OPTIONS if options.get(k)]
        if given and len(given) != 3:
            missing = [k for k in _PROFILE_OPTIONS if k not in given]
            raise ProviderOptionError(
                f"TensorRT profile options go together: {', '.join(given)} given without {', '.join(missing)}. "
                "ONNX Runtime ignores an incomplete set.",
                provider=self.name,
                option=missing[0],
            )
        if given:
            parsed = {k: parse_profile(k, options[k]) for k in _PROFILE_OPTIONS}
            lo, opt, hi = (parsed[k] for k in _PROFILE_OPTIONS)
            if not (set(lo) == set(opt) == set(hi)):
                raise ProviderOptionError(
                    "TensorRT profile options must name the same inputs in min, opt and max shapes.",
                    provider=self.name,
                    option="trt_profile_opt_shapes",
                )
            for name in lo:
                for a, b, c in zip(lo[name], opt[name], hi[name], strict=False):
                    if not (len(a) == len(b) == len(c) and all(x <= y <= z for x, y, z in zip(a, b, c, strict=False))):
                        raise ProviderOptionError(
                            f"TensorRT profile for input {name!r} must have min <= opt <= max in every dimension "
                            f"(got {a}, {b}, {c}).",
                            provider=self.name,
                            option="trt_profile_opt_shapes",
                        )
        if options.get("trt_dla_enable") == "1" and "trt_dla_core" in options and int(options["trt_dla_core"]) < 0:
            raise ProviderOptionError(
                "TensorRT option 'trt_dla_core' must be >= 0.", provider=self.name, option="trt_dla_core"
            )

    def binary_options(self, options: dict[str, str]) -> dict[str, str]:
        out = super().binary_options(options)
        for key in list(out):
            if key in _DEFAULT_OFF and out[key] == "0":
                del out[key]
        for key in _PROFILE_OPTIONS:
            if key in out:
                out[key] = _canonical_profile(parse_profile(key, out[key]))
        if "trt_extra_plugin_lib_paths" in out:
            # Where the plugins live is not what they are; their content is keyed in ep_libraries.
            out["trt_extra_plugin_lib_paths"] = ";".join(
                sorted(os.path.basename(p) for p in out["trt_extra_plugin_lib_paths"].split(";") if p)
            )
        table = self._calibration_table(options)
        if table is not None:
            from .._hashing import file_digest

            # An int8 engine is only as right as its calibration scales: key the table's content.
            try:
                out["trt_int8_calibration_table_xxh3"] = file_digest(table)
            except OSError:
                out["trt_int8_calibration_table_xxh3"] = "unreadable"
        return dict(sorted(out.items()))

    def _calibration_table(self, options: Mapping[str, str]) -> Path | None:
        name = options.get("trt_int8_calibration_table_name")
        if not name:
            return None
        path = Path(name)
        if not path.is_absolute():
            # TensorRT EP opens the table relative to its engine cache folder.
            path = Path(options.get("trt_engine_cache_path") or ".") / name
        return path if path.is_file() else None

    # -- the provider's own caches ------------------------------------------------------------
    def side_cache_layout(self, options: Mapping[str, str]) -> dict[str, str]:
        # ORT reads a cache path only with its enable switch; its default path is the working directory.
        out = {}
        if options.get("trt_engine_cache_enable") == "1":
            out["trt_engine_cache_path"] = "tensorrt_engines"
        if options.get("trt_timing_cache_enable") == "1":
            out["trt_timing_cache_path"] = "tensorrt_timing"
        return out

    def side_cache_options(self, options: Mapping[str, str], folder: Path) -> dict[str, str]:
        out = super().side_cache_options(options, folder)
        name = options.get("trt_int8_calibration_table_name")
        table = self._calibration_table(options)
        if name and table is not None and not Path(name).is_absolute() and "trt_engine_cache_path" in out:
            # TensorRT opens a relative calibration table in the engine cache folder, which is now the key's:
            # the table goes there too (its content is keyed, so the copy is never stale).
            from .. import _fs
            from .._manifest import safe_name

            target = Path(out["trt_engine_cache_path"]) / name
            if not _fs.exists(target) and safe_name(name):
                _fs.atomic_write(target, _fs.read_small(table, 1 << 30))
        return out

    def without_side_cache(self, options: Mapping[str, str]) -> dict[str, str]:
        # Off, not just without a path: an enabled cache without one is written into the working directory.
        out = super().without_side_cache(options)
        for switch in ("trt_engine_cache_enable", "trt_timing_cache_enable"):
            out.pop(switch, None)
        return out

    # -- key parts ----------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        info = _nvidia.driver_info()
        trt, _ = _nvidia.tensorrt_library()
        return {
            "tensorrt": trt or "unknown",
            "cuda_driver": info.cuda_driver or "unknown",
            "nvidia_driver": info.driver_version or "unknown",
        }

    def library_files(self, options: dict[str, str]) -> list[Path]:
        # libnvinfer itself is keyed by its version, not its content: with its builder resources it is
        # over 1 GB, and hashing that at the first launch of every process would cost seconds.
        files = []
        lib = provider_library()
        if lib is not None:
            files.append(lib)
        for p in options.get("trt_extra_plugin_lib_paths", "").split(";"):
            if p and os.path.isfile(p):
                files.append(Path(p))
        return files

    def device_identity(self, options: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        options = options or {}
        wanted = int(options.get("device_id", "0") or 0)
        gpus = [g for g in _nvidia.driver_info().gpus if g.index == wanted]
        if not gpus:
            return [{"device_id": wanted, "missing": True}]
        gpu = gpus[0]
        major = int(gpu.compute_capability.split(".")[0])
        if options.get("trt_engine_hw_compatible") == "1" and major >= 8:
            # A hardware-compatible engine runs on any Ampere-or-newer GPU (TensorRT's AMPERE_PLUS level).
            return [{"type": "GPU", "hardware_compatibility": "ampere_plus"}]
        return [{"type": "GPU", "name": gpu.name, "compute_capability": gpu.compute_capability}]

    # -- compiling ----------------------------------------------------------------------------
    def compile_options(self, options: Mapping[str, str], out: Path, embed: bool) -> dict[str, str]:
        """The provider options for building ``out`` (an EP-context model) inside its staging folder.

        Engine, timing cache and context all land in the staging folder, never in a shared engine cache
        keyed by file name (onnxruntime issue 6455), and the whole folder becomes the entry.
        """
        staging = out.parent
        opts = {k: v for k, v in options.items() if k not in _MANAGED}
        opts.update(
            {
                "trt_dump_ep_context_model": "1",
                "trt_ep_context_file_path": str(out),
                "trt_ep_context_embed_mode": "1" if embed else "0",
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": str(staging),
                "trt_timing_cache_enable": "1",
                "trt_timing_cache_path": str(staging),
            }
        )
        return opts

    def compile_context(self, so: ort.SessionOptions, source: str | bytes, out: Path, options: dict[str, str],
                        level: ort.GraphOptimizationLevel, embed: bool) -> bool:
        opts = self.compile_options(options, out, embed)
        table = self._calibration_table(options)
        if table is not None and not Path(options["trt_int8_calibration_table_name"]).is_absolute():
            # The engine cache folder is now the staging folder; TensorRT looks for the table there.
            shutil.copyfile(table, out.parent / options["trt_int8_calibration_table_name"])
        so.graph_optimization_level = level
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(out))
        so.add_session_config_entry("ep.context_embed_mode", "1" if embed else "0")
        session = ort.InferenceSession(source, sess_options=so, providers=[self.name], provider_options=[opts])
        used = session.get_providers()
        del session
        if self.name not in used or not out.is_file():
            # The same words as ORT's compile API, so the caller records a not-compilable model (bypass).
            raise RuntimeError(f"Unable to compile any nodes: TensorRT built no engine for this model (session ran on {used})")
        return True

    # -- sessions -----------------------------------------------------------------------------
    def session(self, model: str | bytes, so: ort.SessionOptions, options: dict[str, str],
                rest: list[tuple[str, dict[str, str]]], kwargs: Mapping[str, Any] | None = None) -> ort.InferenceSession:
        options = {k: v for k, v in options.items() if k not in _EP_CONTEXT_OPTIONS}
        return super().session(model, so, options, rest, kwargs)
