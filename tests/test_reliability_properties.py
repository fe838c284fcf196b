"""Property-based tests (hypothesis): key normalisation, the manifest parser, the ONNX wire reader.

- Key: the forms a user may write the same provider configuration in (option order, int vs str, bool
  vs "0"/"1", Path vs str, tuple vs provider_options, run-time-only options) give ONE key; a
  binary-affecting option gives another.
- Manifest: whatever bytes sit in manifest.json, ``Store.lookup`` raises ``BrokenEntry`` or returns an
  entry whose every field the loader and the listing read is usable (no TypeError in an app).
- Wire reader: any mutation of a model's bytes is a model or a ``WireError``, never another exception.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import layout
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_reliability_support import QNN

import ctxcache
from ctxcache import models

# Unit properties of the store and the wire reader themselves: the private modules are what is tested.
from ctxcache._manage import EntryInfo
from ctxcache._manifest import Entry
from ctxcache._onnxproto import WireError, read_facts_from_bytes
from ctxcache._store import BrokenEntry, Problem, Store

SETTINGS = settings(max_examples=int(os.environ.get("CTXCACHE_HYPOTHESIS", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- key normalisation -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def key_env(tmp_path_factory: pytest.TempPathFactory, rel_models: list[Path]) -> tuple[ctxcache.ContextCache, Path, str]:
    cache = ctxcache.ContextCache(tmp_path_factory.mktemp("keys") / "cache")
    base = cache.key(rel_models[0], providers=[(QNN, models.qnn_htp_options())])
    assert base is not None
    return cache, rel_models[0], base.key


def _spellings(draw: st.DrawFn) -> dict[str, Any]:
    import onnxruntime_qnn

    opts: dict[str, Any] = {
        "backend_path": draw(st.sampled_from([onnxruntime_qnn.get_qnn_htp_path(), Path(onnxruntime_qnn.get_qnn_htp_path())])),
        "soc_model": draw(st.sampled_from([60, "60"])),
        "htp_arch": draw(st.sampled_from([73, "73"])),
        "enable_htp_fp16_precision": draw(st.sampled_from([1, "1", True])),
    }
    # Run-time-only options: any value, present or not, must not change the key.
    if draw(st.booleans()):
        opts["htp_performance_mode"] = draw(st.sampled_from(["burst", "balanced", "power_saver", "high_performance"]))
    if draw(st.booleans()):
        opts["profiling_level"] = draw(st.sampled_from(["off", "basic", "detailed"]))
    if draw(st.booleans()):
        opts["rpc_control_latency"] = draw(st.integers(0, 10_000))
    if draw(st.booleans()):
        opts["device_id"] = draw(st.sampled_from([0, "0"]))
    items = list(opts.items())
    order = draw(st.permutations(range(len(items))))
    return dict(items[i] for i in order)


@SETTINGS
@given(data=st.data())
def test_key_is_the_same_for_every_spelling_of_one_configuration(key_env: Any, data: st.DataObject) -> None:
    cache, model, base = key_env
    opts = data.draw(st.composite(lambda draw: _spellings(draw))())
    if data.draw(st.booleans()):
        fp = cache.key(model, providers=[QNN], provider_options=[opts])
    else:
        fp = cache.key(model, providers=[(QNN, opts)])
    assert fp is not None and fp.key == base, (opts, fp.as_dict()["ep_options"])


@SETTINGS
@given(data=st.data())
def test_key_changes_with_a_binary_option(key_env: Any, data: st.DataObject) -> None:
    cache, model, base = key_env
    opts = data.draw(st.composite(lambda draw: _spellings(draw))())
    field, value = data.draw(st.sampled_from([
        ("soc_model", "57"), ("htp_arch", "75"), ("enable_htp_fp16_precision", "0"), ("vtcm_mb", "4"),
        ("htp_graph_finalization_optimization_mode", "3"), ("enable_htp_weight_sharing", "1"),
    ]))
    opts[field] = value
    fp = cache.key(model, providers=[(QNN, opts)])
    assert fp is not None and fp.key != base, (field, value)


# -- the manifest parser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_entry(tmp_path_factory: pytest.TempPathFactory, rel_models: list[Path]) -> tuple[Store, str, dict[str, Any]]:
    cache = ctxcache.ContextCache(tmp_path_factory.mktemp("manifest") / "cache")
    r = cache.load(rel_models[0], providers=[(QNN, models.qnn_htp_options())])
    assert r.outcome == "miss" and r.key is not None
    manifest = json.loads((layout(cache).entry_path(r.key) / "manifest.json").read_text())
    return Store(cache.root), r.key, manifest


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _exercise(store: Store, key: str, raw: bytes) -> str:
    """Write ``raw`` as the manifest and use the entry the way a hit and a listing do."""
    (store.entry_path(key) / "manifest.json").write_bytes(raw)
    try:
        entry = store.lookup(key)
    except BrokenEntry as e:
        assert isinstance(e.code, str) and isinstance(e.message, str)
        return "broken"
    assert isinstance(entry, Entry)
    # Everything the loader, the listing, stats and pruning read from an entry:
    assert isinstance(entry.artifacts, list) and isinstance(entry.size, int)
    assert isinstance(entry.entry_id, str) and isinstance(entry.compile_seconds, float)
    assert isinstance(entry.parts, dict) and isinstance(entry.last_used(), float)
    for ep_name, info in entry.manifest.get("compat", {}).items():
        assert isinstance(ep_name, str) and isinstance(info, str)
    EntryInfo.of(entry)
    problem = store.verify(entry, full=False)
    assert problem is None or (isinstance(problem, Problem) and isinstance(problem.code, str))
    return "entry"


@SETTINGS
@given(value=json_values)
def test_manifest_of_any_json_value(real_entry: Any, value: Any) -> None:
    store, key, _ = real_entry
    _exercise(store, key, json.dumps(value).encode())


@SETTINGS
@given(field=st.sampled_from(["format", "key", "artifacts", "parts", "model", "provider", "created",
                              "compile_seconds", "compat", "entry_id", "ctxcache_version", "extra"]),
       value=json_values, drop=st.booleans())
def test_manifest_with_one_field_changed(real_entry: Any, field: str, value: Any, drop: bool) -> None:
    store, key, good = real_entry
    m = json.loads(json.dumps(good))
    if drop:
        m.pop(field, None)
    else:
        m[field] = value
    _exercise(store, key, json.dumps(m).encode())


@SETTINGS
@given(index=st.integers(0, 1), field=st.sampled_from(["name", "size", "xxh3", "sig", "other"]), value=json_values)
def test_manifest_with_one_artifact_field_changed(real_entry: Any, index: int, field: str, value: Any) -> None:
    store, key, good = real_entry
    m = json.loads(json.dumps(good))
    m["artifacts"][index % len(m["artifacts"])][field] = value
    _exercise(store, key, json.dumps(m).encode())


@SETTINGS
@given(data=st.data())
def test_manifest_bytes_mutated(real_entry: Any, data: st.DataObject) -> None:
    store, key, good = real_entry
    raw = bytearray(json.dumps(good).encode())
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 50))]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=20))
    _exercise(store, key, bytes(raw))


def test_manifest_parser_accepts_what_publish_writes(real_entry: Any) -> None:
    # The property above would hold vacuously if the parser refused everything.
    store, key, good = real_entry
    assert _exercise(store, key, json.dumps(good).encode()) == "entry"


# -- the ONNX wire reader --------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_wire_reader_mutations_are_a_model_or_a_wire_error(rel_models: list[Path], data: st.DataObject) -> None:
    raw = bytearray(rel_models[0].read_bytes())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "truncate"]))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 64))]
        else:
            del raw[i:]
        assume(len(raw) > 0)
    try:
        facts = read_facts_from_bytes(bytes(raw), ep_context=True)
    except WireError:
        return
    assert facts.ir_version > 0 and facts.has_graph
