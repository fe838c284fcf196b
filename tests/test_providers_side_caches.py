"""A provider's own cache (OpenVINO ``cache_dir``, TensorRT engine and timing caches) kept under the key.

Here: the key and path rules for both providers, and the store's handling of a key's side folder (counted
in the entry's size, removed, pruned and quarantined with it, junk once the key has no entry) on real QNN
entries, with the provider's writes played by files in the side folder (QNN keeps no cache of its own).
OpenVINO's real blob cache runs in its own venv (tests/test_providers_openvino.py); TensorRT's needs a GPU
(scripts/check_tensorrt.py), its option rewrite runs in the onnxruntime-gpu venv
(tests/test_providers_tensorrt.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

import ctxcache
from ctxcache import _side, models
from ctxcache._cache import store_of
from ctxcache._inputs import resolve_providers
from ctxcache.providers._base import SIDE_CACHE_PART
from ctxcache.providers.openvino import OpenVINOProvider
from ctxcache.providers.tensorrt import TensorRTProvider

QNN = "QNNExecutionProvider"


def _binary(p: Any, options: dict[str, Any]) -> dict[str, str]:
    return dict(p.binary_options(p.normalize_options(options)))


# -- the key ----------------------------------------------------------------------------------------
def test_openvino_cache_path_is_not_keyed_but_keeping_one_is() -> None:
    p = OpenVINOProvider()
    a = _binary(p, {"device_type": "CPU", "cache_dir": "/home/a/ov"})
    b = _binary(p, {"device_type": "CPU", "cache_dir": "relative/other"})
    none = _binary(p, {"device_type": "CPU"})
    assert a == b != none
    assert a[SIDE_CACHE_PART] == "openvino" and SIDE_CACHE_PART not in none
    assert "cache_dir" not in a


def test_tensorrt_cache_paths_are_not_keyed_but_which_caches_are_kept_is() -> None:
    p = TensorRTProvider()
    engine_a = _binary(p, {"trt_engine_cache_enable": "1", "trt_engine_cache_path": "/a"})
    engine_b = _binary(p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/b", "trt_engine_cache_prefix": "x"})
    timing = _binary(p, {"trt_timing_cache_enable": "1", "trt_timing_cache_path": "/a"})
    both = _binary(p, {"trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"})
    none = _binary(p, {"trt_engine_cache_path": "/a"})  # a path without its switch: ORT keeps no cache
    off = _binary(p, {"trt_engine_cache_enable": "0"})
    assert engine_a == engine_b
    assert len({repr(x) for x in (engine_a, timing, both, none)}) == 4
    assert none == off == {}
    assert both[SIDE_CACHE_PART] == "tensorrt_engines,tensorrt_timing"


@pytest.mark.parametrize("provider", [OpenVINOProvider, TensorRTProvider])
def test_the_rewrite_points_every_cache_into_the_folder_and_keeps_the_key(provider: type, tmp_path: Path) -> None:
    p = provider()
    user = p.normalize_options({"cache_dir": "/shared/ov"} if provider is OpenVINOProvider else
                               {"trt_engine_cache_enable": "1", "trt_engine_cache_path": "/shared/trt",
                                "trt_timing_cache_enable": "1", "trt_fp16_enable": "1"})
    folder = tmp_path / "side" / "k"
    governed = p.side_cache_options(user, folder)
    layout = p.side_cache_layout(user)
    assert layout and all(governed[opt] == str(folder / sub) for opt, sub in layout.items())
    assert not any("/shared" in v for v in governed.values())
    assert p.binary_options(governed) == p.binary_options(user)
    off = p.without_side_cache(user)
    assert p.side_cache_layout(off) == {} and not any("cache" in k for k in off)


def test_a_relative_calibration_table_follows_the_engine_cache(tmp_path: Path) -> None:
    # TensorRT opens it in the engine cache folder: the copy keeps the key (its content is keyed)
    p = TensorRTProvider()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "calib.flatbuffers").write_bytes(b"scales" * 10)
    user = p.normalize_options({"trt_int8_enable": "1", "trt_int8_calibration_table_name": "calib.flatbuffers",
                                "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp_path / "user")})
    folder = tmp_path / "side"
    (folder / "tensorrt_engines").mkdir(parents=True)
    governed = p.side_cache_options(user, folder)
    assert (folder / "tensorrt_engines" / "calib.flatbuffers").read_bytes() == b"scales" * 10
    assert p.binary_options(governed) == p.binary_options(user)
    assert "trt_int8_calibration_table_xxh3" in p.binary_options(governed)


# -- the folder -------------------------------------------------------------------------------------
def _chain(options: dict[str, Any]) -> Any:
    return resolve_providers([("OpenVINOExecutionProvider", options)], None)


def test_govern_makes_an_owner_only_folder_per_key(cache_dir: Path) -> None:
    store = store_of(ctxcache.ContextCache(cache_dir))
    store.ensure()
    a = _side.govern(store, "a" * 32, _chain({"cache_dir": "/tmp/x"}))[0][1]
    b = _side.govern(store, "b" * 32, _chain({"cache_dir": "/tmp/x"}))[0][1]
    assert a["cache_dir"] == str(store.side_dir("a" * 32) / "openvino") != b["cache_dir"]
    assert os.stat(a["cache_dir"]).st_mode & 0o077 == 0
    assert _side.govern(store, "c" * 32, _chain({"device_type": "CPU"}))[0][1] == {"device_type": "CPU"}
    assert _side.unmanaged(_chain({"cache_dir": "/tmp/x"}))[0][1] == {}


def test_a_load_without_a_key_runs_the_provider_without_its_cache(conv_model: Path, cache_dir: Path) -> None:
    # no folder of ctxcache's can hold it (an unusable cache folder, settings a context cannot honour):
    # the app's own path is not written either
    from ctxcache._inputs import resolve_model
    from ctxcache._plan import Inputs

    store = store_of(ctxcache.ContextCache(cache_dir))
    inputs = Inputs(resolve_model(conv_model), _chain({"cache_dir": "/tmp/x", "device_type": "CPU"}), None)
    assert _side.inputs_for(store, None, inputs).options == {"device_type": "CPU"}
    store.ensure()
    keyed = _side.inputs_for(store, "a" * 32, inputs)
    assert keyed.options["cache_dir"] == str(store.side_dir("a" * 32) / "openvino") and keyed.model == inputs.model
    plain = Inputs(resolve_model(conv_model), _chain({"device_type": "CPU"}), None)
    assert _side.inputs_for(store, "a" * 32, plain) is plain


@pytest.mark.parametrize("plant", ["file_in_the_way", "link_outside", "others_can_write"])
def test_a_side_folder_that_cannot_be_trusted_turns_the_cache_off(plant: str, cache_dir: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    # OpenVINO fails the whole session when its cache_dir cannot be created (a file in the way): ctxcache
    # runs the provider without its cache instead, and never through a planted link.
    store = store_of(ctxcache.ContextCache(cache_dir))
    store.ensure()
    key = "d" * 32
    target = store.side_dir(key)
    outside = tmp_path / "outside"
    outside.mkdir()
    if plant == "file_in_the_way":
        target.write_bytes(b"x")
    elif plant == "link_outside":
        target.symlink_to(outside, target_is_directory=True)
    else:
        target.mkdir(mode=0o777)
        os.chmod(target, 0o777)
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        options = _side.govern(store, key, _chain({"cache_dir": "/tmp/x", "device_type": "CPU"}))[0][1]
    assert options == {"device_type": "CPU"}
    assert "runs without it" in caplog.text
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("plant", ["symlink_blob", "dangling_symlink", "fifo_blob", "hard_link", "subfolder_link",
                                   "open_subfolder"])
def test_names_a_provider_would_follow_or_block_on_are_swept(plant: str, cache_dir: Path, tmp_path: Path) -> None:
    # A provider opens its cache files by name with plain open(): through a planted link its blob would
    # land outside the cache, a FIFO would hang the launch, a hard link would change the linked file.
    store = store_of(ctxcache.ContextCache(cache_dir))
    store.ensure()
    key = "f" * 32
    inside = store.side_dir(key) / "openvino"
    inside.mkdir(parents=True, mode=0o700)
    os.chmod(store.side_dir(key), 0o700)
    (inside / "good.blob").write_bytes(b"kept")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    target = inside / "123.blob"
    if plant == "symlink_blob":
        target.symlink_to(outside)
    elif plant == "dangling_symlink":
        target.symlink_to(tmp_path / "created_through_the_link")
    elif plant == "fifo_blob":
        os.mkfifo(target)
    elif plant == "hard_link":
        os.link(outside, target)
    elif plant == "subfolder_link":
        (inside / "sub").symlink_to(tmp_path, target_is_directory=True)
        target = inside / "sub"
    else:
        (inside / "sub").mkdir()
        os.chmod(inside / "sub", 0o777)
        target = inside / "sub"
    options = _side.govern(store, key, _chain({"cache_dir": "/tmp/x"}))[0][1]
    assert options["cache_dir"] == str(inside)
    assert not os.path.lexists(target)
    assert (inside / "good.blob").read_bytes() == b"kept"
    assert outside.read_bytes() == b"precious" and outside.exists()


# -- the store: one life with the entry --------------------------------------------------------------
def _entry_with_side(cache: ctxcache.ContextCache, model: Path, providers: list[Any], size: int = 50_000) -> str:
    r = cache.load(model, providers=providers)
    assert r.outcome == "miss", r.reason
    assert r.key is not None
    side = store_of(cache).side_dir(r.key) / "openvino"  # what a provider writes while a session is made
    side.mkdir(parents=True)
    (side / "123.blob").write_bytes(os.urandom(size))
    return r.key


def test_the_side_folder_counts_in_the_entry_and_goes_with_it(conv_model: Path, conv_model_b: Path, cache_dir: Path,
                                                              qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    key = _entry_with_side(cache, conv_model, qnn_providers)
    info = next(e for e in cache.entries() if e.key == key)
    assert info.side_size == 50_000 and info.as_dict()["side_size"] == 50_000
    plain = sum(a["size"] for a in store_of(cache).lookup(key).artifacts)  # type: ignore[union-attr]
    assert info.size == plain + 50_000
    assert cache.size() == info.size
    # invalidated: quarantined together, for the post-mortem
    assert cache.invalidate(key) == 1
    store = store_of(cache)
    assert not store.side_dir(key).exists()
    quarantined = [d for d in store.quarantine_dir.iterdir() if d.name.startswith(key)]
    assert len(quarantined) == 1 and (quarantined[0] / "side" / "openvino" / "123.blob").stat().st_size == 50_000
    # pruned to a size: the side folder goes with its entry, and max_size counted it
    key_b = _entry_with_side(cache, conv_model_b, qnn_providers, size=80_000)
    report = cache.prune(max_size=10_000)
    assert key_b in report.removed and not store.side_dir(key_b).exists()
    assert report.size_before >= 80_000


def test_a_side_folder_without_an_entry_is_junk_until_its_key_gets_one(conv_model: Path, cache_dir: Path,
                                                                       qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(cache_dir)
    store = store_of(cache)
    key = _entry_with_side(cache, conv_model, qnn_providers)
    assert not [j for j in store.junk(negative_ttl=1e9) if j.kind == "side"]
    store.remove(key)  # the entry alone goes (clear, evict, prune all come here): its side folder too
    assert not store.side_dir(key).exists()
    orphan = store.side_dir("e" * 32) / "openvino"
    orphan.mkdir(parents=True)
    (orphan / "1.blob").write_bytes(b"x" * 1000)
    junk = [j for j in store.junk(negative_ttl=1e9) if j.kind == "side"]
    assert [(j.path.name, j.size) for j in junk] == [("e" * 32, 1000)]
    plan = cache.plan_prune()
    assert any(i.key.endswith("e" * 32) and i.why == "junk" for i in plan.items)
    # a key that got its entry since the plan keeps its folder
    (store.entries_dir / ("e" * 32)).mkdir()
    assert store.remove_junk(junk[0]) is False and orphan.exists()
    (store.entries_dir / ("e" * 32)).rmdir()
    assert store.remove_junk(junk[0]) is True and not store.side_dir("e" * 32).exists()


def test_a_load_gives_the_providers_cache_its_keys_folder(conv_model: Path, cache_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # QNN keeps no cache of its own: play one that does (a layout with one path option) and watch what
    # the session is handed, through the real loader and the real QNN provider.
    from ctxcache import providers

    qnn = providers.get(QNN)
    seen: list[dict[str, str]] = []
    monkeypatch.setattr(type(qnn), "side_cache_layout",
                        lambda self, o: {"profiling_file_path": "qnn_profile"} if "profiling_file_path" in o else {})
    real_session = type(qnn).session

    def spy(self: Any, model: Any, so: Any, options: dict[str, str], *a: Any, **k: Any) -> Any:
        seen.append(dict(options))
        return real_session(self, model, so, options, *a, **k)

    monkeypatch.setattr(type(qnn), "session", spy)
    cache = ctxcache.ContextCache(cache_dir)
    keys = set()
    for user in (tmp_path / "app1", tmp_path / "app2"):
        # QNN reads profiling_file_path only with profiling_level set: harmless here, and never written
        opts = dict(models.qnn_htp_options(), profiling_file_path=str(user))
        r = cache.load(conv_model, providers=[(QNN, opts)])
        keys.add(r.key)
        assert r.outcome in ("miss", "hit")
    assert len(keys) == 1
    key = keys.pop()
    assert key is not None
    assert seen and all(o["profiling_file_path"] == str(store_of(cache).side_dir(key) / "qnn_profile") for o in seen)
    assert (store_of(cache).side_dir(key) / "qnn_profile").is_dir()
    (store_of(cache).side_dir(key) / "qnn_profile" / "blob").write_bytes(b"x" * 300)
    ex = cache.explain(conv_model, providers=[(QNN, dict(models.qnn_htp_options(), profiling_file_path="/elsewhere"))])
    assert ex.hit and ex.key == key
    assert ex.side_cache == {"folder": str(store_of(cache).side_dir(key)), "caches": {"profiling_file_path": "qnn_profile"},
                             "size": 300}
    assert ex.as_dict()["side_cache"] == ex.side_cache
    listed = next(e for e in cache.entries() if e.key == key)
    assert listed.side_size == 300
    assert not (tmp_path / "app1").exists() and not (tmp_path / "app2").exists()
