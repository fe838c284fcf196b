"""Key stability (what must NOT change the key) and sensitivity (what must), with the real providers."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import QNN, run_python

import ctxcache
from ctxcache import _fingerprint, models


def _key(cache: ctxcache.ContextCache, model: Any, opts: dict[str, Any], **kw: Any) -> str:
    fp = cache.key(model, providers=[(QNN, opts)], **kw)
    assert fp is not None
    return str(fp.key)


def test_parts_are_named_and_ordered(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    fp = ctxcache.ContextCache(cache_dir).key(conv_model, providers=[(QNN, qnn_options)])
    labels = [label for label, _ in fp.parts]
    assert labels == [
        "format", "model", "ep", "ep_options", "onnxruntime", "ep_versions", "ep_libraries", "devices",
        "graph_optimization", "embed_mode", "host", "extra",
    ]
    parts = fp.as_dict()
    assert parts["onnxruntime"] == ort.__version__
    assert set(parts["ep_versions"]) == {"onnxruntime_qnn", "qnn_sdk"}
    assert "libQnnHtp.so" in parts["ep_libraries"] and "libonnxruntime_providers_qnn.so" in parts["ep_libraries"]
    assert parts["ep_options"] == {"backend_type": "htp", "enable_htp_fp16_precision": "1", "htp_arch": "73", "soc_model": "60"}


def test_stable_under_option_order_types_and_runtime_options(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model, qnn_options)
    reordered = dict(reversed(list(qnn_options.items())))
    typed = dict(qnn_options, soc_model=60, htp_arch=73, enable_htp_fp16_precision=True)
    runtime = dict(qnn_options, htp_performance_mode="burst", profiling_level="off", rpc_control_latency="100")
    assert _key(cache, conv_model, reordered) == base
    assert _key(cache, conv_model, typed) == base
    assert _key(cache, conv_model, runtime) == base


def test_stable_across_paths_bytes_and_copies(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str], tmp_path: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model, qnn_options)
    copy = tmp_path / "sub dir ü" / "copy of model.onnx"
    copy.parent.mkdir()
    shutil.copy(conv_model, copy)
    link = tmp_path / "link.onnx"
    link.symlink_to(conv_model)
    assert _key(cache, conv_model.read_bytes(), qnn_options) == base
    assert _key(cache, copy, qnn_options) == base
    assert _key(cache, link, qnn_options) == base
    assert _key(cache, str(conv_model), qnn_options) == base


def test_sensitive_to_weights_options_and_settings(cache_dir: Path, conv_model: Path, conv_model_b: Path,
                                                   qnn_options: dict[str, str]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    base = _key(cache, conv_model, qnn_options)
    keys = {
        "weights": _key(cache, conv_model_b, qnn_options),
        "soc_model": _key(cache, conv_model, dict(qnn_options, soc_model="57")),
        "htp_arch": _key(cache, conv_model, dict(qnn_options, htp_arch="75")),
        "fp16": _key(cache, conv_model, dict(qnn_options, enable_htp_fp16_precision="0")),
        "finalization": _key(cache, conv_model, dict(qnn_options, htp_graph_finalization_optimization_mode="3")),
        "extra_key": _key(ctxcache.ContextCache(cache_dir, extra_key="rev2"), conv_model, qnn_options),
        "embed": _key(ctxcache.ContextCache(cache_dir, embed=True), conv_model, qnn_options),
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    keys["optimization"] = _key(cache, conv_model, qnn_options, sess_options=so)
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys), keys


def test_sensitive_to_runtime_and_sdk_versions(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime_qnn

    base = _key(ctxcache.ContextCache(cache_dir), conv_model, qnn_options)
    # Environment parts are collected once per Loader; a fresh ContextCache sees the patched values,
    # as a fresh process after an upgrade would.
    monkeypatch.setattr(ort, "__version__", "9.9.9")
    newer_ort = _key(ctxcache.ContextCache(cache_dir), conv_model, qnn_options)
    monkeypatch.undo()
    monkeypatch.setattr(onnxruntime_qnn.build_and_package_info, "qnn_version", "2.99.0")
    newer_sdk = _key(ctxcache.ContextCache(cache_dir), conv_model, qnn_options)
    assert len({base, newer_ort, newer_sdk}) == 3


def test_sensitive_to_native_library_content(cache_dir: Path, conv_model: Path, tmp_path: Path) -> None:
    # A side-loaded backend with other content (same name) must not reuse contexts built by the old one.
    import onnxruntime_qnn

    side = tmp_path / "sdk"
    side.mkdir()
    lib = side / "libQnnHtp.so"
    shutil.copy(onnxruntime_qnn.get_qnn_htp_path(), lib)
    opts = dict(models.qnn_htp_options(), backend_path=str(lib))
    k1 = _key(ctxcache.ContextCache(cache_dir), conv_model, opts)
    with open(lib, "ab") as f:
        f.write(b"\0")  # a different build of the library
    k2 = _key(ctxcache.ContextCache(cache_dir), conv_model, opts)
    assert k1 != k2


def test_sensitive_to_external_data_content(cache_dir: Path, tmp_path: Path, qnn_options: dict[str, str]) -> None:
    model = models.conv_net(tmp_path / "m" / "net.onnx", layers=2, external_data=True)
    cache = ctxcache.ContextCache(cache_dir)
    k1 = _key(cache, model, qnn_options)
    data = model.parent / "net.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 0xFF
    data.write_bytes(bytes(blob))
    assert _key(cache, model, qnn_options) != k1


def test_diff_names_the_changed_leaf() -> None:
    old = {"onnxruntime": "1.31.1", "ep_options": {"soc_model": "60", "htp_arch": "73"}, "model": "a" * 32}
    new = {"onnxruntime": "1.32.0", "ep_options": {"soc_model": "57", "htp_arch": "73"}, "model": "a" * 32}
    assert _fingerprint.diff(old, new) == [("onnxruntime", "1.31.1", "1.32.0"), ("ep_options.soc_model", "60", "57")]


def test_provider_registry_is_lazy_and_consistent() -> None:
    from ctxcache import providers

    for name in providers._MODULES:
        cls = providers._provider_class(name)
        assert cls is not None and cls.name == name
    proc = run_python(
        "import sys, ctxcache; from _report import report; report(sorted(m for m in sys.modules if m.startswith('ctxcache.providers.')))"
    )
    # Only the interface is imported with ctxcache; a provider's module loads when it is first named.
    assert proc.result == ["ctxcache.providers._base"]
