"""What the app's SessionOptions mean for the key, the compile and the hit session (issues 21.3, 19, 22.1).

- Free-dimension overrides (by name, by denotation) are key parts replayed on the compile and the context
  session: a dynamic-batch model with an override is a miss, then a hit, with plain ORT's outputs; without
  one, the reason names the open dimension and the fix; ``ctxcache warm`` takes the same overrides.
- Config entries set before ``import ctxcache`` reach the key and the compile (read by name, once).
- A hit session refuses to compile (``session.disable_model_compile=1``): a context that a provider would
  compile again is a counted fallback (``context_recompiles``), not a slow hit; nodes left on CPU are not
  compilation.

Real ONNX Runtime, the real QNN compiler and simulator, real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import xxhash
from conftest import QNN, ROOT, run_python
from onnx import TensorProto, helper, numpy_helper

import ctxcache
from ctxcache import _inputs, _sessopts, models
from ctxcache._hashing import signature

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def dyn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.conv_net(tmp_path_factory.mktemp("dyn") / "dyn.onnx", layers=3, channels=8, size=16, seed=5,
                           batch="batch")


def _overridden(how: str = "name", value: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if how == "name":
        so.add_free_dimension_override_by_name("batch", value)
    else:
        so.add_free_dimension_override_by_denotation("DATA_BATCH", value)
    return so


def _feed(batch: int = 1) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(7).random((batch, 3, 16, 16), dtype=np.float32)}


def _out(sess: ort.InferenceSession, batch: int = 1) -> np.ndarray:
    return np.asarray(sess.run(None, _feed(batch))[0])


# -- 1. dynamic shapes -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["name", "denotation"])
def test_a_dynamic_batch_model_with_an_override_misses_then_hits_with_plain_orts_outputs(
        dyn_model: Path, cache_dir: Path, qnn_providers: list[Any], how: str) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden(how))
    second = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden(how))
    assert (first.outcome, second.outcome) == ("miss", "hit"), (first.reason, second.reason)
    assert first.key == second.key and QNN in second.providers
    assert second.session.get_inputs()[0].shape == [1, 3, 16, 16]
    # Plain ORT with the same override: the QNN JIT session bit for bit; CPU within fp16's precision.
    jit = _out(models.plain_qnn_session(dyn_model, _overridden(how)))
    cpu = _out(ort.InferenceSession(str(dyn_model), _overridden(how), providers=CPU))
    np.testing.assert_array_equal(_out(second.session), jit)
    np.testing.assert_array_equal(_out(first.session), jit)
    np.testing.assert_allclose(_out(second.session), cpu, rtol=2e-2, atol=2e-2)
    assert cache.key(dyn_model, providers=qnn_providers, sess_options=_overridden(how)) is not None


def test_a_dynamic_batch_model_without_an_override_gets_a_reason_naming_the_dimension_and_the_fix(
        dyn_model: Path, cache_dir: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    r = cache.load(dyn_model, providers=qnn_providers)
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "not_compilable"
    for text in ("input 'input' dim 0 'batch'", "add_free_dimension_override_by_name('batch', 1)",
                 "ctxcache warm --free-dim batch=1"):
        assert text in r.reason.message, r.reason.message
    again = cache.load(dyn_model, providers=qnn_providers)  # remembered: the same words, no second compile
    assert again.reason is not None and again.reason.code == "not_compilable"
    assert "'batch'" in again.reason.message and again.timings.compile == 0
    np.testing.assert_array_equal(_out(again.session), _out(models.plain_qnn_session(dyn_model)))


def test_an_override_that_leaves_another_dimension_open_names_that_one(
        tmp_path: Path, cache_dir: Path, qnn_providers: list[Any]) -> None:
    model = _two_open_dims(tmp_path / "two.onnx")
    so = ort.SessionOptions()
    so.add_free_dimension_override_by_name("batch", 1)
    r = ctxcache.ContextCache(cache_dir).load(model, providers=qnn_providers, sess_options=so)
    assert r.reason is not None and r.reason.code == "not_compilable"
    assert "input 'x' dim 2 'width'" in r.reason.message and "'batch'" not in r.reason.message


def test_other_override_values_make_other_keys(dyn_model: Path, cache_dir: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    one = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden("name", 1))
    two = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden("name", 2))
    by_denotation = cache.key(dyn_model, providers=qnn_providers, sess_options=_overridden("denotation", 1))
    assert (one.outcome, two.outcome) == ("miss", "miss")
    assert len({one.key, two.key, by_denotation.key if by_denotation else None}) == 3
    assert two.session.get_inputs()[0].shape == [2, 3, 16, 16]
    np.testing.assert_array_equal(_out(two.session, 2), _out(models.plain_qnn_session(dyn_model, _overridden("name", 2)), 2))
    assert cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden("name", 2)).outcome == "hit"
    fp = cache.key(dyn_model, providers=qnn_providers, sess_options=_overridden("name", 2))
    assert fp is not None and fp.get("session_config") == {_sessopts.FREE_DIMS: '[["name","batch",2]]'}


def test_a_background_worker_compiles_with_the_apps_overrides(dyn_model: Path, tmp_path: Path,
                                                               qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "bg", on_miss="background")
    first = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden())
    assert first.outcome == "pending" and first.key
    assert cache.wait(first.key, 120)  # published under the app's own key: the worker replayed the override
    r = cache.load(dyn_model, providers=qnn_providers, sess_options=_overridden())
    assert r.outcome == "hit" and r.key == first.key


@pytest.mark.parametrize("flag", [["--free-dim", "batch=1"], ["--free-dim-denotation", "DATA_BATCH=1"]])
def test_ctxcache_warm_takes_the_overrides(dyn_model: Path, cache_dir: Path, qnn_providers: list[Any],
                                           flag: list[str]) -> None:
    cli = Path(sys.executable).with_name("ctxcache")
    proc = subprocess.run([str(cli), "warm", str(dyn_model), "--cache-dir", str(cache_dir), "--format", "json", *flag],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    how = "name" if flag[0] == "--free-dim" else "denotation"
    r = ctxcache.ContextCache(cache_dir).load(dyn_model, providers=qnn_providers, sess_options=_overridden(how))
    assert r.outcome == "hit", r.reason


@pytest.mark.parametrize("bad", ["batch", "batch=x", "=1", "batch=1.5"])
def test_ctxcache_warm_refuses_a_malformed_override(dyn_model: Path, cache_dir: Path, bad: str) -> None:
    cli = Path(sys.executable).with_name("ctxcache")
    proc = subprocess.run([str(cli), "warm", str(dyn_model), "--cache-dir", str(cache_dir), "--free-dim", bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--free-dim" in proc.stderr, proc.stderr
    assert not cache_dir.exists() or not any(cache_dir.rglob("manifest.json"))


def test_the_override_dict_round_trips_and_refuses_junk() -> None:
    so = ort.SessionOptions()
    so.add_free_dimension_override_by_name("batch", 2)
    so.add_free_dimension_override_by_denotation("DATA_CHANNEL", 3)
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.add_session_config_entry("ctxcache.free_dimension_overrides", "nonsense")  # an app's own: means nothing to ORT
    config = _inputs.compile_config(so)
    assert config == {"session.disable_quant_qdq": "1",
                      _sessopts.FREE_DIMS: '[["name","batch",2],["denotation","DATA_CHANNEL",3]]'}
    again = ort.SessionOptions()
    _sessopts.apply_config(again, config)
    assert _inputs.compile_config(again) == config
    for junk in ('{"a":1}', '[["size","batch",1]]', '[["name","batch","1"]]', '[["name","batch",true]]', "["):
        with pytest.raises(ValueError):
            _sessopts.apply_config(ort.SessionOptions(), {_sessopts.FREE_DIMS: junk})
    with pytest.raises(ValueError):
        _sessopts.apply_config(ort.SessionOptions(), {"ctxcache.other": "1"})


# -- 2. options configured before `import ctxcache` ---------------------------------------------------
_BEFORE_IMPORT = """
import json, sys
import onnxruntime as ort
def options(entries):
    so = ort.SessionOptions()
    for k, v in entries.items():
        so.add_session_config_entry(k, v)
    return so
made_before = [options({}), options({"session.disable_quant_qdq": "1"}),
               options({"session.disable_quant_qdq": "1", "session.intra_op.allow_spinning": "0"}),
               options({"optimization.enable_gelu_approximation": "1"}), options({})]
import ctxcache
from ctxcache import models
from ctxcache._seams import hooks
made_before[4].add_session_config_entry("session.disable_aot_function_inlining", "1")  # partly noted
seen = []
real = hooks.compile
def recording(*a, **k):
    seen.append(dict(k.get("config") or {}))
    return real(*a, **k)
hooks.compile = recording
cache = ctxcache.ContextCache(sys.argv[1])
providers = [("QNNExecutionProvider", models.qnn_htp_options())]
out = []
for so in made_before + [options({"session.disable_quant_qdq": "1"})]:
    r = cache.load(sys.argv[2], providers=providers, sess_options=so)
    out.append([r.outcome, r.key, r.reason.code if r.reason else None])
hit = cache.load(sys.argv[2], providers=providers, sess_options=made_before[2]).session.get_session_options()
with open(sys.argv[3], "w") as f:
    json.dump({"loads": out, "compiles": seen, "spinning": hit.get_session_config_entry("session.intra_op.allow_spinning")}, f)
"""


def test_config_entries_set_before_import_reach_the_key_and_the_compile(
        conv_model: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    script = tmp_path / "before_import.py"
    script.write_text(_BEFORE_IMPORT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(conv_model), str(report)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(report.read_text())
    (plain, qdq, qdq_spin, gelu, partly, qdq_after) = got["loads"]
    assert plain[0] == "miss" and qdq[0] == "miss" and plain[1] != qdq[1]  # two configurations, two entries
    assert qdq_spin[:2] == ["hit", qdq[1]]  # a run-time entry is not keyed
    assert qdq_after[:2] == ["hit", qdq[1]]  # the same entry set after the import: the same key
    assert gelu[0] == "bypass" and gelu[2] == "session_settings"  # seen although set before the import
    assert partly[0] == "miss" and partly[1] not in (plain[1], qdq[1])
    assert got["compiles"] == [{}, {"session.disable_quant_qdq": "1"}, {"session.disable_aot_function_inlining": "1"}]
    assert got["spinning"] == "0"  # and the run-time entry reaches the context session


def test_only_objects_made_before_the_import_are_read_by_name() -> None:
    so = ort.SessionOptions()
    assert _sessopts.complete(so)
    calls: list[str] = []

    class Probe:
        """Stands for an object ctxcache never saw made: counts the reads by name."""

        def get_session_config_entry(self, key: str) -> str:
            calls.append(key)
            raise RuntimeError("not set")

    probe = Probe()
    assert _inputs.session_entries(so) == {}
    assert _inputs.session_entries(probe) == {}  # type: ignore[arg-type]
    first = len(calls)
    assert first == len(_inputs._KNOWN_KEYS)
    _inputs.session_entries(probe)  # type: ignore[arg-type]
    assert len(calls) == first  # read once per object


# -- 3. a hit is a hit ----------------------------------------------------------------------------
def _reseal(entry: Path) -> None:
    """Re-record the manifest's artifacts as whoever wrote them would: the integrity checks pass."""
    m = json.loads((entry / "manifest.json").read_text())
    for art in m["artifacts"]:
        p = entry / art["name"]
        art.update(size=p.stat().st_size, xxh3=xxhash.xxh3_128(p.read_bytes()).hexdigest(), sig=list(signature(os.lstat(p))))
    (entry / "manifest.json").write_text(json.dumps(m))


def _partly_cpu_model(path: Path) -> Path:
    """conv -> Erf -> conv: QNN's HTP takes the convs, Erf stays on CPU (measured: two EPContext nodes
    and an Erf node in the compiled model)."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32), "w0"),
             numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], pads=[1] * 4), helper.make_node("Erf", ["c0"], ["u"]),
             helper.make_node("Conv", ["u", "w1"], ["output"], pads=[1] * 4)]
    graph = helper.make_graph(nodes, "partly_cpu", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _two_open_dims(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "two_open",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "width"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_context_that_leaves_nodes_on_cpu_still_hits(tmp_path: Path, cache_dir: Path, qnn_providers: list[Any]) -> None:
    model = _partly_cpu_model(tmp_path / "partly.onnx")
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(model, providers=qnn_providers)
    second = cache.load(model, providers=qnn_providers)
    assert (first.outcome, second.outcome) == ("miss", "hit"), (first.reason, second.reason)
    ops = [n.op_type for n in onnx.load(str(second.entry_path / "ctx.onnx"), load_external_data=False).graph.node]
    assert "Erf" in ops and "EPContext" in ops  # the context really leaves a node to CPU
    got = second.session.get_session_options()
    assert got.get_session_config_entry(_inputs.DISABLE_COMPILE) == "1"
    np.testing.assert_array_equal(_out(second.session), _out(models.plain_qnn_session(model)))


def _add_a_compilable_node(context: Path) -> None:
    """Append Relu after the context's EPContext node: a context that leaves QNN a node to JIT-compile."""
    m = onnx.load(str(context), load_external_data=False)
    ep = next(n for n in m.graph.node if n.op_type == "EPContext")
    ep.output[0] = "before_relu"
    m.graph.node.append(helper.make_node("Relu", ["before_relu"], [m.graph.output[0].name]))
    typed = onnx.ValueInfoProto()
    typed.CopyFrom(m.graph.output[0])
    typed.name = "before_relu"
    m.graph.value_info.append(typed)
    onnx.save(m, str(context))


@pytest.mark.parametrize("doctor", ["original_model", "past_the_store_check", "extra_node"])
def test_a_context_the_provider_would_compile_again_is_a_fallback_not_a_slow_hit(
        conv_model: Path, cache_dir: Path, qnn_providers: list[Any], doctor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A doctored entry that passes every integrity check (a broken build host, a writer who re-records the
    manifest). ``original_model``: ctx.onnx is the original model; the store refuses it before any
    session (no EPContext node). ``past_the_store_check``: the same with that check switched off, standing
    for a context ctxcache cannot tell from a good one: ORT + QNN really raise MODEL_REQUIRES_COMPILATION
    on the hit session. ``extra_node``: a Relu after the EPContext node; measured: QNN in context mode
    takes only EPContext nodes and leaves the Relu to CPU, which compiles nothing: a hit."""
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(conv_model, providers=qnn_providers)
    assert first.outcome == "miss" and first.entry_path is not None
    ctx = first.entry_path / "ctx.onnx"
    if doctor == "extra_node":
        _add_a_compilable_node(ctx)
    else:
        ctx.write_bytes(conv_model.read_bytes())
    if doctor == "past_the_store_check":
        from ctxcache import _store

        monkeypatch.setattr(_store, "context_problem", lambda folder, names: None)
    _reseal(first.entry_path)
    r = cache.load(conv_model, providers=qnn_providers)
    assert QNN in r.providers
    feed = models.random_input(r.session, seed=7)
    np.testing.assert_array_equal(r.session.run(None, feed)[0], models.plain_qnn_session(conv_model).run(None, feed)[0])
    if doctor == "extra_node":
        assert r.outcome == "hit", r.reason
        return
    assert r.outcome == "fallback" and r.reason is not None, r.reason
    if doctor == "original_model":
        assert r.reason.code == "unsafe_context" and "no EPContext node" in r.reason.message
    else:  # "User disabled EP compilation but EP 'QNNExecutionProvider' needs to compile one or more nodes"
        assert r.reason.code == "context_recompiles" and "MODEL_REQUIRES_COMPILATION" in r.reason.message
    assert cache.stats().as_dict()["fallbacks"] == 1
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"  # invalidated, so compiled again
    assert cache.load(conv_model, providers=qnn_providers).outcome == "hit"


def test_the_apps_options_are_never_changed_by_a_hit(conv_model: Path, cache_dir: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    so = ort.SessionOptions()
    so.add_session_config_entry(_inputs.DISABLE_COMPILE, "0")  # the app's own value, overruled on the copy only
    cache.load(conv_model, providers=qnn_providers, sess_options=so)
    r = cache.load(conv_model, providers=qnn_providers, sess_options=so)
    assert r.outcome == "hit"
    assert so.get_session_config_entry(_inputs.DISABLE_COMPILE) == "0" and not so.has_providers()
    assert r.session.get_session_options().get_session_config_entry(_inputs.DISABLE_COMPILE) == "1"
    bare = ort.SessionOptions()
    cache.load(conv_model, providers=qnn_providers, sess_options=bare)
    with pytest.raises(RuntimeError):
        bare.get_session_config_entry(_inputs.DISABLE_COMPILE)


def test_a_model_requiring_compilation_is_classed_as_the_contexts_fault(conv_model: Path) -> None:
    from ctxcache import providers

    qnn = providers.get(QNN)
    with pytest.raises(Exception) as raised:
        _inputs.session(str(conv_model), [(qnn, qnn.normalize_options(models.qnn_htp_options()))], None, target=True,
                        context=True)
    why, transient = _inputs.context_load_reason(qnn, raised.value)
    assert (why.code, transient) == ("context_recompiles", False)
    assert qnn.load_error_kind(why.message) == "recompiles"


def test_in_a_child_process_the_reason_survives(dyn_model: Path, tmp_path: Path) -> None:
    """The reason a user sees in a fresh launch (no override) names the dimension (a real second process)."""
    report = tmp_path / "r.json"
    run_python(f"""
        import json, ctxcache
        from ctxcache import models
        r = ctxcache.ContextCache({str(tmp_path / "c")!r}).load({str(dyn_model)!r},
            providers=[("QNNExecutionProvider", models.qnn_htp_options())])
        open({str(report)!r}, "w").write(json.dumps([r.outcome, r.reason.code, r.reason.message]))
    """)
    outcome, code, message = json.loads(report.read_text())
    assert (outcome, code) == ("bypass", "not_compilable") and "dim 0 'batch'" in message
