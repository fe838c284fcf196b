"""OpenVINO provider: option and key logic here, real compiles in OpenVINO's own virtual environments.

``onnxruntime-openvino`` replaces the ``onnxruntime`` module, so it cannot live in the test venv. The real
tests run a launch in a separate interpreter:

- ``$CTXCACHE_OPENVINO_PYTHON`` (default ``.venv-openvino/bin/python``, then ``/tmp/venv-ovc/bin/python``):
  onnxruntime-openvino. Its context compiles on CPU; on the AMD CI host every load of it fails, so the
  launch must be a fallback with right outputs (on an Intel host it may be a miss, then a hit).
- ``$CTXCACHE_OPENVINO_PLUGIN_PYTHON`` (default ``.venv-openvino-plugin/bin/python``, then
  ``/tmp/venv-ov/bin/python``): onnxruntime 1.32 + the onnxruntime-ep-openvino plugin, which offers no
  device on AMD hardware: a bypass that names why. On an Intel Xeon it compiles (miss, then hit), and its
  outputs are 0.03 off the CPU EP's but equal to a plain OpenVINO JIT session's: the reference there.

``.ci/run`` creates both venvs (best effort: if PyPI cannot be reached the real tests skip, saying so).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import _child
import pytest

import ctxcache
from ctxcache import models
from ctxcache.errors import ProviderOptionError
from ctxcache.providers.openvino import OpenVINOProvider, cpu_identity, openvino_version

ROOT = Path(__file__).resolve().parent.parent
OV = "OpenVINOExecutionProvider"


def _interpreter(env: str, local: str, fallback: str) -> Path | None:
    for cand in (os.environ.get(env), str(ROOT / local / "bin" / "python"), fallback):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def _run_in(python: Path, code: str, timeout: float = 300) -> dict[str, Any]:
    return _child.run([str(python), "-c", textwrap.dedent(code)], timeout=timeout, check=True).result  # type: ignore[no-any-return]


LAUNCHES = """
import json, numpy as np, onnxruntime as ort
import ctxcache
from _report import report
from ctxcache import models
model = models.conv_net({model!r}, layers=4, channels=16, seed=5)
ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
feeds = models.random_input(ref, seed=3)
expected = ref.run(None, feeds)[0]
cache = ctxcache.ContextCache({cache!r})
# True reaches the EP as "true": as "1" ORT would silently drop the EP and run on CPU
providers = [("OpenVINOExecutionProvider", {{"device_type": "CPU", "enable_qdq_optimizer": True}})]
# the key before the first load: once a context failed to load here, later loads bypass and key() is None
fp = cache.key(model, providers=providers)
runs, outs = [], []
for _ in range(2):
    r = cache.load(model, providers=providers)
    out = r.session.run(None, feeds)[0]
    outs.append(out)
    runs.append({{"outcome": r.outcome, "reason": r.reason.code if r.reason else None,
                 "message": r.reason.message if r.reason else None, "providers": r.providers,
                 "maxdiff": float(np.abs(out - expected).max())}})

# What the app gets without ctxcache: a plain JIT session on the same EP and options (OpenVINO may compute
# in lower precision than the CPU EP, e.g. bf16 on Xeons with AMX: its own outputs are the reference then).
def jit_session():
    opts = {{"device_type": "CPU", "enable_qdq_optimizer": "true"}}
    try:
        import onnxruntime_ep_openvino as plugin
    except ImportError:
        s = ort.InferenceSession(str(model), providers=[("OpenVINOExecutionProvider", opts)])
        return s if s.get_providers()[0] == "OpenVINOExecutionProvider" else None
    try:
        ort.register_execution_provider_library("OpenVINOExecutionProvider", plugin.get_library_path())
    except Exception:
        pass  # ctxcache registered it already
    devs = [d for d in ort.get_ep_devices() if d.ep_name == "OpenVINOExecutionProvider"]
    if not devs:
        return None
    so = ort.SessionOptions()
    so.add_provider_for_devices(devs[:1], opts)
    return ort.InferenceSession(str(model), sess_options=so)

jit = jit_session()
if jit is not None:
    jit_out = jit.run(None, feeds)[0]
for run, out in zip(runs, outs):
    run["jit_maxdiff"] = float(np.abs(out - jit_out).max()) if jit is not None else None
report({{"ort": ort.__version__, "runs": runs, "parts": fp.as_dict() if fp else None,
        "quarantined": len(list((cache.root / "v1" / "quarantine").iterdir())) if (cache.root / "v1" / "quarantine").exists() else 0}})
"""


# -- here, without OpenVINO -----------------------------------------------------------------------
def test_without_openvino_a_load_is_a_bypass_with_a_working_session(conv_model: Path, cache_dir: Path) -> None:
    p = OpenVINOProvider()
    if p.unavailable_reason() is None:
        pytest.skip("OpenVINO is available in this interpreter; the real tests below cover it")
    r = ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(OV, {"device_type": "CPU"}), "CPUExecutionProvider"])
    assert r.outcome == "bypass" and r.reason is not None and r.reason.code == "provider_unavailable"
    assert "onnxruntime-openvino" in r.reason.message
    assert r.session.run(None, models.random_input(r.session))[0].shape == (1, 16, 32, 32)


def test_binary_options_keep_device_and_precision_only() -> None:
    p = OpenVINOProvider()
    opts = p.normalize_options({"device_type": "GPU.1", "precision": "FP16", "num_of_threads": 4, "num_streams": "2",
                                "cache_dir": "/tmp/ov", "model_priority": "HIGH", "enable_qdq_optimizer": "True"})
    assert p.binary_options(opts) == {"device_type": "GPU.1", "enable_qdq_optimizer": "true", "precision": "FP16",
                                      # where the blob cache lives is not keyed; that one is kept is
                                      "ctxcache.side_cache": "openvino"}
    # the EP reads only true/false: a 1 or Python True would make ORT drop the provider silently
    for spelling in (True, 1, "1", "TRUE", "true"):
        assert p.normalize_options({"enable_qdq_optimizer": spelling})["enable_qdq_optimizer"] == "true"
    assert p.normalize_options({"disable_dynamic_shapes": False})["disable_dynamic_shapes"] == "false"
    # "CPU" is the EP's default device: naming it or not builds the same blob
    assert p.binary_options(p.normalize_options({})) == p.binary_options(p.normalize_options({"device_type": "CPU"}))
    assert p.binary_options(p.normalize_options({"device_type": "NPU"})) != p.binary_options(p.normalize_options({}))


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"device_typ": "CPU"}, "device_typ"),
        ({"device_type": "TPU"}, "device_type"),
        ({"precision": "FP8"}, "precision"),
        ({"num_of_threads": "four"}, "num_of_threads"),
        ({"enable_qdq_optimizer": "maybe"}, "enable_qdq_optimizer"),
    ],
)
def test_bad_options_are_refused(options: dict[str, str], option: str, conv_model: Path, cache_dir: Path) -> None:
    with pytest.raises(ProviderOptionError) as exc:
        ctxcache.ContextCache(cache_dir).load(conv_model, providers=[(OV, options)])
    assert exc.value.option == option


@pytest.mark.parametrize(
    ("files", "version"),
    [
        (["libopenvino.so", "libopenvino.so.2541", "libopenvino.so.2025.4.1"], "2025.4.1"),
        (["libopenvino.so.2641", "libopenvino_intel_cpu_plugin.so"], "2026.4.1 (soname 2641)"),
        (["openvino.dll"], None),
    ],
)
def test_openvino_version_from_library_names(tmp_path: Path, files: list[str], version: str | None) -> None:
    for f in files:
        (tmp_path / f).write_bytes(b"")
    assert openvino_version(tmp_path) == version


def test_cpu_identity_names_the_instruction_set() -> None:
    ident = cpu_identity()
    assert ident["model"]
    if os.path.exists("/proc/cpuinfo") and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in ident["isa"].split(",")


# -- real OpenVINO, in its own venvs --------------------------------------------------------------
def _right(run: dict[str, Any]) -> bool:
    """The outputs a launch served are right: the CPU EP's, or on OpenVINO the plain OpenVINO JIT session's
    (OpenVINO's CPU plugin may compute in lower precision, measured 0.03 off the CPU EP on an Intel Xeon)."""
    if run["maxdiff"] < 1e-3:
        return True
    return run["providers"][0] == OV and run["jit_maxdiff"] is not None and run["jit_maxdiff"] < 1e-3


def test_onnxruntime_openvino_real_compile_then_fallback(tmp_path: Path) -> None:
    python = _interpreter("CTXCACHE_OPENVINO_PYTHON", ".venv-openvino", "/tmp/venv-ovc/bin/python")
    if python is None:
        pytest.skip("no onnxruntime-openvino venv (.ci/run creates .venv-openvino; set CTXCACHE_OPENVINO_PYTHON)")
    res = _run_in(python, LAUNCHES.format(model=str(tmp_path / "m" / "conv.onnx"), cache=str(tmp_path / "cache")))
    runs, parts = res["runs"], res["parts"]
    assert parts is not None, "OpenVINO should be available in its own venv"
    assert parts["ep"] == OV and parts["ep_options"] == {"device_type": "CPU", "enable_qdq_optimizer": "true"}
    assert parts["ep_versions"]["openvino"].count(".") >= 2 and parts["ep_versions"]["onnxruntime-openvino"] == res["ort"]
    assert any(d.get("type") == "CPU" and d.get("model") for d in parts["devices"])
    for run in runs:
        assert _right(run), run  # whatever the cache did, the app got right outputs
        assert run["providers"][0] == OV
    if runs[0]["outcome"] == "fallback":
        # Measured on AMD hosts: the compiled context never loads ("Unhandled exception type: 1").
        assert runs[0]["reason"] == "load_failed" and "EP_FAIL" in runs[0]["message"]
        assert res["quarantined"] >= 1
        # ... and the loader remembers that, so the next launch does not pay a compile again.
        assert (runs[1]["outcome"], runs[1]["reason"]) == ("bypass", "context_unloadable"), runs
    else:
        assert [r["outcome"] for r in runs] == ["miss", "hit"], runs


def test_openvino_plugin_without_a_device_is_a_bypass(tmp_path: Path) -> None:
    python = _interpreter("CTXCACHE_OPENVINO_PLUGIN_PYTHON", ".venv-openvino-plugin", "/tmp/venv-ov/bin/python")
    if python is None:
        pytest.skip("no onnxruntime-ep-openvino venv (.ci/run creates .venv-openvino-plugin; set CTXCACHE_OPENVINO_PLUGIN_PYTHON)")
    res = _run_in(python, LAUNCHES.format(model=str(tmp_path / "m" / "conv.onnx"), cache=str(tmp_path / "cache")))
    runs = res["runs"]
    for run in runs:
        assert _right(run), run
    if runs[0]["outcome"] == "bypass":
        assert runs[0]["reason"] == "provider_unavailable" and "offers no device" in runs[0]["message"]
        assert runs[0]["providers"] == ["CPUExecutionProvider"]
    else:  # an Intel host: the plugin has devices and compiles
        assert runs[0]["outcome"] in ("miss", "fallback"), runs


# -- OpenVINO's own blob cache (cache_dir), kept under the key ---------------------------------------
BLOB_CACHE = """
import hashlib, json, os, sys, numpy as np, onnxruntime as ort
from pathlib import Path
import ctxcache
from _report import report
from ctxcache import models
from ctxcache._cache import store_of
tmp = Path(sys.argv[1])
# two apps' models of one structure and other weights, each app with its own cache_dir
ms = [models.conv_net(tmp / f"app{i}" / "model.onnx", layers=4, channels=16, seed=5 + i) for i in range(2)]
def blobs(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*.blob"))} if Path(folder).exists() else {}
def run(session, m):
    feeds = models.random_input(session, seed=3)
    ref = ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return float(np.abs(session.run(None, feeds)[0] - ref).max())

# Without ctxcache: one cache_dir shared by both models (what an app does with one setting).
shared = tmp / "shared"
plain = []
for m in ms + ms:
    s = ort.InferenceSession(str(m), providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": str(shared)})])
    run(s, m)
    plain.append(blobs(shared))

cache = ctxcache.ContextCache(tmp / "cache")
store = store_of(cache)
launches = []
for rnd in range(2):
    for i, m in enumerate(ms):
        user = tmp / f"user_cache_{rnd}_{i}"
        r = cache.load(m, providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": str(user)})])
        launches.append({"model": i, "outcome": r.outcome, "key": r.key, "maxdiff": run(r.session, m),
                         "providers": r.session.get_providers(), "user_created": user.exists(),
                         "side": blobs(store.side_dir(r.key))})
ex = cache.explain(ms[0], providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "/elsewhere"})])
key0 = launches[0]["key"]
# a blob damaged on disk, and a file planted where the folder goes: still right outputs
blob = next(store.side_dir(key0).rglob("*.blob"))
data = bytearray(blob.read_bytes()); data[len(data) // 2] ^= 0xFF; blob.write_bytes(bytes(data))
damaged = cache.load(ms[0], providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "x"})])
damaged_diff = run(damaged.session, ms[0])
# a link planted at the blob's name pointing outside, and a FIFO: nothing outside changes, no hang
outside = tmp / "outside.txt"; outside.write_bytes(b"precious")
blob.unlink(); blob.symlink_to(outside)
linked = cache.load(ms[0], providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "x"})])
linked_diff = run(linked.session, ms[0])
os.unlink(next(p for p in store.side_dir(key0).rglob("*.blob"))); os.mkfifo(blob)
fifo = cache.load(ms[0], providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "x"})])
fifo_diff = run(fifo.session, ms[0])
key1 = launches[1]["key"]
import shutil; shutil.rmtree(store.side_dir(key1)); store.side_dir(key1).write_bytes(b"in the way")
planted = cache.load(ms[1], providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "x"})])
planted_diff = run(planted.session, ms[1])
junk = [j.kind for j in store.junk(negative_ttl=1e9)]
pruned = cache.prune()
report({"plain": plain, "launches": launches, "explain": ex.side_cache, "damaged": [damaged.outcome, damaged_diff],
                  "linked": [linked_diff, outside.read_bytes().decode()], "fifo": fifo_diff,
                  "planted": [planted.outcome, planted_diff, planted.session.get_providers()[0]], "junk": junk,
                  "side_left": sorted(os.listdir(store.side_root)), "pruned": len(pruned.removed),
                  "cwd_files": sorted(os.listdir("."))})
"""


def test_openvino_blob_cache_gets_one_folder_per_model(tmp_path: Path) -> None:
    """The real OpenVINO CPU plugin: its blob's file name ignores the weights, so two models of one structure
    in one cache_dir overwrite each other's blob. Through ctxcache each model's blobs live
    in its key's folder, the app's own path is never written, and a damaged blob or a file planted where
    the folder goes still gives right outputs."""
    python = _interpreter("CTXCACHE_OPENVINO_PYTHON", ".venv-openvino", "/tmp/venv-ovc/bin/python")
    if python is None:
        pytest.skip("no onnxruntime-openvino venv (.ci/run creates .venv-openvino; set CTXCACHE_OPENVINO_PYTHON)")
    work = tmp_path / "cwd"
    work.mkdir()
    res = _child.run([str(python), "-c", textwrap.dedent(BLOB_CACHE), str(tmp_path)], timeout=600, check=True,
                     cwd=work).result
    # without ctxcache: both models' blobs under one file name in the one folder, each session overwriting it
    # (onnxruntime-openvino 1.24.1 on CPU rewrites the blob at every session, even for the same model)
    plain = res["plain"]
    assert all(len(b) == 1 for b in plain) and len({n for b in plain for n in b}) == 1
    assert all(plain[i] != plain[i + 1] for i in range(len(plain) - 1))
    launches = res["launches"]
    for run in launches:
        assert run["maxdiff"] < 1e-4, run
        assert run["providers"][0] == OV
        assert not run["user_created"], "the app's own cache_dir must not be written"
        assert len(run["side"]) == 1, run
    first, second = launches[:2], launches[2:]
    # one key per model whatever the app's path, so each model's blob in a folder of its own
    assert first[0]["key"] != first[1]["key"]
    assert [r["key"] for r in first] == [r["key"] for r in second]
    assert first[0]["side"] != first[1]["side"]
    assert res["explain"]["caches"] == {"cache_dir": "openvino"} and res["explain"]["size"] > 0
    assert res["damaged"][1] < 1e-4
    assert res["linked"][0] < 1e-4 and res["linked"][1] == "precious"
    assert res["fifo"] < 1e-4
    assert res["planted"][1] < 1e-4 and res["planted"][2] == OV
    # every context load fails on this host (no entry): the side folders are junk (the planted file too),
    # and a prune takes them
    assert res["junk"].count("side") == 2
    assert res["side_left"] == []
    assert res["cwd_files"] == []
