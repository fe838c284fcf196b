"""Shared machinery of the reliability suite (tests/test_reliability_*.py); holds no tests itself.

- ``APP``: a tiny application, run as a real process, that loads a model through ctxcache, runs it and
  prints one JSON line per load (outcome, reason, a digest of the FULL output tensor). It can SIGKILL
  itself at a named point of the load (``kill_at``) by wrapping library functions *in the child only*:
  the library carries no test hooks, and the kill is a real ``kill -9`` of a real process.
- ``reference``: the output digest of a JIT session on the original model (QNN, no cache), computed
  in its own process once per model; every app output in the suite is compared with it bit for bit
  (a QNN context is bit-exact with a JIT session, FIELD-NOTES).
- ``assert_consistent``: the on-disk invariant after any fault: every folder under ``entries/`` is a
  whole, verifiable entry; nothing half-written is visible.
- ``figures``: counters the slow tests print, and docs/reliability.md quotes.
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

ROOT = Path(__file__).resolve().parent.parent
QNN = "QNNExecutionProvider"

# How big the loops are: small by default so CI stays within its budget, larger on demand.
SOAK = int(os.environ.get("CTXCACHE_SOAK", "1"))

APP = r'''
import json, os, random, signal, sys, threading, time
cfg = json.loads(sys.argv[1])
import numpy as np, xxhash
import onnxruntime as ort
import ctxcache
from ctxcache import _fs, _loader, _locking, _store, models

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

kill_at = cfg.get("kill_at")
entries_dir = os.path.join(cfg["cache_dir"], "v1", "entries")

# ---- kill points: wrap library functions in THIS process only --------------------------------
if kill_at in ("before_compile", "mid_compile", "after_compile"):
    real_compile = _loader.compile_into
    def compile_into(*a, **k):
        if kill_at == "before_compile":
            die()
        if kill_at == "mid_compile":
            # A real SIGKILL from another thread while the native compiler runs.
            threading.Timer(random.uniform(0.0, cfg.get("compile_window", 0.15)), die).start()
        out = real_compile(*a, **k)
        if kill_at == "after_compile":
            die()
        return out
    _loader.compile_into = compile_into
if kill_at in ("locked",):
    real_lock = _locking.key_lock
    import contextlib
    @contextlib.contextmanager
    def key_lock(*a, **k):
        with real_lock(*a, **k) as w:
            print("LOCKED", flush=True)
            if kill_at == "locked":
                die()
            yield w
    _locking.key_lock = key_lock
if kill_at in ("manifest_tmp", "before_rename", "after_rename"):
    real_replace, real_rename = os.replace, os.rename
    def replace(src, dst, *a, **k):
        if kill_at == "manifest_tmp" and str(dst).endswith("manifest.json") and "staging" in str(dst):
            die()  # the manifest's temp file is written and fsynced, not yet renamed
        return real_replace(src, dst, *a, **k)
    def rename(src, dst, *a, **k):
        commit = os.path.dirname(os.fspath(dst)) == entries_dir and "staging" in os.fspath(src)
        if commit and kill_at == "before_rename":
            die()
        out = real_rename(src, dst, *a, **k)
        if commit and kill_at == "after_rename":
            die()
        return out
    os.replace, os.rename = replace, rename
if kill_at == "after_publish":
    real_after = ctxcache.ContextCache._after_publish
    def after_publish(self, entry):
        real_after(self, entry)
        die()
    ctxcache.ContextCache._after_publish = after_publish
if kill_at in ("load_any", "load_hit"):
    # The context load is where a stale context kills the process on real devices (onnxruntime
    # issue 23431): die inside ORT's session creation, with ctxcache's crash marker in place.
    real_session = ort.InferenceSession
    class Session(real_session):
        def __init__(self, model, *a, **k):
            if isinstance(model, str) and model.startswith(entries_dir) and model.endswith("ctx.onnx"):
                markers = os.listdir(os.path.join(cfg["cache_dir"], "v1", "markers"))
                print(json.dumps({"event": "dying_in_load", "markers": markers}), flush=True)
                die()
            super().__init__(model, *a, **k)
    ort.InferenceSession = Session

cache = ctxcache.ContextCache(cfg["cache_dir"], lock_timeout=cfg.get("lock_timeout", 120),
                              extra_key=cfg.get("extra_key"), max_size=cfg.get("max_size"))
providers = [("QNNExecutionProvider", models.qnn_htp_options())]
print("READY", flush=True)
for i in range(cfg.get("loads", 1)):
    model = cfg["models"][i % len(cfg["models"])]
    t = time.perf_counter()
    try:
        r = cache.load(model, providers=providers)
        out = r.session.run(None, models.random_input(r.session, seed=7))[0]
        rec = {"model": model, "outcome": r.outcome, "reason": r.reason.code if r.reason else None,
               "key": r.key, "providers": r.providers, "digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes()),
               "seconds": round(time.perf_counter() - t, 4)}
    except Exception as e:  # an app-visible error: exactly what the suite counts
        rec = {"model": model, "outcome": "error", "reason": f"{type(e).__name__}: {e}"[:500], "seconds": round(time.perf_counter() - t, 4)}
    print(json.dumps(rec), flush=True)
'''

REFERENCE = r'''
import json, sys
import numpy as np, xxhash
import onnxruntime as ort, onnxruntime_qnn
from ctxcache import models
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
so = ort.SessionOptions()
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
so.add_provider_for_devices(devs, models.qnn_htp_options())
s = ort.InferenceSession(sys.argv[1], sess_options=so)
assert "QNNExecutionProvider" in s.get_providers(), s.get_providers()
out = s.run(None, models.random_input(s, seed=7))[0]
print(json.dumps({"digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())}))
'''


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def _records(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            if "outcome" in rec:
                out.append(rec)
    return out


def app_cmd(cache_dir: Path, models: list[Path] | Path, **cfg: Any) -> list[str]:
    ms = [models] if isinstance(models, Path) else models
    cfg = dict(cfg, cache_dir=str(cache_dir), models=[str(m) for m in ms])
    return [sys.executable, "-c", APP, json.dumps(cfg)]


def app(cache_dir: Path, models: list[Path] | Path, *, timeout: float = 300, **cfg: Any) -> list[dict[str, Any]]:
    """Run the app to completion (it must exit 0); its per-load records."""
    proc = subprocess.run(app_cmd(cache_dir, models, **cfg), capture_output=True, text=True, env=_env(), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"app exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}")
    return _records(proc.stdout)


def launch(cache_dir: Path, model: Path, **cfg: Any) -> dict[str, Any]:
    recs = app(cache_dir, model, **cfg)
    assert len(recs) == 1, recs
    return recs[0]


def app_killed(cache_dir: Path, model: Path, kill_at: str, *, timeout: float = 300, **cfg: Any) -> subprocess.CompletedProcess[str]:
    """Run the app with a kill point; it must die by SIGKILL (a test whose kill never fires would prove nothing)."""
    proc = subprocess.run(app_cmd(cache_dir, model, kill_at=kill_at, **cfg), capture_output=True, text=True,
                          env=_env(), timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (
        f"kill point {kill_at!r} never fired (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    return proc


def kill_randomly(cache_dir: Path, model: Path, delay: float, **cfg: Any) -> int:
    """Start the app, SIGKILL it ``delay`` seconds after it is ready to load; returns its exit code
    (``-9`` when the kill landed, ``0`` when the load had already finished)."""
    proc = subprocess.Popen(app_cmd(cache_dir, model, **cfg), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "READY":
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.stdout.read()
    return proc.wait(timeout=60)  # reaped: a zombie's pid would still read as alive


HOLDER = r"""
import sys, time
from pathlib import Path
from ctxcache._locking import key_lock
with key_lock(Path(sys.argv[1]), None, "test"):
    print("LOCKED", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(lock: Path, seconds: float) -> subprocess.Popen[str]:
    """A process holding a key's lock (as a compiler does) for ``seconds``; returns once it holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=_env())
    assert p.stdout is not None and p.stdout.readline().strip() == "LOCKED"
    return p


_REFERENCES: dict[str, str] = {}


def reference(model: Path, *, fresh: bool = False) -> str:
    """Digest of a JIT QNN session's output on the original model (no cache involved).

    Memoised per path; ``fresh`` recomputes it (for a test that changed the model in place)."""
    key = str(model)
    if fresh or key not in _REFERENCES:
        proc = subprocess.run([sys.executable, "-c", REFERENCE, key], capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCES[key] = json.loads(proc.stdout.strip().splitlines()[-1])["digest"]
    return _REFERENCES[key]


def assert_correct(rec: dict[str, Any], model: Path, outcomes: tuple[str, ...] = ("hit", "miss", "fallback")) -> None:
    assert rec["outcome"] in outcomes, rec
    assert rec["digest"] == reference(model), f"WRONG OUTPUT for {model.name}: {rec}"
    if rec["outcome"] in ("hit", "miss"):
        assert rec["providers"][0] == QNN, rec


def assert_consistent(cache_dir: Path) -> int:
    """No half-visible entry: every name under entries/ is a whole entry whose artifacts verify.

    Returns the number of entries. Staging leftovers are allowed (a dead process's folder is cleaned by
    the next compile), but never inside entries/.
    """
    from ctxcache._store import Store

    store = Store(cache_dir)
    if not store.entries_dir.is_dir():
        return 0
    n = 0
    for name in os.listdir(store.entries_dir):
        assert len(name) == 32 and all(c in "0123456789abcdef" for c in name), f"stray name in entries/: {name}"
        entry = store.lookup(name)  # raises BrokenEntry for a half-visible entry
        assert entry is not None
        problem = store.verify(entry, full=True)
        assert problem is None, problem
        n += 1
    return n


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def report(title: str, figures: dict[str, Any]) -> None:
    """Print the figures (pytest -s shows them; -q keeps them in the captured output of a failure) and
    append them to a JSON-lines file when CTXCACHE_FIGURES names one (docs/reliability.md quotes it)."""
    line = json.dumps({"test": title, **figures}, sort_keys=True)
    print(f"\n[reliability] {line}")
    path = os.environ.get("CTXCACHE_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="session")
def rel_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small models of one architecture, other weights (same-size artifacts: swaps go unnoticed by size)."""
    from ctxcache import models

    d = tmp_path_factory.mktemp("rel-models")
    return [models.conv_net(d / f"m{i}.onnx", layers=3, channels=16, seed=10 + i) for i in range(3)]
