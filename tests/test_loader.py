"""The hit / miss / fallback / bypass state machine against the real QNN compiler and simulator."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from _child import Child, dead_pid
from conftest import LAUNCH, QNN, launch, layout

import ctxcache
from ctxcache import errors, models


def _reference(model: Path) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, models.random_input(sess, seed=7))[0]


def _artifact(cache: ctxcache.ContextCache, key: str, suffix: str) -> Path:
    entry = layout(cache).entry_path(key)
    return next(p for p in entry.iterdir() if p.name.endswith(suffix))


def test_miss_then_hit_in_process(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(conv_model, providers=qnn_providers)
    assert first.outcome == "miss", first
    assert first.timings.compile > 0
    assert first.providers[0] == QNN
    second = cache.load(conv_model, providers=qnn_providers)
    assert second.outcome == "hit", second
    assert second.key == first.key
    assert second.timings.compile == 0
    feeds = models.random_input(first.session, seed=7)
    a = first.session.run(None, feeds)[0]
    b = second.session.run(None, feeds)[0]
    np.testing.assert_array_equal(a, b)
    # fp16 on the HTP simulator: close to the fp32 CPU reference, not equal.
    np.testing.assert_allclose(a, _reference(conv_model), rtol=0.05, atol=0.02)
    entry = layout(cache).entry_path(first.key)
    names = sorted(p.name for p in entry.iterdir())
    assert names == ["ctx.onnx", "ctx_qnn.bin", "manifest.json"]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["compat"][QNN].startswith("v2:")
    assert dict(manifest["parts"])["ep_options"]["soc_model"] == "60"


def test_miss_then_hit_across_processes_identical_outputs(cache_dir: Path, conv_model: Path) -> None:
    first = launch(cache_dir, conv_model)
    second = launch(cache_dir, conv_model)
    third = launch(cache_dir, conv_model)
    assert (first["outcome"], second["outcome"], third["outcome"]) == ("miss", "hit", "hit")
    assert first["key"] == second["key"] == third["key"]
    assert first["out"] == second["out"] == third["out"]
    assert second["providers"][0] == QNN


def test_drop_in_inference_session(conv_model: Path, qnn_options: dict[str, str], tmp_path: Path) -> None:
    # The default cache comes from $CTXCACHE_DIR (set per test by conftest), read at call time.
    sess = ctxcache.InferenceSession(str(conv_model), providers=[QNN], provider_options=[qnn_options])
    assert isinstance(sess, ort.InferenceSession)
    assert sess.get_providers()[0] == QNN
    assert (tmp_path / "default-cache" / "v1" / "entries").is_dir()
    assert len(ctxcache.default_cache().entries()) == 1
    again = ctxcache.default_cache().load(conv_model, providers=[(QNN, qnn_options)])
    assert again.outcome == "hit"


def test_sess_options_are_honoured_and_not_mutated(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    cache = ctxcache.ContextCache(cache_dir)
    # ORT refuses add_provider_for_devices twice on one SessionOptions; ctxcache must copy, so the
    # app can reuse its object for several sessions.
    a = cache.load(conv_model, providers=qnn_providers, sess_options=so)
    b = cache.load(conv_model, providers=qnn_providers, sess_options=so)
    assert (a.outcome, b.outcome) == ("miss", "hit")
    assert not so.has_providers()
    assert b.session.get_session_options().intra_op_num_threads == 1


def test_bytes_model_shares_the_entry_of_its_file(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    from_path = cache.load(conv_model, providers=qnn_providers)
    from_bytes = cache.load(conv_model.read_bytes(), providers=qnn_providers)
    assert from_bytes.outcome == "hit"
    assert from_bytes.key == from_path.key


def test_external_data_model(cache_dir: Path, external_model: Path, qnn_providers: list[Any]) -> None:
    assert (external_model.parent / "conv_ext.data").is_file()
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(external_model, providers=qnn_providers)
    second = cache.load(external_model, providers=qnn_providers)
    assert (first.outcome, second.outcome) == ("miss", "hit")
    feeds = models.random_input(second.session, seed=7)
    np.testing.assert_allclose(second.session.run(None, feeds)[0], _reference(external_model), rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    "damage",
    ["truncate_bin", "empty_bin", "delete_bin", "random_bin", "flip_byte_bin", "truncate_ctx", "delete_manifest", "garble_manifest"],
)
def test_damaged_entry_falls_back_then_heals(cache_dir: Path, conv_model: Path, damage: str) -> None:
    first = launch(cache_dir, conv_model)
    assert first["outcome"] == "miss"
    cache = ctxcache.ContextCache(cache_dir)
    key = first["key"]
    binf = _artifact(cache, key, ".bin")
    ctxf = layout(cache).entry_path(key) / "ctx.onnx"
    manifest = layout(cache).entry_path(key) / "manifest.json"
    data = binf.read_bytes()
    if damage == "truncate_bin":
        binf.write_bytes(data[: len(data) // 2])
    elif damage == "empty_bin":
        binf.write_bytes(b"")
    elif damage == "delete_bin":
        binf.unlink()
    elif damage == "random_bin":
        binf.write_bytes(os.urandom(len(data)))
    elif damage == "flip_byte_bin":
        # Same size, one byte: QNN would load it and run with silently wrong outputs (FIELD-NOTES).
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        binf.write_bytes(bytes(flipped))
    elif damage == "truncate_ctx":
        ctxf.write_bytes(ctxf.read_bytes()[:100])
    elif damage == "delete_manifest":
        manifest.unlink()
    elif damage == "garble_manifest":
        manifest.write_text("{not json")

    second = launch(cache_dir, conv_model)
    assert second["outcome"] == "fallback", second
    assert second["reason"] is not None
    assert second["out"] == pytest.approx(first["out"], rel=0.05, abs=0.02)
    # The broken entry is gone from entries/ and kept, with its reason, in quarantine/.
    assert not layout(cache).entry_path(key).exists()
    quarantined = [p for p in layout(cache).quarantine_dir.iterdir() if p.name.startswith(key)]
    assert len(quarantined) == 1
    assert json.loads((quarantined[0] / "reason.json").read_text())["code"] == second["reason"]

    third = launch(cache_dir, conv_model)
    fourth = launch(cache_dir, conv_model)
    assert (third["outcome"], fourth["outcome"]) == ("miss", "hit")
    assert fourth["out"] == first["out"]


def test_flip_with_mtime_restored_is_still_caught(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    key = cache.load(conv_model, providers=qnn_providers).key
    assert key is not None
    binf = _artifact(cache, key, ".bin")
    st = binf.stat()
    data = bytearray(binf.read_bytes())
    data[100] ^= 0x01
    binf.write_bytes(bytes(data))
    os.utime(binf, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the edit from an mtime-only check
    result = cache.load(conv_model, providers=qnn_providers)
    assert result.outcome == "fallback"
    assert result.reason is not None and result.reason.code == "artifact_digest"


def test_copied_cache_rehashes_once_then_hits(cache_dir: Path, conv_model: Path, qnn_providers: list[Any], tmp_path: Path) -> None:
    import shutil

    ctxcache.ContextCache(cache_dir).load(conv_model, providers=qnn_providers)
    copy = tmp_path / "copied"
    shutil.copytree(cache_dir, copy)  # new inodes and ctimes: every stat signature differs
    cache = ctxcache.ContextCache(copy)
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "hit"
    manifest = json.loads((layout(cache).entry_path(r.key) / "manifest.json").read_text())  # type: ignore[arg-type]
    for art in manifest["artifacts"]:
        st = (layout(cache).entry_path(r.key) / art["name"]).stat()  # type: ignore[arg-type]
        assert art["sig"] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def test_crash_marker_of_dead_process_poisons_a_context_that_kills(cache_dir: Path, conv_model: Path,
                                                                   qnn_providers: list[Any], killer_context: tuple[Path, Path]) -> None:
    from test_reliability_support import plant_killer

    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(conv_model, providers=qnn_providers)
    assert first.entry_path is not None
    plant_killer(first.entry_path, killer_context)
    # A process that died while loading this context leaves its marker behind.
    (layout(cache).markers_dir / f"{first.key}.{dead_pid()}.abcdef").write_text("")
    r = cache.load(conv_model, providers=qnn_providers)  # probes in a child (which dies), never loads it here
    assert r.outcome == "fallback"
    assert r.reason is not None and r.reason.code == "crashed_during_load" and "SIGSEGV" in r.reason.message
    assert list(layout(cache).markers_dir.iterdir()) == []
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"


def test_crash_marker_of_dead_process_on_a_context_that_loads_is_an_external_kill(
    cache_dir: Path, conv_model: Path, qnn_providers: list[Any]
) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    key = cache.load(conv_model, providers=qnn_providers).key
    (layout(cache).markers_dir / f"{key}.{dead_pid()}.abcdef").write_text("")
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "hit", r
    assert list(layout(cache).markers_dir.iterdir()) == []  # consumed; the death note is gone after the good load


def test_marker_of_live_process_does_not_poison(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    key = cache.load(conv_model, providers=qnn_providers).key
    (layout(cache).markers_dir / f"{key}.{os.getpid()}.abcdef").write_text("")  # a concurrent loader
    assert cache.load(conv_model, providers=qnn_providers).outcome == "hit"


def test_stampede_compiles_once(cache_dir: Path, conv_model_b: Path) -> None:
    n = 4
    code = LAUNCH.format(cache_dir=str(cache_dir), model=str(conv_model_b))
    procs = [Child.python(code) for _ in range(n)]
    results = [p.finish(timeout=300).check().result for p in procs]
    outcomes = sorted(r["outcome"] for r in results)
    assert outcomes == ["hit"] * (n - 1) + ["miss"], outcomes
    assert len({json.dumps(r["out"]) for r in results}) == 1
    stats = ctxcache.ContextCache(cache_dir).stats()
    assert (stats.misses, stats.hits) == (1, n - 1)


def test_cpu_only_is_bypass(cache_dir: Path, conv_model: Path) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    r = cache.load(conv_model, providers=["CPUExecutionProvider"])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "nothing_to_compile"
    assert r.providers == ("CPUExecutionProvider",)
    assert not layout(cache).entries_dir.exists() or not any(layout(cache).entries_dir.iterdir())


def test_provider_not_installed_is_bypass_with_working_session(cache_dir: Path, conv_model: Path) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    cache = ctxcache.ContextCache(cache_dir)
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):  # onnxruntime's own warning, as plain ORT
        r = cache.load(conv_model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "nothing_to_compile"  # CUDA compiles no EP context
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)


def _size_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Size", ["input"], ["output"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("output", TensorProto.INT64, [])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_uncompilable_model_is_bypass_and_remembered(cache_dir: Path, tmp_path: Path, qnn_providers: list[Any]) -> None:
    model = _size_model(tmp_path / "size.onnx")
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(model, providers=qnn_providers)
    assert first.outcome == "bypass"
    assert first.reason is not None and first.reason.code == "not_compilable"
    assert first.session.run(None, {"input": np.zeros(5, np.float32)})[0] == 5
    second = cache.load(model, providers=qnn_providers)
    assert second.outcome == "bypass" and second.reason is not None
    assert "remembered" in second.reason.message
    assert second.timings.compile == 0
    assert cache.entries() == []


def test_unwritable_cache_still_gives_a_session(tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    # A regular file where the cache folder should be: mkdir fails for root too (unlike chmod).
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    cache = ctxcache.ContextCache(blocker / "cache")
    r = cache.load(conv_model, providers=qnn_providers)
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "cache_unwritable"
    assert r.session.get_providers()[0] == QNN
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)


def test_strict_mode_raises_on_faults(tmp_path: Path, cache_dir: Path, conv_model: Path, qnn_providers: list[Any],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(errors.CacheFaultError) as info:
        ctxcache.ContextCache(blocker / "cache", strict=True).load(conv_model, providers=qnn_providers)
    assert info.value.code == "cache_unwritable"

    cache = ctxcache.ContextCache(cache_dir)
    key = cache.load(conv_model, providers=qnn_providers).key
    _artifact(cache, str(key), ".bin").write_bytes(b"")
    monkeypatch.setenv("CTXCACHE_STRICT", "1")  # the environment variable turns it on too
    with pytest.raises(errors.CacheFaultError) as info2:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=qnn_providers)
    assert info2.value.code == "artifact_size"
    assert not layout(cache).entry_path(str(key)).exists()  # invalidated all the same


def test_lock_timeout_gives_jit_session_or_raises(cache_dir: Path, conv_model_b: Path, qnn_providers: list[Any]) -> None:
    import filelock

    cache = ctxcache.ContextCache(cache_dir, lock_timeout=0.3)
    key = cache.key(conv_model_b, providers=qnn_providers).key
    layout(cache).ensure()
    lock = filelock.FileLock(str(layout(cache).lock_path(key)), is_singleton=False)
    lock.acquire()
    try:
        # flock locks belong to open file descriptions: this second FileLock object (is_singleton=False,
        # its own descriptor) blocks ctxcache's exactly as another process would.
        start = time.monotonic()
        r = cache.load(conv_model_b, providers=qnn_providers)
        assert r.outcome == "bypass"
        assert r.reason is not None and r.reason.code == "lock_timeout"
        assert time.monotonic() - start < 30
        assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)
        strict = ctxcache.ContextCache(cache_dir, lock_timeout=0.2, on_lock_timeout="raise")
        with pytest.raises(errors.LockTimeoutError) as info:
            strict.load(conv_model_b, providers=qnn_providers)
        assert isinstance(info.value, TimeoutError)
    finally:
        lock.release()
    assert cache.load(conv_model_b, providers=qnn_providers).outcome == "miss"


def test_stats_count_outcomes(cache_dir: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    cache.load(conv_model, providers=qnn_providers)
    cache.load(conv_model, providers=qnn_providers)
    cache.load(conv_model, providers=["CPUExecutionProvider"])  # a silent bypass: not counted (nothing written)
    s = cache.stats()
    assert (s.misses, s.hits, s.bypasses, s.fallbacks) == (1, 1, 0, 0)
    assert s.compile_seconds > 0 and s.saved_seconds > 0
    assert s.reasons == {}
    [entry] = cache.entries()
    assert entry.hits == 1 and entry.model_name == "conv.onnx" and entry.provider == QNN
    cache.reset_stats()
    assert cache.stats().loads == 0


def test_invalidate_and_clear(cache_dir: Path, conv_model: Path, conv_model_b: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    a = cache.load(conv_model, providers=qnn_providers).key
    cache.load(conv_model_b, providers=qnn_providers)
    assert cache.invalidate(model=conv_model) == 1
    assert {e.key for e in cache.entries()} != {a}
    assert len(cache.entries()) == 1
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"
    assert cache.invalidate(key=str(a)[:8]) == 1
    assert cache.clear() == 1
    assert cache.entries() == []


def test_max_size_prunes_least_recently_used(cache_dir: Path, conv_model: Path, conv_model_b: Path, qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    a = cache.load(conv_model, providers=qnn_providers)
    one = cache.size()
    capped = ctxcache.ContextCache(cache_dir, max_size=int(one * 1.5))
    b = capped.load(conv_model_b, providers=qnn_providers)
    assert [e.key for e in capped.entries()] == [b.key]
    assert a.key != b.key


def test_cpu_listed_first_is_bypass(cache_dir: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    # ORT would give every node to CPU: compiling a QNN context for that app would change what it runs.
    r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=["CPUExecutionProvider", (QNN, qnn_options)])
    assert r.outcome == "bypass"
    assert r.reason is not None and r.reason.code == "nothing_to_compile"


def test_cache_folder_deleted_while_app_runs(cache_dir: Path, conv_model: Path, conv_model_b: Path, qnn_providers: list[Any]) -> None:
    import shutil

    cache = ctxcache.ContextCache(cache_dir)
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"
    shutil.rmtree(cache_dir)
    assert cache.load(conv_model, providers=qnn_providers).outcome == "miss"
    assert cache.load(conv_model_b, providers=qnn_providers).outcome == "miss"
    assert cache.load(conv_model, providers=qnn_providers).outcome == "hit"
