"""Shared machinery of the reliability suite (tests/test_reliability_*.py); holds no tests itself.

- ``APP``: a tiny application, run as a real process, that loads a model through ctxcache, runs it and
  reports one record per load (tests/_child.py's channel, not its stdout) (outcome, reason, a digest of the FULL output tensor). It can SIGKILL
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

from _child import Child, Finished, run, run_python

import ctxcache

ROOT = Path(__file__).resolve().parent.parent
QNN = "QNNExecutionProvider"

# How big the loops are: small by default so CI stays within its budget, larger on demand.
SOAK = int(os.environ.get("CTXCACHE_SOAK", "1"))

APP = r'''
import json, os, random, signal, sys, threading, time
from _report import report
cfg = json.loads(sys.argv[1])
import numpy as np, xxhash
import onnxruntime as ort
import ctxcache
from ctxcache import _fs, models
from ctxcache._seams import hooks

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

kill_at = cfg.get("kill_at")
entries_dir = os.path.join(cfg["cache_dir"], "v1", "entries")

# ---- kill points: wrap library functions in THIS process only --------------------------------
# ---- through the documented seams: ctxcache._seams.hooks and ctxcache._fs.ops ------------------
if kill_at in ("before_compile", "mid_compile", "after_compile"):
    real_compile = hooks.compile
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
    hooks.compile = compile_into
if kill_at in ("locked",):
    def locked(key):
        report("LOCKED")
        die()
    hooks.locked = locked
if kill_at in ("manifest_tmp", "before_rename", "after_rename"):
    real_replace, real_rename = _fs.ops.replace, _fs.ops.rename
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
    _fs.ops.replace, _fs.ops.rename = replace, rename
if kill_at == "after_publish":
    def published(entry):
        die()
    hooks.published = published
if kill_at in ("load_any", "load_hit"):
    # The context load is where a stale context kills the process on real devices (onnxruntime
    # issue 23431): die inside ORT's session creation, with ctxcache's crash marker in place.
    real_session = ort.InferenceSession
    class Session(real_session):
        def __init__(self, model, *a, **k):
            if isinstance(model, str) and model.startswith(entries_dir) and model.endswith("ctx.onnx"):
                markers = os.listdir(os.path.join(cfg["cache_dir"], "v1", "markers"))
                report({"event": "dying_in_load", "markers": markers})
                die()
            super().__init__(model, *a, **k)
    ort.InferenceSession = Session

cache = ctxcache.ContextCache(cfg["cache_dir"], lock_timeout=cfg.get("lock_timeout", 120),
                              extra_key=cfg.get("extra_key"), max_size=cfg.get("max_size"))
providers = [("QNNExecutionProvider", models.qnn_htp_options())]
report("READY")
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
    report(rec)
'''

REFERENCE = r'''
import json, sys
from _report import report
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
report({"digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())})
'''


def records(child: Finished) -> list[dict[str, Any]]:
    """The app's per-load records, in order (its other reports are handshakes and events)."""
    return [r for r in child.reports if isinstance(r, dict) and "outcome" in r]


def app_cmd(cache_dir: Path, models: list[Path] | Path, **cfg: Any) -> list[str]:
    ms = [models] if isinstance(models, Path) else models
    cfg = dict(cfg, cache_dir=str(cache_dir), models=[str(m) for m in ms])
    return [sys.executable, "-c", APP, json.dumps(cfg)]


def app(cache_dir: Path, models: list[Path] | Path, *, timeout: float = 300, **cfg: Any) -> list[dict[str, Any]]:
    """Run the app to completion (it must exit 0); its per-load records."""
    return records(run(app_cmd(cache_dir, models, **cfg), timeout=timeout, check=True))


def launch(cache_dir: Path, model: Path, **cfg: Any) -> dict[str, Any]:
    recs = app(cache_dir, model, **cfg)
    assert len(recs) == 1, recs
    return recs[0]


def app_killed(cache_dir: Path, model: Path, kill_at: str, *, timeout: float = 300, **cfg: Any) -> Finished:
    """Run the app with a kill point; it must die by SIGKILL (a test whose kill never fires would prove nothing)."""
    proc = run(app_cmd(cache_dir, model, kill_at=kill_at, **cfg), timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, (
        f"kill point {kill_at!r} never fired (exit {proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )
    return proc


def kill_randomly(cache_dir: Path, model: Path, delay: float, **cfg: Any) -> int:
    """Start the app, SIGKILL it ``delay`` seconds after it is ready to load; returns its exit code
    (``-9`` when the kill landed, ``0`` when the load had already finished)."""
    proc = Child(app_cmd(cache_dir, model, **cfg), stderr=subprocess.DEVNULL)
    assert proc.next_report() == "READY"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.finish(timeout=60).returncode  # reaped: a zombie's pid would still read as alive


HOLDER = r"""
import sys, time
import filelock
from _report import report
with filelock.FileLock(sys.argv[1], is_singleton=False):  # as a compiling process holds a key's lock
    report("LOCKED")
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(lock: Path, seconds: float) -> Child:
    """A process holding a key's lock (as a compiler does) for ``seconds``; returns once it holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    p = Child.python(HOLDER, str(lock), str(seconds))
    assert p.next_report() == "LOCKED"
    return p


_REFERENCES: dict[str, str] = {}


def reference(model: Path, *, fresh: bool = False) -> str:
    """Digest of a JIT QNN session's output on the original model (no cache involved).

    Memoised per path; ``fresh`` recomputes it (for a test that changed the model in place)."""
    key = str(model)
    if fresh or key not in _REFERENCES:
        _REFERENCES[key] = run_python(REFERENCE, key).result["digest"]
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
    entries_dir = cache_dir / "v1" / "entries"
    if not entries_dir.is_dir():
        return 0
    for name in os.listdir(entries_dir):
        assert len(name) == 32 and all(c in "0123456789abcdef" for c in name), f"stray name in entries/: {name}"
    results = ctxcache.ContextCache(cache_dir).verify_entries()  # a half-visible entry is a broken one
    # A loader killed inside its context load leaves a crash marker: that entry is whole (its next load
    # is a fallback by design), so only damaged files count here.
    bad = [r for r in results if r.problem is not None and r.problem.code != "crashed_during_load"]
    assert not bad, bad
    assert len(results) == len(os.listdir(entries_dir))
    return len(results)


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


# -- a real context that kills its loader --------------------------------------------------------------
def plant_killer(entry: Path, killer: tuple[Path, Path]) -> None:
    """Make ``entry`` hold the killer context, manifest re-sealed: as if the entry were intact and a
    driver update had turned its binary into one that kills its loader (onnxruntime issue 23431)."""
    import shutil

    from ctxcache._hashing import file_digest, signature

    for old in entry.iterdir():
        if old.name != "manifest.json":
            old.unlink()
    shutil.copyfile(killer[0], entry / "ctx.onnx")
    shutil.copyfile(killer[1], entry / killer[1].name)
    m = json.loads((entry / "manifest.json").read_text())
    m["artifacts"] = [{"name": p.name, "size": p.stat().st_size, "xxh3": file_digest(p), "sig": list(signature(os.lstat(p)))}
                      for p in (entry / "ctx.onnx", entry / killer[1].name)]
    (entry / "manifest.json").write_text(json.dumps(m))
