"""CoreML and DirectML: bypasses by decision (see their modules); here, their option checks and that a
load with them first still gives the app a working session and writes nothing into the cache.

Neither provider exists in a Linux onnxruntime build, so ORT itself runs these sessions on CPU (with its
"not in available provider names" warning), as it would for the app without ctxcache.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

import ctxcache
from ctxcache import models
from ctxcache.errors import ProviderOptionError

COREML = "CoreMLExecutionProvider"
DML = "DmlExecutionProvider"


@pytest.mark.parametrize(
    ("provider", "options"),
    [
        (COREML, {"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndNeuralEngine", "RequireStaticInputShapes": "1"}),
        (DML, {"device_id": 0, "performance_preference": "high_performance", "device_filter": "npu"}),
    ],
)
def test_bypass_with_a_working_session_and_an_empty_cache(provider: str, options: dict[str, Any], conv_model: Path,
                                                           cache_dir: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ORT: provider not in this build
        r = cache.load(conv_model, providers=[(provider, options), "CPUExecutionProvider"])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "nothing_to_compile" and provider in r.reason.message
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)
    assert cache.entries() == []
    assert cache.key(conv_model, providers=[(provider, options)]) is None


@pytest.mark.parametrize(
    ("provider", "options", "option", "hint"),
    [
        (COREML, {"ModelCacheDir": "/tmp/x"}, "ModelCacheDir", "ModelCacheDirectory"),
        (COREML, {"MLComputeUnits": "NPU"}, "MLComputeUnits", "CPUAndNeuralEngine"),
        (COREML, {"ModelFormat": "mlprogram"}, "ModelFormat", "MLProgram"),
        (COREML, {"RequireStaticInputShapes": "yes"}, "RequireStaticInputShapes", "0 or 1"),
        (DML, {"performance_preferense": "default"}, "performance_preferense", "performance_preference"),
        (DML, {"device_filter": "cpu"}, "device_filter", "gpu, npu, any"),
        (DML, {"device_id": "first"}, "device_id", "whole number from 0"),
        (DML, {"device_id": -1}, "device_id", "from 0 to"),
    ],
)
def test_bad_options_are_refused(provider: str, options: dict[str, str], option: str, hint: str, conv_model: Path,
                                 cache_dir: Path) -> None:
    with pytest.raises(ProviderOptionError) as exc:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(provider, options)])
    assert exc.value.option == option
    assert hint in str(exc.value)
