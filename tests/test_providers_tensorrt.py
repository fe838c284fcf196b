"""TensorRT provider: key, options and versions, without a GPU.

There is no NVIDIA GPU, CUDA driver or TensorRT here (the real check is scripts/check_tensorrt.py, for a
machine that has them). The driver and TensorRT are read through ctypes; to run that code for real,
these tests build tiny stand-ins for libcuda, libnvidia-ml and libnvinfer with the system C compiler,
exporting the same C symbols, and point the probes at them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from _child import run, run_python

import ctxcache
from ctxcache import models
from ctxcache.errors import ProviderOptionError
from ctxcache.providers import _nvidia, tensorrt
from ctxcache.providers.tensorrt import TensorRTProvider

TRT = "TensorrtExecutionProvider"

FAKE_CUDA = r"""
#include <stdio.h>
#include <stdlib.h>
static int cc_minor(void) { const char* s = getenv("FAKE_CC_MINOR"); return s ? atoi(s) : 6; }
int cuDriverGetVersion(int* v) { *v = 12040; return 0; }
int cuInit(unsigned flags) { return getenv("FAKE_NO_GPU") ? 100 : 0; }
int cuDeviceGetCount(int* c) { *c = 2; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return 0; }
int cuDeviceGetName(char* n, int len, int d) {
  snprintf(n, len, "%s", d == 0 ? "NVIDIA GeForce RTX 3060" : "NVIDIA GeForce RTX 3060"); return 0; }
int cuDeviceGetAttribute(int* v, int attr, int d) {
  if (attr == 75) *v = 8; else if (attr == 76) *v = cc_minor(); else return 1; return 0; }
"""
FAKE_NVML = r"""
#include <stdio.h>
#include <stdlib.h>
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlSystemGetDriverVersion(char* b, unsigned len) {
  const char* s = getenv("FAKE_DRIVER"); snprintf(b, len, "%s", s ? s : "550.54.15"); return 0; }
"""
FAKE_NVINFER = r"""
#include <stdlib.h>
int getInferLibVersion(void) { const char* s = getenv("FAKE_TRT"); return s ? atoi(s) : 100900; }
"""


@pytest.fixture(scope="session")
def fake_libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: the ctypes probes need stand-in driver libraries built here")
    d = tmp_path_factory.mktemp("fake-nvidia")
    out = {}
    for name, src in (("libcuda.so.1", FAKE_CUDA), ("libnvidia-ml.so.1", FAKE_NVML), ("libnvinfer.so.10", FAKE_NVINFER)):
        (d / (name + ".c")).write_text(src)
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / name), str(d / (name + ".c"))], check=True)
        out[name] = d / name
    return out


def _clear_probes() -> None:
    _nvidia.driver_info.cache_clear()
    _nvidia.tensorrt_library.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, fake_libs: dict[str, Path]) -> Iterator[None]:
    """A machine with onnxruntime-gpu, an RTX 3060 (sm 8.6), driver 550.54.15 / CUDA 12.4 and TensorRT 10.9."""
    if sys.platform != "linux":
        pytest.skip("the stand-in driver libraries are built as Linux shared objects")
    monkeypatch.setattr(_nvidia, "_cuda_names", lambda: [str(fake_libs["libcuda.so.1"])])
    monkeypatch.setattr(_nvidia, "_nvml_names", lambda: [str(fake_libs["libnvidia-ml.so.1"])])
    monkeypatch.setattr(_nvidia, "tensorrt_library_names", lambda: [str(fake_libs["libnvinfer.so.10"])])
    real = ort.get_available_providers
    monkeypatch.setattr(tensorrt.ort, "get_available_providers", lambda: [TRT, *real()])
    _clear_probes()
    yield
    _clear_probes()


def _key(cache: ctxcache.ContextCache, model: Path, options: dict[str, Any] | None = None) -> str:
    fp = cache.key(model, providers=[(TRT, options or {}), "CPUExecutionProvider"])
    assert fp is not None, "TensorRT should count as available with the stand-in driver"
    return str(fp.key)


# -- versions and the driver -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"), [(100900, "10.9.0"), (100001, "10.0.1"), (101300, "10.13.0"), (8601, "8.6.1"), (8503, "8.5.3")]
)
def test_tensorrt_version_decoding(value: int, text: str) -> None:
    assert _nvidia.decode_tensorrt_version(value) == text


@pytest.mark.parametrize(("value", "text"), [(12040, "12.4"), (11080, "11.8"), (13000, "13.0")])
def test_cuda_version_decoding(value: int, text: str) -> None:
    assert _nvidia.decode_cuda_version(value) == text


def test_importing_ctxcache_probes_no_driver() -> None:
    # A GPU-less process must not pay for (or crash in) driver probing just by importing ctxcache.
    code = (
        "import ctxcache, ctxcache.providers as p; from ctxcache.providers import _nvidia; "
        "p.get('TensorrtExecutionProvider'); "
        "from _report import report; report([_nvidia.driver_info.cache_info().currsize, _nvidia.tensorrt_library.cache_info().currsize])"
    )
    assert run_python(code).result == [0, 0]


def test_no_gpu_here_is_an_answer_not_an_error() -> None:
    _clear_probes()
    try:
        info = _nvidia.driver_info()
        if info.gpus:
            pytest.skip("this machine has an NVIDIA GPU; the GPU-less path is what this test covers")
        assert info.problem
        assert TensorRTProvider().unavailable_reason() is not None
    finally:
        _clear_probes()


def test_driver_probe_through_ctypes(fake_gpu: None) -> None:
    info = _nvidia.driver_info()
    assert info.cuda_driver == "12.4"
    assert info.driver_version == "550.54.15"
    assert [(g.index, g.name, g.compute_capability) for g in info.gpus] == [
        (0, "NVIDIA GeForce RTX 3060", "8.6"),
        (1, "NVIDIA GeForce RTX 3060", "8.6"),
    ]
    assert _nvidia.tensorrt_library()[0] == "10.9.0"
    assert TensorRTProvider().unavailable_reason() is None
    assert TensorRTProvider().versions() == {"tensorrt": "10.9.0", "cuda_driver": "12.4", "nvidia_driver": "550.54.15"}


def test_driver_without_gpu_is_unavailable(fake_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NO_GPU", "1")
    _clear_probes()
    reason = TensorRTProvider().unavailable_reason()
    assert reason is not None and "CUDA error 100" in reason


def test_gpu_less_machine_gets_a_working_session(conv_model: Path, cache_dir: Path) -> None:
    """Never break the app: TensorRT requested where it cannot run is a bypass with a CPU session."""
    cache = ctxcache.ContextCache(cache_dir)
    r = cache.load(conv_model, providers=[(TRT, {"trt_fp16_enable": "1"}), "CPUExecutionProvider"])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "provider_unavailable"
    assert r.providers == ("CPUExecutionProvider",)
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)


def test_compile_that_takes_no_node_is_a_bypass(fake_gpu: None, conv_model: Path, cache_dir: Path) -> None:
    """The compile hook's path through the loader: this CPU build cannot run TensorRT, so the session it
    compiles with ends up on CPU; that must be a not-compilable bypass with a working session."""
    cache = ctxcache.ContextCache(cache_dir)
    r = cache.load(conv_model, providers=[(TRT, {}), "CPUExecutionProvider"])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "not_compilable"
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)
    assert cache.entries() == []


# -- the key -------------------------------------------------------------------------------------
def test_same_file_name_other_model_never_shares_an_entry(fake_gpu: None, tmp_path: Path) -> None:
    """onnxruntime issue 6455: TensorRT's own engine cache keys on the file name; ctxcache on content."""
    a = models.conv_net(tmp_path / "app_a" / "model.onnx", seed=1)
    b = models.conv_net(tmp_path / "app_b" / "model.onnx", seed=2)
    a_copy = tmp_path / "elsewhere" / "renamed.onnx"
    a_copy.parent.mkdir()
    shutil.copyfile(a, a_copy)
    cache = ctxcache.ContextCache(tmp_path / "cache")
    opts = {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp_path / "trt")}
    assert _key(cache, a, opts) != _key(cache, b, opts)
    assert _key(cache, a, opts) == _key(cache, a_copy, opts)


def test_engine_shaping_options_change_the_key(fake_gpu: None, conv_model: Path, cache_dir: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model)
    prof = {"trt_profile_min_shapes": "input:1x3x32x32", "trt_profile_opt_shapes": "input:1x3x32x32",
            "trt_profile_max_shapes": "input:4x3x32x32"}
    variants = [
        {"trt_fp16_enable": "1"},
        {"trt_int8_enable": "1"},
        {"trt_bf16_enable": "1"},
        {"trt_max_workspace_size": str(1 << 30)},
        {"trt_builder_optimization_level": "5"},
        {"trt_engine_hw_compatible": "1"},
        {"trt_tactic_sources": "-CUBLASLT"},
        {"trt_op_types_to_exclude": "NonZero"},
        {"trt_min_subgraph_size": "3"},
        prof,
        dict(prof, trt_profile_max_shapes="input:8x3x32x32"),
    ]
    keys = [_key(cache, conv_model, v) for v in variants]
    assert base not in keys
    assert len(set(keys)) == len(keys)


def test_runtime_options_and_spellings_do_not(fake_gpu: None, conv_model: Path, cache_dir: Path, tmp_path: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model, {"trt_fp16_enable": "1"})
    same = [
        {"trt_fp16_enable": True},
        {"trt_fp16_enable": "true", "trt_int8_enable": "False", "trt_engine_hw_compatible": 0},
        {"trt_fp16_enable": "1", "trt_engine_cache_path": str(tmp_path / "a"), "trt_timing_cache_path": str(tmp_path / "b")},
        {"trt_fp16_enable": "1", "trt_cuda_graph_enable": "1", "trt_detailed_build_log": "1", "trt_dump_subgraphs": "1"},
        {"trt_fp16_enable": "1", "trt_dump_ep_context_model": "1", "trt_ep_context_file_path": "x.onnx"},
        # device 1 is the same GPU model as device 0 here: identical cards share an entry
        {"trt_fp16_enable": "1", "device_id": "1"},
    ]
    assert [_key(cache, conv_model, s) for s in same] == [base] * len(same)


def test_engine_and_timing_caches_key_on_being_kept_not_on_where(fake_gpu: None, conv_model: Path, cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    # Two apps with other cache paths share one entry; a cache kept (in the key's own folder) is another.
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model, {"trt_fp16_enable": "1"})
    cached = [_key(cache, conv_model, {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
                                       "trt_engine_cache_path": str(tmp_path / app), "trt_timing_cache_enable": "1",
                                       "trt_timing_cache_path": str(tmp_path / app / "t")}) for app in ("a", "b")]
    engine_only = _key(cache, conv_model, {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1"})
    assert cached[0] == cached[1]
    assert len({base, cached[0], engine_only}) == 3


def test_profile_order_between_inputs_does_not_matter(fake_gpu: None, conv_model: Path, cache_dir: Path) -> None:
    p = TensorRTProvider()
    one = p.binary_options(p.normalize_options({
        "trt_profile_min_shapes": "b:1x2,a:1x3", "trt_profile_opt_shapes": "b:2x2,a:1x3", "trt_profile_max_shapes": "b:4x2,a:1x3"}))
    two = p.binary_options(p.normalize_options({
        "trt_profile_min_shapes": "a:1x3,b:1x2", "trt_profile_opt_shapes": "a:1x3,b:2x2", "trt_profile_max_shapes": "a:1x3,b:4x2"}))
    assert one == two
    assert one["trt_profile_max_shapes"] == "a:1x3,b:4x2"


@pytest.mark.parametrize(
    ("env", "value"),
    [("FAKE_TRT", "101300"), ("FAKE_DRIVER", "560.35.03"), ("FAKE_CC_MINOR", "9")],
    ids=["tensorrt-version", "driver-version", "compute-capability"],
)
def test_environment_changes_the_key(fake_gpu: None, monkeypatch: pytest.MonkeyPatch, conv_model: Path,
                                     tmp_path: Path, env: str, value: str) -> None:
    before = _key(ctxcache.ContextCache(tmp_path / "c1"), conv_model)
    monkeypatch.setenv(env, value)
    _clear_probes()
    after = _key(ctxcache.ContextCache(tmp_path / "c2"), conv_model)  # a new cache: a new process's view
    assert before != after


def test_hardware_compatible_engines_key_on_the_gpu_class(fake_gpu: None, monkeypatch: pytest.MonkeyPatch,
                                                          conv_model: Path, tmp_path: Path) -> None:
    opts = {"trt_engine_hw_compatible": "1"}
    before = _key(ctxcache.ContextCache(tmp_path / "c1"), conv_model, opts)
    monkeypatch.setenv("FAKE_CC_MINOR", "9")  # an Ada GPU instead of an Ampere one
    _clear_probes()
    assert _key(ctxcache.ContextCache(tmp_path / "c2"), conv_model, opts) == before
    assert TensorRTProvider().device_identity(opts) == [{"type": "GPU", "hardware_compatibility": "ampere_plus"}]


def test_calibration_table_content_is_keyed(fake_gpu: None, conv_model: Path, cache_dir: Path, tmp_path: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    tables = tmp_path / "trt"
    tables.mkdir()
    opts = {"trt_int8_enable": "1", "trt_int8_calibration_table_name": "calib.flatbuffers",
            "trt_engine_cache_path": str(tables)}
    (tables / "calib.flatbuffers").write_bytes(b"scales v1")
    k1 = _key(cache, conv_model, opts)
    (tables / "calib.flatbuffers").write_bytes(b"scales v2")
    k2 = _key(ctxcache.ContextCache(tmp_path / "other"), conv_model, opts)
    assert k1 != k2


# -- option checks -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"trt_fp16_enabel": "1"}, "trt_fp16_enabel"),
        ({"trt_fp16_enable": "yes"}, "trt_fp16_enable"),
        ({"trt_max_workspace_size": "2GB"}, "trt_max_workspace_size"),
        ({"trt_builder_optimization_level": "7"}, "trt_builder_optimization_level"),
        ({"trt_profile_min_shapes": "input:1x3x32x32"}, "trt_profile_opt_shapes"),
        ({"trt_profile_min_shapes": "input:4x3", "trt_profile_opt_shapes": "input:2x3",
          "trt_profile_max_shapes": "input:8x3"}, "trt_profile_opt_shapes"),
        ({"trt_profile_min_shapes": "input=1x3", "trt_profile_opt_shapes": "input:1x3",
          "trt_profile_max_shapes": "input:1x3"}, "trt_profile_min_shapes"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(options: dict[str, str], option: str, conv_model: Path,
                                                         cache_dir: Path) -> None:
    with pytest.raises(ProviderOptionError) as exc:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(TRT, options)])
    assert exc.value.option == option
    assert not cache_dir.exists()


def test_compile_keeps_engine_and_timing_cache_inside_the_entry(tmp_path: Path) -> None:
    p = TensorRTProvider()
    user = p.normalize_options({"trt_fp16_enable": "1", "trt_engine_cache_enable": "1",
                                "trt_engine_cache_path": "/shared/engines", "trt_timing_cache_path": "/shared/timing",
                                "trt_engine_cache_prefix": "app", "trt_dump_ep_context_model": "0"})
    staging = tmp_path / "staging"
    opts = p.compile_options(user, staging / "ctx.onnx", embed=False)
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(staging)
    assert opts["trt_timing_cache_enable"] == opts["trt_engine_cache_enable"] == opts["trt_dump_ep_context_model"] == "1"
    assert opts["trt_ep_context_file_path"] == str(staging / "ctx.onnx")
    assert opts["trt_ep_context_embed_mode"] == "0"
    assert "trt_engine_cache_prefix" not in opts
    assert opts["trt_fp16_enable"] == "1"
    assert p.compile_options(user, staging / "ctx.onnx", embed=True)["trt_ep_context_embed_mode"] == "1"


# -- the real onnxruntime-gpu build, on this GPU-less machine --------------------------------------
GPU_BUILD = """
import json, sys, warnings
from _report import report
import ctxcache
from ctxcache import models
from ctxcache.providers import _nvidia, tensorrt
fake = json.loads(sys.argv[1])
if fake:  # a driver and TensorRT that answer, so the EP library's own dependencies are what is judged
    _nvidia._cuda_names = lambda: [fake["libcuda.so.1"]]
    _nvidia._nvml_names = lambda: [fake["libnvidia-ml.so.1"]]
    _nvidia.tensorrt_library_names = lambda: [fake["libnvinfer.so.10"]]
import onnxruntime as ort
m = models.conv_net(sys.argv[2])
p = tensorrt.TensorRTProvider()
r = ctxcache.ContextCache(sys.argv[3]).load(m, providers=[("TensorrtExecutionProvider", {"trt_fp16_enable": "1"}),
                                                         "CUDAExecutionProvider", "CPUExecutionProvider"])
out = r.session.run(None, models.random_input(r.session))[0]
report({"listed": "TensorrtExecutionProvider" in ort.get_available_providers(),
        "outcome": r.outcome, "code": r.reason.code if r.reason else None,
        "message": r.reason.message if r.reason else "", "providers": r.providers,
        "shape": list(out.shape), "libs": [f.name for f in p.library_files({})]})
"""


def _gpu_build_python() -> Path | None:
    import os

    root = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("CTXCACHE_ORT_GPU_PYTHON"), str(root / ".venv-ort-gpu" / "bin" / "python"),
                 "/tmp/venv-gpu/bin/python"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


@pytest.mark.parametrize("with_driver", [False, True], ids=["no-driver", "stand-in-driver"])
def test_onnxruntime_gpu_build_without_a_usable_tensorrt_is_a_bypass(with_driver: bool, fake_libs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """onnxruntime-gpu lists TensorRT as available on any machine; a session asked for it then silently
    runs elsewhere. ctxcache must say why instead, and still give the app a working session."""
    import json

    python = _gpu_build_python()
    if python is None:
        pytest.skip("no onnxruntime-gpu venv (.ci/run creates .venv-ort-gpu; set CTXCACHE_ORT_GPU_PYTHON)")
    fake = {k: str(v) for k, v in fake_libs.items()} if with_driver else {}
    res = run([str(python), "-c", GPU_BUILD, json.dumps(fake), str(tmp_path / "m.onnx"), str(tmp_path / "cache")],
              timeout=300, check=True).result
    assert res["listed"], "onnxruntime-gpu is expected to list TensorRT whatever the machine"
    assert res["outcome"] == "bypass" and res["code"] == "provider_unavailable"
    if with_driver:
        # the machine's CUDA libraries decide which one is missing first (cuBLAS, libnvinfer, cuDNN...)
        assert "TensorRT EP library cannot load" in res["message"] and ".so" in res["message"]
    else:
        assert "needs an NVIDIA GPU" in res["message"]
    assert "TensorrtExecutionProvider" not in res["providers"]
    assert res["shape"] == [1, 16, 32, 32]
    assert res["libs"] == ["libonnxruntime_providers_tensorrt.so"]


GPU_SIDE = """
import json, os, sys
from pathlib import Path
import ctxcache
from ctxcache import _side, models
from ctxcache._cache import store_of
from ctxcache._inputs import resolve_providers
from ctxcache.providers import _nvidia, tensorrt
fake = json.loads(sys.argv[1])
_nvidia._cuda_names = lambda: [fake["libcuda.so.1"]]
_nvidia._nvml_names = lambda: [fake["libnvidia-ml.so.1"]]
_nvidia.tensorrt_library_names = lambda: [fake["libnvinfer.so.10"]]
tensorrt.provider_library_problem = lambda: None  # as on a machine whose CUDA libraries all load
tmp = Path(sys.argv[2])
# onnxruntime#6455 / #32254: two apps' model.onnx, one structure, other weights
a = models.conv_net(tmp / "app_a" / "model.onnx", seed=1)
b = models.conv_net(tmp / "app_b" / "model.onnx", seed=2)
cache = ctxcache.ContextCache(tmp / "cache")
def opts(app):
    return {"trt_fp16_enable": "1", "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp / app / "trt"),
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(tmp / app / "trt")}
keys = {f"{m.parent.name}:{app}": cache.key(m, providers=[("TensorrtExecutionProvider", opts(app))]).key
        for m in (a, b) for app in ("app_a", "app_b")}
store = store_of(cache)
store.ensure()
governed = {name: _side.govern(store, key, resolve_providers([("TensorrtExecutionProvider", opts("app_a"))], None))[0][1]
            for name, key in keys.items()}
from _report import report
report({"keys": keys, "governed": governed, "side": str(store.side_root),
        "user_files": sorted(str(p) for p in tmp.glob("app_*/trt*"))})
"""


def test_each_model_gets_its_own_engine_folder_in_the_gpu_build(fake_libs: dict[str, Path], tmp_path: Path) -> None:
    """The real onnxruntime-gpu build and TensorRT provider module (the stand-in driver answers; nothing
    runs on a GPU): engine and timing caches of two same-named models land in two folders of their keys."""
    import json

    python = _gpu_build_python()
    if python is None:
        pytest.skip("no onnxruntime-gpu venv (.ci/run creates .venv-ort-gpu; set CTXCACHE_ORT_GPU_PYTHON)")
    res = run([str(python), "-c", GPU_SIDE, json.dumps({k: str(v) for k, v in fake_libs.items()}), str(tmp_path)],
              timeout=300, check=True).result
    keys = res["keys"]
    assert keys["app_a:app_a"] == keys["app_a:app_b"] != keys["app_b:app_a"] == keys["app_b:app_b"]
    for name, options in res["governed"].items():
        folder = Path(res["side"]) / keys[name]
        assert options["trt_engine_cache_path"] == str(folder / "tensorrt_engines")
        assert options["trt_timing_cache_path"] == str(folder / "tensorrt_timing")
        assert Path(options["trt_engine_cache_path"]).is_dir()
    assert res["governed"]["app_a:app_a"]["trt_engine_cache_path"] != res["governed"]["app_b:app_a"]["trt_engine_cache_path"]
    assert res["user_files"] == []
