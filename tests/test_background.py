"""A first launch that does not wait for the compile (``on_miss="background"``), and the verdict policy that
reuses its mechanism (SUPPORTED_PREFER_RECOMPILATION: serve now, rebuild for the next launch).

Real processes on the real QNN compiler: the app is a fresh interpreter that exits right after its
pending load; the compile runs in the detached worker it started. The verdicts themselves are played
through the provider seam (``ExecutionProvider.compatibility``): on this x86 host QNN's own check cannot
answer (it wants an NPU device), which one test asserts against the real call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _child import Child, run_python
from conftest import QNN, ROOT, Layout, layout, output_digest
from test_reliability_support import reference

import ctxcache

APP = r"""
import json, sys, time
t0 = time.perf_counter()
from _report import report
import ctxcache
from ctxcache import models
cache = ctxcache.ContextCache(sys.argv[1], on_miss="background")
r = cache.load(sys.argv[2], providers=[("QNNExecutionProvider", models.qnn_htp_options())])
ready = time.perf_counter() - t0
import numpy as np, xxhash
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
report({"outcome": r.outcome, "reason": r.reason.code if r.reason else None, "key": r.key,
        "providers": list(r.providers), "ready": ready,
        "digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())})
"""  # ... and the process exits at once: the worker must finish on its own


def _app(cache_dir: Path, model: Path) -> dict[str, Any]:
    return run_python(APP, str(cache_dir), str(model)).result  # type: ignore[no-any-return]


def _cpu_reference(model: Path) -> str:
    import numpy as np
    import onnxruntime as ort
    import xxhash

    from ctxcache import models

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = s.run(None, models.random_input(s, seed=7))[0]
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())


def _wait_entry(cache_dir: Path, key: str, timeout: float = 120) -> bool:
    return ctxcache.ContextCache(cache_dir).wait(key, timeout)


def _wait_worker_gone(cache_dir: Path, key: str, timeout: float = 60) -> None:
    """The entry appears before the worker records its miss and removes its guard (its last act): counts
    are read only after that, or a fast reader sees the entry but not yet the event."""
    guard = Layout(cache_dir).locks_dir / f"{key}.bg"
    deadline = time.monotonic() + timeout
    while guard.exists():
        assert time.monotonic() < deadline, "the worker did not finish"
        time.sleep(0.05)


def _worker_pid(cache_dir: Path, key: str) -> int:
    guard = Layout(cache_dir).locks_dir / f"{key}.bg"
    deadline = time.monotonic() + 30
    while not guard.exists():
        assert time.monotonic() < deadline, "no worker was started"
        time.sleep(0.05)
    return int(json.loads(guard.read_text())["pid"])


def test_the_app_exits_right_after_a_pending_launch_and_the_entry_appears(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[0]
    first = _app(cache_dir, model)
    assert (first["outcome"], first["reason"]) == ("pending", "compiling_in_background"), first
    assert first["providers"] == ["CPUExecutionProvider"] and first["digest"] == _cpu_reference(model)
    assert _wait_entry(cache_dir, first["key"])  # the app is gone; its worker finished the job
    hit = _app(cache_dir, model)
    assert hit["outcome"] == "hit" and hit["providers"][0] == QNN
    assert hit["digest"] == reference(model)  # bit-identical to a JIT QNN session


def test_ten_concurrent_pending_launches_start_one_compile(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[1]
    procs = [Child.python(APP, str(cache_dir), str(model), stderr=subprocess.DEVNULL) for _ in range(10)]
    recs = [p.finish(timeout=300).result for p in procs]
    assert all(r["outcome"] in ("pending", "hit") for r in recs), recs
    key = recs[0]["key"]
    assert _wait_entry(cache_dir, key)
    _wait_worker_gone(cache_dir, key)
    stats = ctxcache.ContextCache(cache_dir).stats()
    assert stats.misses == 1, stats  # one compile, by one worker
    assert _app(cache_dir, model)["outcome"] == "hit"


def test_a_killed_compile_is_retried_and_repeated_deaths_are_remembered(tmp_path: Path, rel_models: list[Path]) -> None:
    from ctxcache import models

    cache_dir = tmp_path / "cache"
    # A model big enough that its compile is still running when the test kills the worker.
    model = models.transformer_block(tmp_path / "big.onnx", d_ff=7168, seed=5)
    for attempt in range(3):
        r = _app(cache_dir, model)
        assert (r["outcome"], r["reason"]) == ("pending", "compiling_in_background"), (attempt, r)
        os.kill(_worker_pid(cache_dir, r["key"]), signal.SIGKILL)  # the user logs off
        time.sleep(0.3)
        assert not ctxcache.ContextCache(cache_dir).entries()
    # Three workers died before finishing: a later launch no longer starts a doomed compile.
    r = _app(cache_dir, model)
    assert (r["outcome"], r["reason"]) == ("bypass", "not_compilable"), r
    assert r["digest"] == _cpu_reference(model) or r["providers"][0] == QNN


def test_a_killed_compile_is_retried_at_the_next_launch(tmp_path: Path, rel_models: list[Path]) -> None:
    from ctxcache import models

    cache_dir = tmp_path / "cache"
    model = models.transformer_block(tmp_path / "big.onnx", d_ff=7168, seed=6)
    r = _app(cache_dir, model)
    os.kill(_worker_pid(cache_dir, r["key"]), signal.SIGKILL)
    time.sleep(0.3)
    again = _app(cache_dir, model)
    assert (again["outcome"], again["reason"]) == ("pending", "compiling_in_background"), again
    assert _wait_entry(cache_dir, r["key"])
    assert _app(cache_dir, model)["outcome"] == "hit"


def test_a_compile_that_fails_is_remembered_and_not_started_again(tmp_path: Path, qnn_providers: list[Any]) -> None:
    from test_loader import _size_model

    cache_dir = tmp_path / "cache"
    model = _size_model(tmp_path / "size.onnx")  # QNN takes no node of it
    first = ctxcache.ContextCache(cache_dir, on_miss="background").load(model, providers=qnn_providers)
    assert first.outcome == "pending"
    assert not first.ready(60)  # the worker finished without an entry
    again = ctxcache.ContextCache(cache_dir, on_miss="background").load(model, providers=qnn_providers)
    assert (again.outcome, again.reason.code if again.reason else None) == ("bypass", "not_compilable")
    assert not (Layout(cache_dir).locks_dir / f"{first.key}.bg").exists()


def test_a_long_running_app_learns_when_the_context_is_ready(tmp_path: Path, rel_models: list[Path],
                                                            qnn_providers: list[Any]) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache", on_miss="background")
    r = cache.load(rel_models[2], providers=qnn_providers)
    assert r.outcome == "pending" and r.key
    assert r.ready(120)
    swapped = cache.load(rel_models[2], providers=qnn_providers)  # the app's choice: swap sessions
    assert swapped.outcome == "hit" and output_digest(swapped) == reference(rel_models[2])
    assert swapped.ready() and cache.wait(r.key, 0)


def test_a_model_new_to_the_cache_whose_entry_exists_is_still_a_hit(tmp_path: Path, rel_models: list[Path],
                                                                    qnn_providers: list[Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A first launch's session is made while the key is worked out, when the model's bytes were just
    hashed; a copy of a cached model at a new path is that case and still a hit (the early session is
    dropped), with the context's outputs."""
    import shutil

    from ctxcache import _background

    started: list[object] = []
    real_init = _background.EarlySession.__init__

    def counting(self: Any, make: Any) -> None:
        started.append(self)
        real_init(self, make)

    monkeypatch.setattr(_background.EarlySession, "__init__", counting)
    cache = ctxcache.ContextCache(tmp_path / "cache", on_miss="background")
    first = cache.load(rel_models[0], providers=qnn_providers)
    assert first.outcome == "pending" and first.ready(120)
    copy = tmp_path / "elsewhere" / "model.onnx"
    copy.parent.mkdir()
    shutil.copyfile(rel_models[0], copy)
    again = ctxcache.ContextCache(tmp_path / "cache", on_miss="background").load(copy, providers=qnn_providers)
    assert again.outcome == "hit" and again.providers[0] == QNN
    assert output_digest(again) == reference(rel_models[0])
    assert len(started) == 2  # both launches began the early session; the second dropped it


def test_where_no_process_can_be_started_the_miss_compiles_in_the_foreground(tmp_path: Path, rel_models: list[Path]) -> None:
    """A frozen app (PyInstaller, Briefcase): sys.executable is the app itself and must not be started."""
    code = r"""
import json, sys
sys.frozen = True
from _report import report
import ctxcache
from ctxcache import models
r = ctxcache.ContextCache(sys.argv[1], on_miss="background").load(sys.argv[2],
        providers=[("QNNExecutionProvider", models.qnn_htp_options())])
report({"outcome": r.outcome, "reason": r.reason.code if r.reason else None, "msg": r.reason.message if r.reason else ""})
"""
    r = run_python(code, str(tmp_path / "cache"), str(rel_models[0])).result
    assert (r["outcome"], r["reason"]) == ("miss", "background_unavailable") and "frozen" in r["msg"], r


# -- the EP's verdict drives reuse (device reality) ------------------------------------------------------
@pytest.fixture
def qnn_seam(monkeypatch: pytest.MonkeyPatch) -> Any:
    from ctxcache import providers

    qnn = providers.get(QNN)
    calls: list[str] = []

    def play(answer: str) -> None:
        def compatibility(info: str) -> tuple[str, str]:
            calls.append(info)
            return answer, f"ONNX Runtime reports EP_{answer.upper()} (played through the provider seam)"

        monkeypatch.setattr(qnn, "compatibility", compatibility)

    play.calls = calls  # type: ignore[attr-defined]
    return play


def test_qnn_cannot_judge_on_this_host_and_the_cpu_ep_really_answers(tmp_path: Path, rel_models: list[Path],
                                                                      qnn_providers: list[Any]) -> None:
    """The real calls: QNN raises without an NPU (fail soft: unknown, the entry is served); the CPU EP's
    devices really answer NOT_APPLICABLE for a QNN compatibility string."""
    import onnxruntime as ort

    from ctxcache import providers
    from ctxcache.providers._base import ort_verdict

    cache = ctxcache.ContextCache(tmp_path / "cache")
    r = cache.load(rel_models[0], providers=qnn_providers)
    info = json.loads((layout(cache).entry_path(r.key) / "manifest.json").read_text())["compat"][QNN]
    assert info.startswith("v2:")
    answer, detail = providers.get(QNN).compatibility(info)
    assert answer == "unknown" and "NPU" in detail
    cpu = [d for d in ort.get_ep_devices() if d.ep_name == "CPUExecutionProvider"]
    assert ort_verdict(cpu, info)[0] == "not_applicable"
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"


def test_the_verdict_is_asked_once_per_entry_and_environment(tmp_path: Path, rel_models: list[Path],
                                                            qnn_providers: list[Any], qnn_seam: Any) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "miss"
    qnn_seam("optimal")
    for _ in range(3):
        assert ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers).outcome == "hit"
    assert len(qnn_seam.calls) == 1


def test_unsupported_is_never_loaded_and_is_rebuilt_in_the_same_launch(tmp_path: Path, rel_models: list[Path],
                                                                       qnn_providers: list[Any], qnn_seam: Any) -> None:
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(rel_models[0], providers=qnn_providers)
    qnn_seam("unsupported")
    ex = cache.explain(rel_models[0], providers=qnn_providers)
    assert (ex.verdict, ex.reason.code if ex.reason else None) == ("miss", "incompatible")  # as the load: rebuilt at once
    old_id = json.loads((first.entry_path / "manifest.json").read_text())["entry_id"]  # type: ignore[operator]
    verified: list[str] = []
    from ctxcache._seams import hooks

    real = hooks.verified
    hooks.verified = lambda entry: verified.append(entry.entry_id)
    try:
        r = cache.load(rel_models[0], providers=qnn_providers)
    finally:
        hooks.verified = real
    assert (r.outcome, r.reason.code if r.reason else None) == ("miss", "incompatible"), r
    assert "EP_UNSUPPORTED" in r.reason.message  # type: ignore[union-attr]
    assert old_id not in verified and len(verified) == 1  # only the rebuilt entry was ever loaded
    assert output_digest(r) == reference(rel_models[0])


def test_prefer_recompilation_serves_now_and_rebuilds_for_the_next_launch(tmp_path: Path, rel_models: list[Path],
                                                                          qnn_providers: list[Any], qnn_seam: Any) -> None:
    cache_dir = tmp_path / "cache"
    cache = ctxcache.ContextCache(cache_dir)
    first = cache.load(rel_models[1], providers=qnn_providers)
    assert first.key
    before = json.loads((layout(cache).entry_path(first.key) / "manifest.json").read_text())["entry_id"]
    qnn_seam("prefer_recompilation")
    r = ctxcache.ContextCache(cache_dir).load(rel_models[1], providers=qnn_providers)
    assert (r.outcome, r.reason.code if r.reason else None) == ("hit", "prefer_recompilation"), r
    assert output_digest(r) == reference(rel_models[1])  # served now
    guard = Layout(cache_dir).locks_dir / f"{first.key}.bg"
    deadline = time.monotonic() + 120
    while True:  # the worker replaces the entry once its new context loads
        try:
            manifest = json.loads((layout(cache).entry_path(first.key) / "manifest.json").read_text())
        except FileNotFoundError:
            # Between moving the old entry aside and renaming the new one in, the folder is absent for a
            # moment (a load there sees no entry, never half of one); look again.
            manifest = {"entry_id": before}
        if manifest["entry_id"] != before and not guard.exists():
            break
        assert time.monotonic() < deadline, "the entry was not rebuilt"
        time.sleep(0.2)
    assert manifest.get("rebuilt_for")
    again = ctxcache.ContextCache(cache_dir).load(rel_models[1], providers=qnn_providers)
    assert again.outcome == "hit" and output_digest(again) == reference(rel_models[1])
    assert again.reason is None and not guard.exists()  # rebuilt once per environment, not at every launch


def test_warm_detach_returns_at_once_and_the_warm_up_finishes(tmp_path: Path, rel_models: list[Path]) -> None:
    """An installer step that must not block: `ctxcache warm --detach` returns, the entries appear."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cache_dir, log = tmp_path / "cache", tmp_path / "warm.log"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ctxcache", "warm", str(rel_models[0]), str(rel_models[1]), "--detach",
                           "--log", str(log), "--cache-dir", str(cache_dir), "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    started = json.loads(proc.stdout)
    assert started["detached"] and started["log"] == str(log)
    assert time.monotonic() - t < 30
    deadline = time.monotonic() + 180
    while len(ctxcache.ContextCache(cache_dir).entries()) < 2:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.3)
    bad = subprocess.run([sys.executable, "-m", "ctxcache", "warm", str(tmp_path / "missing.onnx"), "--detach",
                          "--cache-dir", str(cache_dir)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr  # bad input is said now, not in a log
