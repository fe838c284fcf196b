"""What the NVIDIA driver and TensorRT say about this machine, read through ctypes.

Nothing here runs at import: a process without a GPU (or without the libraries) must be able to import
ctxcache for free. Each probe runs at most once per process, on first use, and never raises: a missing
library or a failing call is an answer ("no driver"), not an error. The CUDA driver API is preferred
over NVML for the device list because it numbers devices the way CUDA (and so TensorRT's
``device_id``) does, honouring ``CUDA_VISIBLE_DEVICES``; NVML numbers them in PCI order.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# cuDeviceGetAttribute codes (cuda.h): stable across CUDA 10-13.
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "8.6"


@dataclass(frozen=True)
class DriverInfo:
    """The CUDA driver's view of the machine; ``problem`` says why it is empty."""

    cuda_driver: str | None = None  # CUDA driver API version, "12.4"
    driver_version: str | None = None  # the NVIDIA display driver, "550.54.15" (NVML)
    gpus: tuple[Gpu, ...] = ()
    problem: str | None = None
    libraries: tuple[str, ...] = field(default=())  # the driver libraries actually opened


def _load(names: list[str]) -> tuple[ctypes.CDLL | None, str | None]:
    for name in names:
        try:
            lib = ctypes.WinDLL(name) if os.name == "nt" else ctypes.CDLL(name)  # type: ignore[attr-defined]
        except OSError:
            continue
        return lib, name
    return None, None


def decode_cuda_version(value: int) -> str:
    """cuDriverGetVersion's integer (12040) as "12.4"."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def decode_tensorrt_version(value: int) -> str:
    """getInferLibVersion's integer as "major.minor.patch".

    TensorRT 10 changed the encoding: NV_TENSORRT_VERSION was major*1000 + minor*100 + patch up to 8.x
    (8601 = 8.6.1) and is major*10000 + minor*100 + patch from 10.0 on (100900 = 10.9.0).
    """
    if value >= 100000:
        return f"{value // 10000}.{(value // 100) % 100}.{value % 100}"
    return f"{value // 1000}.{(value // 100) % 10}.{value % 100}"


def _cuda_names() -> list[str]:
    return ["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", "libcuda.so"]


def _nvml_names() -> list[str]:
    if os.name == "nt":
        system = os.environ.get("SYSTEMROOT", r"C:\Windows")  # Windows environment names ignore case
        return ["nvml.dll", os.path.join(system, "System32", "nvml.dll")]
    return ["libnvidia-ml.so.1", "libnvidia-ml.so"]


def _cstr(buf: ctypes.Array[ctypes.c_char]) -> str:
    return buf.value.decode("utf-8", errors="replace").strip()


def _probe_cuda(lib: ctypes.CDLL) -> tuple[str | None, list[Gpu], str | None]:
    version = ctypes.c_int(0)
    cuda_driver = None
    if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
        cuda_driver = decode_cuda_version(version.value)
    rc = lib.cuInit(0)
    if rc != 0:
        # 100 = CUDA_ERROR_NO_DEVICE, 999 = unknown (driver without a GPU, a container without /dev/nvidia*)
        return cuda_driver, [], f"cuInit failed with CUDA error {rc} (no usable NVIDIA GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return cuda_driver, [], "cuDeviceGetCount failed"
    gpus = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        if lib.cuDeviceGet(ctypes.byref(dev), i) != 0:
            continue
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGetName(name, 256, dev)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
        gpus.append(Gpu(i, _cstr(name), f"{major.value}.{minor.value}"))
    return cuda_driver, gpus, None if gpus else "the CUDA driver reports no GPU"


def _probe_nvml(lib: ctypes.CDLL) -> str | None:
    if lib.nvmlInit_v2() != 0:
        return None
    try:
        buf = ctypes.create_string_buffer(96)
        if lib.nvmlSystemGetDriverVersion(buf, 96) == 0:
            return _cstr(buf)
        return None
    finally:
        lib.nvmlShutdown()


@functools.lru_cache(maxsize=1)
def driver_info() -> DriverInfo:
    """The CUDA driver version, the display driver version and each GPU's compute capability."""
    opened = []
    cuda, cuda_name = _load(_cuda_names())
    nvml, nvml_name = _load(_nvml_names())
    driver_version = None
    if nvml is not None:
        opened.append(str(nvml_name))
        try:
            driver_version = _probe_nvml(nvml)
        except (OSError, AttributeError):  # an old NVML without a _v2 symbol
            driver_version = None
    if cuda is None:
        return DriverInfo(driver_version=driver_version, problem="no NVIDIA CUDA driver (libcuda) on this machine",
                          libraries=tuple(opened))
    opened.append(str(cuda_name))
    try:
        cuda_driver, gpus, problem = _probe_cuda(cuda)
    except (OSError, AttributeError) as e:
        return DriverInfo(driver_version=driver_version, problem=f"the CUDA driver library is unusable: {e}",
                          libraries=tuple(opened))
    return DriverInfo(cuda_driver, driver_version, tuple(gpus), problem, tuple(opened))


def _tensorrt_lib_dirs() -> list[Path]:
    """Folders where pip's TensorRT wheels keep libnvinfer (onnxruntime-gpu preloads from them too)."""
    dirs = []
    for entry in sys.path:
        for pkg in ("tensorrt_libs", "tensorrt_cu12_libs", "tensorrt_cu13_libs", "tensorrt"):
            d = Path(entry or ".") / pkg
            if d.is_dir():
                dirs.append(d)
    return dirs


def tensorrt_library_names() -> list[str]:
    if os.name == "nt":
        return ["nvinfer_10.dll", "nvinfer_11.dll", "nvinfer.dll"]
    return ["libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so.8", "libnvinfer.so"]


@functools.lru_cache(maxsize=1)
def tensorrt_library() -> tuple[str | None, str | None]:
    """``(version, path-or-name)`` of the libnvinfer this process would load, ``(None, None)`` if none.

    The loader's own search comes first (what ONNX Runtime's TensorRT EP gets when it is linked against
    the soname), then the pip wheels' folders.
    """
    names = tensorrt_library_names()
    candidates = list(names)
    for d in _tensorrt_lib_dirs():
        candidates += [str(d / n) for n in names]
    lib, name = _load(candidates)
    if lib is None:
        return None, None
    try:
        lib.getInferLibVersion.restype = ctypes.c_int32
        value = int(lib.getInferLibVersion())
    except (OSError, AttributeError):
        return None, name
    path = name
    try:
        # The path the dynamic loader resolved, so its content can be keyed (Linux only; elsewhere the name).
        if os.name != "nt":
            path = _resolved_path(name or "") or name
    except OSError:
        pass
    return decode_tensorrt_version(value), path


def _resolved_path(soname: str) -> str | None:
    if os.path.isabs(soname):
        return soname
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if parts and parts[-1].endswith("/" + soname):
                    return parts[-1]
    except OSError:
        return None
    return None
