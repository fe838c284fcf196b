"""Drop-in fidelity (issue 16): ``ctxcache.InferenceSession`` does what ``onnxruntime.InferenceSession`` does.

Each cause ONNX Runtime's own tests found (scripts/ort_dropin_tests.py), with small models of our own:
the caller's SessionOptions kept whole (free-dimension overrides, add_initializer, optimized_model_filepath);
ORT's keyword arguments and ``path_or_bytes=``; providers that compile no context (Azure, CUDA...) a
silent bypass that writes nothing anywhere; ORT-format models; other platforms' provider names and
bytearray models exactly as ORT. Every comparison is with plain onnxruntime, numerically.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import QNN
from onnx import TensorProto, helper, numpy_helper

import ctxcache
from ctxcache import errors, models

CPU = ["CPUExecutionProvider"]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _free_dims_model(path: Path, dims: tuple[Any, Any] = ("Dim1", "Dim2")) -> Path:
    """Y = X * W + B with X of shape [Dim1 (denotation DATA_BATCH), Dim2 (DATA_CHANNEL), 5] (or ``dims``)."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float32), "B")
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [*dims, 5])
    x.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    x.type.tensor_type.shape.dim[1].denotation = "DATA_CHANNEL"
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*dims, 5])
    graph = helper.make_graph([helper.make_node("Mul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])],
                              "free_dims", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _foldable_model(path: Path) -> Path:
    """Y = X * (C1 + C2): constant folding turns the Add into an initializer."""
    c1 = numpy_helper.from_array(np.full((4,), 1.5, np.float32), "C1")
    c2 = numpy_helper.from_array(np.full((4,), 0.25, np.float32), "C2")
    graph = helper.make_graph(
        [helper.make_node("Add", ["C1", "C2"], ["C"]), helper.make_node("Mul", ["X", "C"], ["Y"])], "fold",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])], [c1, c2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def free_dims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _free_dims_model(tmp_path_factory.mktemp("dropin") / "free_dims.onnx")


@pytest.fixture
def cache(cache_dir: Path) -> ctxcache.ContextCache:
    return ctxcache.ContextCache(cache_dir)


def _run(sess: ort.InferenceSession, feed: dict[str, Any]) -> np.ndarray:
    return np.asarray(sess.run(None, feed)[0])


# -- 1. SessionOptions kept whole ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["name", "denotation"])
def test_free_dimension_overrides_reach_the_session(free_dims: Path, cache: ctxcache.ContextCache, how: str) -> None:
    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        if how == "name":
            so.add_free_dimension_override_by_name("Dim1", 4)
            so.add_free_dimension_override_by_name("Dim2", 6)
        else:
            so.add_free_dimension_override_by_denotation("DATA_BATCH", 3)
            so.add_free_dimension_override_by_denotation("DATA_CHANNEL", 5)
        return so

    plain = ort.InferenceSession(str(free_dims), options(), providers=CPU)
    ours = ctxcache.InferenceSession(str(free_dims), options(), providers=CPU, cache=cache)
    assert ours.get_inputs()[0].shape == plain.get_inputs()[0].shape == ([4, 6, 5] if how == "name" else [3, 5, 5])
    x = np.random.default_rng(0).standard_normal(plain.get_inputs()[0].shape).astype(np.float32)
    np.testing.assert_array_equal(_run(ours, {"X": x}), _run(plain, {"X": x}))


def test_add_initializer_overrides_the_weights(free_dims: Path, cache: ctxcache.ContextCache) -> None:
    new_w = ort.OrtValue.ortvalue_from_numpy(np.full((5,), 7.0, np.float32))

    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.add_initializer("W", new_w)
        return so

    x = np.ones((2, 3, 5), np.float32)
    plain = _run(ort.InferenceSession(str(free_dims), options(), providers=CPU), {"X": x})
    ours = _run(ctxcache.InferenceSession(str(free_dims), options(), providers=CPU, cache=cache), {"X": x})
    untouched = _run(ort.InferenceSession(str(free_dims), providers=CPU), {"X": x})
    np.testing.assert_array_equal(ours, plain)
    assert not np.allclose(ours, untouched)  # the override took effect


def test_add_initializer_on_a_compiling_provider_never_serves_the_cached_weights(
        tmp_path: Path, cache: ctxcache.ContextCache, qnn_providers: list[Any]) -> None:
    # A context compiled from the original weights is cached first; a load that overrides a weight must
    # not get it (that would be a wrong output): a bypass on the caller's own options, nothing written.
    model = _free_dims_model(tmp_path / "static.onnx", dims=(2, 3))
    assert cache.load(model, providers=qnn_providers).outcome == "miss"
    before = _files(Path(cache.root))
    new_w = ort.OrtValue.ortvalue_from_numpy(np.full((5,), 7.0, np.float32))

    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.add_initializer("W", new_w)
        return so

    r = cache.load(model, providers=qnn_providers, sess_options=options())
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "session_settings"
    assert "add_initializer" in r.reason.message
    assert QNN in r.providers
    assert _files(Path(cache.root)) == before  # nothing written: no entry, no record, no event, no lock
    feed = {"X": np.random.default_rng(2).standard_normal((2, 3, 5)).astype(np.float32)}
    # What plain onnxruntime + QNN gives with these options (measured: the QNN plugin of onnxruntime-qnn
    # 2.7 keeps the model's own W, where CPU takes the override). The bypass is that session, whatever
    # the EP does with the override; a cached context would only be right where the EP ignores it.
    expected = _run(models.plain_qnn_session(model, options()), feed)
    np.testing.assert_allclose(_run(r.session, feed), expected, rtol=1e-3, atol=1e-3)
    assert cache.key(model, providers=qnn_providers, sess_options=options()) is None
    explained = cache.explain(model, providers=qnn_providers, sess_options=options())
    assert explained.reason is not None and explained.reason.code == "session_settings"


def test_optimized_model_filepath_is_written_where_asked_and_nothing_is_cached(
        tmp_path: Path, cache: ctxcache.ContextCache, conv_model: Path, qnn_providers: list[Any]) -> None:
    model = _foldable_model(tmp_path / "fold.onnx")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    sess = ctxcache.InferenceSession(str(model), so, providers=CPU, cache=cache)
    assert (tmp_path / "optimized.onnx").is_file()
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["Mul"]  # folded
    np.testing.assert_allclose(_run(sess, {"X": np.ones((2, 4), np.float32)}), np.full((2, 4), 1.75, np.float32))
    assert _files(Path(cache.root)) == []
    # On a compiling provider: a bypass, and exactly ORT's answer (it cannot save a graph with compiled nodes).
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized_qnn.onnx")
    with pytest.raises(Exception) as plain:
        models.plain_qnn_session(conv_model, so)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized_qnn.onnx")
    with pytest.raises(type(plain.value)) as ours:
        cache.load(conv_model, providers=qnn_providers, sess_options=so)
    assert str(ours.value) == str(plain.value)
    assert _files(Path(cache.root)) == []


def test_harmless_settings_still_hit_and_reach_the_context_session(
        conv_model: Path, cache: ctxcache.ContextCache, qnn_providers: list[Any]) -> None:
    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.force_spinning_stop", "1")  # not in any fixed list
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        return so

    assert cache.load(conv_model, providers=qnn_providers, sess_options=options()).outcome == "miss"
    r = cache.load(conv_model, providers=qnn_providers, sess_options=options())
    assert r.outcome == "hit"
    got = r.session.get_session_options()
    assert got.intra_op_num_threads == 2
    assert got.get_session_config_entry("session.force_spinning_stop") == "1"
    assert got.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_config_entries_that_may_change_a_compile_are_keyed_and_given_to_the_compile(
        conv_model: Path, cache: ctxcache.ContextCache, qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A context compiled under one setting is never served under another: an entry that is not known to
    steer only the run (threads, allocators...) is a key part, and the compile gets it."""
    from ctxcache._seams import hooks

    seen: list[dict[str, str]] = []
    real = hooks.compile

    def recording(*a: Any, **k: Any) -> float:
        seen.append(dict(k.get("config") or {}))
        return real(*a, **k)

    monkeypatch.setattr(hooks, "compile", recording)

    def options(**entries: str) -> ort.SessionOptions:
        so = ort.SessionOptions()
        for key, value in entries.items():
            so.add_session_config_entry(key.replace("__", "."), value)
        return so

    plain = cache.load(conv_model, providers=qnn_providers, sess_options=options())
    qdq = cache.load(conv_model, providers=qnn_providers, sess_options=options(session__disable_quant_qdq="1"))
    assert (plain.outcome, qdq.outcome) == ("miss", "miss") and plain.key != qdq.key
    assert seen == [{}, {"session.disable_quant_qdq": "1"}]
    again = cache.load(conv_model, providers=qnn_providers, sess_options=options(session__disable_quant_qdq="1"))
    assert again.outcome == "hit" and again.key == qdq.key
    spinning = cache.load(conv_model, providers=qnn_providers,
                          sess_options=options(session__intra_op__allow_spinning="0"))
    assert spinning.outcome == "hit" and spinning.key == plain.key  # run-time only: the same context
    assert len(seen) == 2


def test_a_background_worker_makes_the_key_of_the_apps_session_config(
        conv_model: Path, tmp_path: Path, qnn_providers: list[Any]) -> None:
    """The detached worker must compile under the app's keyed settings, or it publishes under another key
    and every launch stays pending."""
    cache = ctxcache.ContextCache(tmp_path / "bg-cache", on_miss="background")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    first = cache.load(conv_model, providers=qnn_providers, sess_options=so)
    assert first.outcome == "pending" and first.key
    assert cache.wait(first.key, 120)  # the worker published under the app's own key
    so2 = ort.SessionOptions()
    so2.add_session_config_entry("session.disable_quant_qdq", "1")
    assert cache.load(conv_model, providers=qnn_providers, sess_options=so2).outcome == "hit"


# -- 2. onnxruntime's keyword arguments ------------------------------------------------------------
def test_ort_keyword_arguments_are_forwarded_and_take_effect(tmp_path: Path, cache: ctxcache.ContextCache) -> None:
    model = _foldable_model(tmp_path / "fold.onnx")
    for kwargs, ops in (({}, ["Mul"]), ({"disabled_optimizers": ["ConstantFolding"]}, ["Add", "Mul"])):
        saved = {}
        for name, make in (("plain", ort.InferenceSession), ("ours", ctxcache.InferenceSession)):
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
            extra = {"cache": cache} if name == "ours" else {}
            sess = make(str(model), so, providers=CPU, read_config_from_model=0, enable_fallback=0, **kwargs, **extra)
            assert sess._enable_fallback is False  # enable_fallback=0 reached the session
            np.testing.assert_allclose(_run(sess, {"X": np.ones((2, 4), np.float32)}), np.full((2, 4), 1.75, np.float32))
            saved[name] = [n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node]
        assert saved["ours"] == saved["plain"] == ops  # disabled_optimizers took effect, as in ORT
    assert _files(Path(cache.root)) == []


def test_ort_keyword_arguments_reach_the_context_sessions(
        conv_model: Path, cache: ctxcache.ContextCache, qnn_providers: list[Any]) -> None:
    miss = cache.load(conv_model, providers=qnn_providers, enable_fallback=0)
    hit = cache.load(conv_model, providers=qnn_providers, enable_fallback=0)
    assert (miss.outcome, hit.outcome) == ("miss", "hit")
    assert miss.session._enable_fallback is False and hit.session._enable_fallback is False
    # Keywords that change the graph or where the options come from: a bypass, never the cached context.
    for kwargs in ({"disabled_optimizers": ["ConstantFolding"]}, {"read_config_from_model": 1}):
        r = cache.load(conv_model, providers=qnn_providers, **kwargs)
        assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "session_settings", kwargs
        assert QNN in r.providers


def test_a_misspelt_keyword_is_a_clear_type_error(conv_model: Path, cache_dir: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    with pytest.raises(errors.UnknownArgumentError) as info:
        ctxcache.InferenceSession(str(conv_model), providers=CPU, cache=cache, disable_optimizers=["ConstantFolding"])
    assert isinstance(info.value, TypeError)
    text = str(info.value)
    assert "'disable_optimizers'" in text and "did you mean 'disabled_optimizers'" in text
    assert info.value.argument == "disable_optimizers"
    assert info.value.accepted == ["disabled_optimizers", "enable_fallback", "read_config_from_model"]
    with pytest.raises(TypeError, match="frobnicate"):
        cache.load(conv_model, providers=CPU, frobnicate=1)
    assert not cache_dir.exists()


def test_path_or_bytes_is_the_first_arguments_name(conv_model: Path, cache: ctxcache.ContextCache) -> None:
    plain = ort.InferenceSession(path_or_bytes=str(conv_model), providers=CPU)
    feed = models.random_input(plain, seed=1)
    for source in (str(conv_model), conv_model.read_bytes()):
        ours = ctxcache.InferenceSession(path_or_bytes=source, providers=CPU, cache=cache)
        np.testing.assert_array_equal(_run(ours, feed), _run(plain, feed))
    ours = ctxcache.InferenceSession(model=str(conv_model), providers=CPU, cache=cache)  # ctxcache 0.2's name
    np.testing.assert_array_equal(_run(ours, feed), _run(plain, feed))
    with pytest.raises(TypeError):
        ctxcache.InferenceSession(providers=CPU, cache=cache)


# -- 3. providers that compile no context ------------------------------------------------------------
def test_available_providers_idiom_writes_nothing_anywhere(
        conv_model: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    available = ort.get_available_providers()
    assert available[0] != QNN  # the stock list of this machine: Azure (or CPU) first
    cache = ctxcache.ContextCache(cache_dir)
    plain = ort.InferenceSession(str(conv_model), providers=available)
    feed = models.random_input(plain, seed=3)
    for _ in range(3):  # a new model each time for a compile target; never one here
        r = cache.load(conv_model, providers=available)
        assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "nothing_to_compile"
        np.testing.assert_array_equal(_run(r.session, feed), _run(plain, feed))
        sess = ctxcache.InferenceSession(str(conv_model), providers=ort.get_available_providers())
        assert sess.get_providers() == plain.get_providers()
    assert not cache_dir.exists()
    assert _files(cwd) == []
    assert not Path(os.environ["CTXCACHE_DIR"]).exists()  # the default cache the drop-in used
    assert cache.stats().loads == 0


def test_azure_first_is_a_bypass_even_with_a_compiling_provider_after(conv_model: Path, cache_dir: Path,
                                                                     qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    r = cache.load(conv_model, providers=["AzureExecutionProvider", *qnn_providers])
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "nothing_to_compile"
    assert not cache_dir.exists()


# -- ORT-format models ------------------------------------------------------------------------------
def _ort_format(conv_model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "conv.ort"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(out)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(conv_model), so, providers=CPU)
    assert out.read_bytes()[4:8] == b"ORTM"
    return out


def test_an_ort_format_model_runs_as_plain_ort_runs_it(conv_model: Path, cache_dir: Path, tmp_path: Path,
                                                      qnn_providers: list[Any]) -> None:
    model = _ort_format(conv_model, tmp_path)
    cache = ctxcache.ContextCache(cache_dir)
    plain = ort.InferenceSession(str(model), providers=ort.get_available_providers())
    feed = models.random_input(plain, seed=4)
    for source in (str(model), model.read_bytes()):
        r = cache.load(source, providers=ort.get_available_providers())
        assert r.outcome == "bypass"
        np.testing.assert_array_equal(_run(r.session, feed), _run(plain, feed))
        # With a compiling provider first: no compile of an ORT-format model, ORT's own session (or its error).
        try:
            expected: Any = _run(models.plain_qnn_session(source if isinstance(source, bytes) else model), feed)
        except Exception as e:
            expected = e
        if isinstance(expected, Exception):
            with pytest.raises(type(expected)):
                cache.load(source, providers=qnn_providers)
        else:
            r = cache.load(source, providers=qnn_providers)
            assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "ort_format"
            np.testing.assert_allclose(_run(r.session, feed), expected, rtol=1e-3, atol=1e-3)
    assert not cache_dir.exists()


def test_load_model_format_ort_in_the_options_is_an_ort_format_bypass(conv_model: Path, cache_dir: Path,
                                                                      tmp_path: Path, qnn_providers: list[Any]) -> None:
    renamed = tmp_path / "conv_ort_format.bin"
    renamed.write_bytes(_ort_format(conv_model, tmp_path).read_bytes())
    so = ort.SessionOptions()
    so.add_session_config_entry("session.load_model_format", "ORT")
    cache = ctxcache.ContextCache(cache_dir)
    assert cache.key(renamed, providers=qnn_providers, sess_options=so) is None
    assert not cache_dir.exists()


# -- 4. provider names and model types exactly as ORT ---------------------------------------------------
def _as_ort(make: Any, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sess = make(*args, **kwargs)
            outcome: Any = (sess.get_providers(), _run(sess, models.random_input(sess, seed=6)).tolist())
        except Exception as e:
            outcome = (type(e), str(e))
    return outcome, [str(w.message) for w in caught if "onnxruntime" in w.filename or "Specified provider" in str(w.message)]


@pytest.mark.parametrize("providers", [
    ["DmlExecutionProvider", "CPUExecutionProvider"],
    ["CoreMLExecutionProvider", "CPUExecutionProvider"],
    [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
    ["ROCMExecutionProvider"],
    ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    ["OpenVINOExecutionProvider"],
])
@pytest.mark.parametrize("fallback", [1, 0])
def test_other_platforms_provider_lists_behave_exactly_as_ort(conv_model: Path, cache_dir: Path,
                                                              providers: list[Any], fallback: int) -> None:
    expected = _as_ort(ort.InferenceSession, str(conv_model), providers=providers, enable_fallback=fallback)
    got = _as_ort(ctxcache.InferenceSession, str(conv_model), providers=providers, enable_fallback=fallback,
                  cache=ctxcache.ContextCache(cache_dir))
    assert got == expected
    assert not cache_dir.exists()


def test_a_misspelt_provider_name_is_still_caught(conv_model: Path, cache_dir: Path) -> None:
    # The one documented difference (README): ORT warns and runs on CPU; ctxcache names the typo.
    with pytest.raises(errors.UnknownProviderError, match="did you mean 'QNNExecutionProvider'"):
        ctxcache.InferenceSession(str(conv_model), providers=["QNNExecutionProvidr"], cache=ctxcache.ContextCache(cache_dir))
    assert not cache_dir.exists()


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_a_bytearray_model_gets_ort_own_error(conv_model: Path, cache_dir: Path, qnn_providers: list[Any], kind: Any) -> None:
    data = kind(conv_model.read_bytes())
    with pytest.raises(Exception) as plain:
        ort.InferenceSession(data, providers=CPU)
    for providers in (CPU, qnn_providers):
        with pytest.raises(type(plain.value)) as ours:
            ctxcache.InferenceSession(data, providers=providers, cache=ctxcache.ContextCache(cache_dir))
        assert str(ours.value) == str(plain.value)
    assert not cache_dir.exists()


@pytest.mark.parametrize(("key", "value", "code"), [
    ("ep.context_enable", "1", "session_settings"),
    ("ep.share_ep_contexts", "1", "session_settings"),
    ("optimization.disable_specified_optimizers", "ConstantFolding", "session_settings"),
    ("session.load_model_format", "ORT", "ort_format"),
])
def test_config_entries_a_context_cannot_honour_make_a_silent_bypass(
        conv_model: Path, cache_dir: Path, qnn_providers: list[Any], key: str, value: str, code: str) -> None:
    so = ort.SessionOptions()
    so.add_session_config_entry(key, value)
    cache = ctxcache.ContextCache(cache_dir)
    assert cache.key(conv_model, providers=qnn_providers, sess_options=so) is None
    assert cache.explain(conv_model, providers=qnn_providers, sess_options=so).reason.code == code  # type: ignore[union-attr]
    # (an .onnx file read as ORT format fails in ORT itself; ep.context_enable would write beside the model)
    if key not in ("session.load_model_format", "ep.context_enable"):
        r = cache.load(conv_model, providers=qnn_providers, sess_options=so)
        assert r.outcome == "bypass" and r.reason is not None and r.reason.code == code
    assert not cache_dir.exists()
