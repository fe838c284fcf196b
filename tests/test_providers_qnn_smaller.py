"""Smaller QNN entries: what the real compiler and simulator here say about weightless and multi-SoC contexts.

Neither works with onnxruntime 1.32 + onnxruntime-qnn 2.7 (QNN 2.51) on this x86 host, so ctxcache offers
neither yet; each test runs the real provider in a child process (a crash must not take the suite down),
asserts today's answer, and skips naming the provider's error. The day an answer changes, the assertion
fails and says which feature can now be keyed, measured and offered.

- Weightless EP contexts (ORT 1.29+: session configs ``ep.enable_weightless``, ``ep.enable_weightless_mode``
  0/1/2, ``ep.context_source_model_path``; the Python ``ModelCompiler`` has no weightless argument): QNN
  refuses every mode at provider creation.
- Multi-SoC ("flexible") contexts (``soc_model="60,69"``, ``htp_arch="73,75"``): the compile succeeds and
  writes a larger binary, but no session here loads it, whatever the load options.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _child import run_python

import ctxcache
from ctxcache import models
from ctxcache.errors import ProviderOptionError

CHILD = """
import json, os, sys, onnxruntime as ort, onnxruntime_qnn
from ctxcache import models
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
mode, path, config, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
so = ort.SessionOptions()
for k, v in config.items():
    so.add_session_config_entry(k, v)
so.add_provider_for_devices(devs, dict(models.qnn_htp_options(), **options))
try:
    if mode == "compile":
        ort.ModelCompiler(so, path, embed_compiled_data_into_model=False,
                          graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                          flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED).compile_to_file(sys.argv[5])
        folder = os.path.dirname(sys.argv[5])
        answer = {"ok": True, "sizes": {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}}
    else:
        s = ort.InferenceSession(path, sess_options=so)
        s.run(None, models.random_input(s))
        answer = {"ok": True, "providers": s.get_providers()}
except Exception as e:
    answer = {"ok": False, "error": type(e).__name__ + ": " + str(e)}
from _report import report
report(answer)
"""


def _child(mode: str, path: Path, config: dict[str, str], options: dict[str, str], *extra: str) -> dict[str, Any]:
    proc = run_python(textwrap.dedent(CHILD), mode, str(path), json.dumps(config), json.dumps(options), *extra,
                      check=False)
    if not proc.reports:
        return {"ok": False, "error": f"the child died (return code {proc.returncode}): {proc.stderr[-500:]}"}
    return proc.reports[-1]  # type: ignore[no-any-return]


def _error_line(answer: dict[str, Any]) -> str:
    text = str(answer.get("error", ""))
    return text.split(" : ")[-1].strip()[:200] if " : " in text else text[:200]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.conv_net(tmp_path_factory.mktemp("smaller") / "m.onnx", layers=6, channels=32, seed=1)


# -- weightless EP contexts ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"ep.enable_weightless_mode": "1", "ep.context_enable": "1"}, "Weightless mode 'external_only' requested"),
        ({"ep.enable_weightless_mode": "2", "ep.context_enable": "1"}, "Weightless mode 'all' requested"),
        ({"ep.enable_weightless": "1"}, "does not implement GetWeightlessSupport"),
    ],
    ids=["mode_1_external_only", "mode_2_all", "enable_weightless"],
)
def test_qnn_refuses_weightless_contexts(model: Path, tmp_path: Path, config: dict[str, str], expected: str) -> None:
    answer = _child("compile", model, dict(config, **{"ep.context_source_model_path": str(model)}), {},
                    str(tmp_path / "ctx.onnx"))
    if answer["ok"]:
        pytest.fail(f"QNN now compiles a weightless context with {config} ({answer['sizes']}): key it on the model "
                    "it reads weights from, measure it (benchmarks/bench_entry_kinds.py) and offer it")
    assert expected in answer["error"], answer["error"]
    pytest.skip(f"weightless EP contexts: the QNN provider refuses {config}: {_error_line(answer)}")


def test_the_python_compile_api_has_no_weightless_argument() -> None:
    import inspect

    import onnxruntime as ort

    params = inspect.signature(ort.ModelCompiler.__init__).parameters
    names = [p for p in [*params, *dir(ort.ModelCompiler)] if "weight" in p.lower()]
    if names:
        pytest.fail(f"onnxruntime's ModelCompiler now has {names}: try the compile-API weightless mode with QNN")
    pytest.skip("onnxruntime's Python ModelCompiler exposes no weightless option (only the session configs do)")


# -- multi-SoC contexts ----------------------------------------------------------------------------
MULTI = {"soc_model": "60,69", "htp_arch": "73,75"}


@pytest.fixture(scope="module")
def multi_soc(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    d = tmp_path_factory.mktemp("multi")
    (d / "multi").mkdir()
    (d / "one").mkdir()
    multi = _child("compile", model, {}, MULTI, str(d / "multi" / "ctx.onnx"))
    one = _child("compile", model, {}, {}, str(d / "one" / "ctx.onnx"))
    return d / "multi" / "ctx.onnx", multi, one


def test_multi_soc_compiles_one_larger_binary(multi_soc: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    _, multi, one = multi_soc
    assert multi["ok"] and one["ok"], (multi, one)
    # one record per SoC: larger than a single-SoC binary, smaller than two of them
    assert one["sizes"]["ctx_qnn.bin"] < multi["sizes"]["ctx_qnn.bin"] < 2 * one["sizes"]["ctx_qnn.bin"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (MULTI, "only supported for EP context enabled"),
        ({}, "QNN_CONTEXT_ERROR_CREATE_FROM_BINARY"),  # soc 60 / v73, the first member
        ({"soc_model": "69", "htp_arch": "75"}, "QNN_CONTEXT_ERROR_CREATE_FROM_BINARY"),
    ],
    ids=["as_compiled", "soc_60", "soc_69"],
)
def test_multi_soc_contexts_do_not_load_here(multi_soc: tuple[Path, dict[str, Any], dict[str, Any]],
                                              options: dict[str, str], expected: str) -> None:
    ctx, multi, _ = multi_soc
    assert multi["ok"], multi
    answer = _child("load", ctx, {}, options)
    if answer["ok"]:
        pytest.fail(f"a multi-SoC QNN context now loads here with {options}: key entries on the SoC set, accept "
                    "them for any member SoC, measure them and offer the option")
    assert expected in answer["error"], answer["error"]
    pytest.skip(f"multi-SoC QNN contexts: the simulator refuses to load one ({options or 'soc 60'}): "
                f"{_error_line(answer)}")


def test_a_soc_list_is_refused_with_a_clear_error(conv_model: Path, cache_dir: Path) -> None:
    # Until a multi-SoC context loads somewhere ctxcache can test, a list is a clear error, not a context
    # that compiles and then fails at every load.
    options = dict(models.qnn_htp_options(), **MULTI)
    with pytest.raises(ProviderOptionError) as exc:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[("QNNExecutionProvider", options)])
    assert exc.value.option in ("soc_model", "htp_arch")
    assert "multi-SoC" in str(exc.value)
    assert not (cache_dir / "v1" / "entries").exists() or not list((cache_dir / "v1" / "entries").iterdir())
