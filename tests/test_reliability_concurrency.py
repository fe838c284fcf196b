"""Many processes at once: a soak with a disruptor, lock holders killed, lock files deleted under
waiters, and clocks that jump (timestamps put in the future or the past with os.utime).

The soak's size scales with CTXCACHE_SOAK (default 1: fits CI on 2 cores); its figures are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _child import Child, dead_pid, run
from conftest import layout
from test_reliability_support import (
    QNN,
    SOAK,
    app_cmd,
    assert_consistent,
    assert_correct,
    hold_lock,
    launch,
    records,
    reference,
    report,
    tree_size,
)

import ctxcache
from ctxcache import models
from ctxcache._seams import hooks

DISRUPTOR = r'''
import json, os, random, sys, time
from _report import report
import ctxcache
cfg = json.loads(sys.argv[1])
cache = ctxcache.ContextCache(cfg["cache_dir"])
rng = random.Random(cfg["seed"])
done = {"clear": 0, "invalidate": 0, "prune": 0, "verify": 0, "errors": 0}
peak = 0
def size():
    total = 0
    for d, _, files in os.walk(cfg["cache_dir"]):
        for f in files:
            try: total += os.lstat(os.path.join(d, f)).st_size
            except OSError: pass
    return total
while not os.path.exists(cfg["stop"]):
    time.sleep(rng.uniform(0.05, 0.4))
    op = rng.choice(["clear", "invalidate", "invalidate", "prune", "verify"])
    try:
        if op == "clear":
            cache.clear()
        elif op == "invalidate":
            cache.invalidate(model=rng.choice(cfg["models"]), reason="soak")
        elif op == "prune":
            if not hasattr(cache, "prune"):
                continue
            cache.prune(max_size=rng.choice([0, 150_000, 10**9]))
        elif op == "verify":
            if not hasattr(cache, "verify_entries"):
                continue
            cache.verify_entries(fix=True)
        done[op] += 1
    except Exception as e:  # the management API must not fail under concurrent loads either
        done["errors"] += 1
        print("DISRUPTOR ERROR", op, type(e).__name__, e, file=sys.stderr, flush=True)
    peak = max(peak, size())
report({"disruptor": done, "peak_bytes": peak})
'''


@pytest.mark.slow
def test_soak_many_processes_with_a_disruptor(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir = tmp_path / "cache"
    workers, rounds, loads = 3, 3 * SOAK, 20
    for m in rel_models:
        reference(m)
    stop = tmp_path / "stop"
    disruptor = Child.python(DISRUPTOR, json.dumps({"cache_dir": str(cache_dir), "models": [str(m) for m in rel_models],
                                                   "stop": str(stop), "seed": 1}))
    start = time.perf_counter()
    recs: list[dict[str, Any]] = []
    failures: list[str] = []
    launches = killed = 0
    chaos = random.Random(7)
    try:
        for r in range(rounds):
            procs = []
            for w in range(workers):
                order = list(rel_models)
                random.Random(r * 10 + w).shuffle(order)
                # One worker per round runs with a size cap, so LRU pruning races the others too.
                cfg: dict[str, Any] = {"loads": loads, "lock_timeout": 120}
                if w == 0:
                    cfg["max_size"] = 200_000
                procs.append(Child(app_cmd(cache_dir, order, **cfg)))
            # Chaos: one app per round is SIGKILLed at a random instant (mid-hash, mid-compile,
            # mid-publish or mid-load): the others must not notice anything but a fallback at worst.
            time.sleep(chaos.uniform(0.3, 2.0))
            procs[-1].send_signal(signal.SIGKILL)
            for i, p in enumerate(procs):
                done = p.finish(timeout=600)
                launches += 1
                if i == len(procs) - 1 and done.returncode == -signal.SIGKILL:
                    killed += 1
                elif done.returncode != 0:
                    failures.append(f"worker exited {done.returncode}: {done.stderr[-2000:]}")
                recs.extend(records(done))
    finally:
        stop.touch()
        d_done = disruptor.finish(timeout=120)
    wall = time.perf_counter() - start
    disrupted, d_err = d_done.result, d_done.stderr
    by_model = {str(m): m for m in rel_models}
    outcomes: dict[str, int] = {}
    wrong = 0
    reasons: dict[str, int] = {}
    for rec in recs:
        outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        if rec.get("reason") and rec["outcome"] != "error":
            reasons[rec["reason"]] = reasons.get(rec["reason"], 0) + 1
        if rec["outcome"] == "error":
            failures.append(rec["reason"])
        elif rec["digest"] != reference(by_model[rec["model"]]):
            wrong += 1
            failures.append(f"wrong output: {rec}")
    seconds = sorted(rec["seconds"] for rec in recs)
    entry_bytes = max(tree_size(p) for p in cache_dir.glob("v1/quarantine/*")) if any(cache_dir.glob("v1/quarantine/*")) else 200_000
    # Bounded: live entries (one per model) + quarantine (8 kept) + one staging folder per worker, + logs.
    bound = (len(rel_models) + 8 + workers) * max(entry_bytes, 200_000) + 2 * 1024 * 1024
    final = tree_size(cache_dir)
    figures = {
        "processes": launches, "apps_killed": killed, "loads": len(recs), "outcomes": outcomes, "reasons": reasons, "faults_injected": disrupted["disruptor"],
        "app_visible_errors": outcomes.get("error", 0), "wrong_outputs": wrong,
        "load_seconds_median": seconds[len(seconds) // 2], "load_seconds_max": seconds[-1],
        "peak_cache_bytes": disrupted["peak_bytes"], "final_cache_bytes": final, "bound_bytes": bound,
        "wall_seconds": round(wall, 1),
    }
    report("soak", figures)
    assert not failures, failures[:5]
    # Nothing here may turn the cache off for a model but two crashes inside a load of the same key.
    assert all(r["reason"] == "crashed_during_load" for r in recs if r["outcome"] == "bypass"), reasons
    assert len(recs) >= (workers - 1) * rounds * loads
    assert disrupted["disruptor"]["errors"] == 0, d_err[-3000:]
    assert sum(v for k, v in disrupted["disruptor"].items() if k != "errors") >= 3, "the disruptor never ran"
    assert disrupted["peak_bytes"] <= bound and final <= bound, figures
    assert seconds[-1] < 120, figures  # no load waited on a lock that nobody held
    assert_consistent(cache_dir)


def _key(cache_dir: Path, model: Path) -> str:
    fp = ctxcache.ContextCache(cache_dir).key(model, providers=[(QNN, models.qnn_htp_options())])
    assert fp is not None
    return str(fp.key)


def test_lock_holder_killed_waiter_proceeds(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[0]
    lock = cache_dir / "v1" / "locks" / f"{_key(cache_dir, model)}.lock"
    holder = hold_lock(lock, 600)
    waiter = Child(app_cmd(cache_dir, model, lock_timeout=120))
    time.sleep(2.0)
    assert waiter.poll() is None, "the waiter did not wait for the lock"
    holder.kill()
    rec = records(waiter.finish(timeout=120).check())[0]
    assert rec["outcome"] == "miss", rec
    assert_correct(rec, model)
    assert rec["seconds"] >= 1.5  # it really waited, then went on as soon as the holder died
    assert assert_consistent(cache_dir) == 1


def test_lock_file_deleted_under_a_waiter(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[1]
    lock = cache_dir / "v1" / "locks" / f"{_key(cache_dir, model)}.lock"
    holder = hold_lock(lock, 4)
    waiter = Child(app_cmd(cache_dir, model, lock_timeout=120))
    time.sleep(1.5)
    lock.unlink()  # the waiter is blocked on the old inode; a newcomer creates a new lock file
    newcomer = launch(cache_dir, model, lock_timeout=120)
    # filelock re-opens the path at each poll, so the waiter may take the new file first: either may compile.
    assert newcomer["outcome"] in ("hit", "miss"), newcomer
    assert_correct(newcomer, model)
    rec = records(waiter.finish(timeout=120).check())[0]
    holder.wait(timeout=60)
    # Two locks means two compilers may publish: the atomic rename keeps each entry whole either way.
    assert rec["outcome"] in ("hit", "miss"), rec
    assert_correct(rec, model)
    assert "miss" in (rec["outcome"], newcomer["outcome"])
    assert assert_consistent(cache_dir) == 1
    assert launch(cache_dir, model)["outcome"] == "hit"


def test_lock_timeout_gives_a_working_session(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[2]
    lock = cache_dir / "v1" / "locks" / f"{_key(cache_dir, model)}.lock"
    holder = hold_lock(lock, 600)
    try:
        rec = launch(cache_dir, model, lock_timeout=1)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (rec["outcome"], rec["reason"]) == ("bypass", "lock_timeout"), rec
    assert_correct(rec, model, ("bypass",))


# -- clocks ----------------------------------------------------------------------------------------
FUTURE = time.time() + 80 * 365 * 86400
PAST = 86400.0  # 2 January 1970: a device whose clock reset


def test_timestamps_in_the_future_and_past(tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    """LRU order, pruning, negative records and staging cleanup with timestamps a moved clock leaves."""
    root = tmp_path / "cache"
    cache = ctxcache.ContextCache(root)
    results = [cache.load(m, providers=qnn_providers) for m in rel_models[:2]]
    entry_size = max(e.size for e in cache.entries())
    future, past = results[0].entry_path, results[1].entry_path
    assert future is not None and past is not None
    for path, t in ((future, FUTURE), (past, PAST)):
        for f in path.iterdir():
            os.utime(f, (t, t))
    # Hits still verify (the stat signature changed: a re-hash, then the new signature is recorded).
    for m in rel_models[:2]:
        r = ctxcache.ContextCache(root).load(m, providers=qnn_providers)
        assert r.outcome == "hit", r
    for path, t in ((future, FUTURE), (past, PAST)):
        os.utime(path / "manifest.json", (t, t))
    # A capped cache publishes a third entry: the cap holds whatever the timestamps say, and the entry
    # just made is never the one pruned.
    capped = ctxcache.ContextCache(root, max_size=entry_size + entry_size // 2)
    third = capped.load(rel_models[2], providers=qnn_providers)
    assert third.outcome == "miss"
    assert capped.size() <= entry_size + entry_size // 2
    assert [e.key for e in capped.entries()] == [third.key]
    r = capped.load(rel_models[2], providers=qnn_providers)
    assert r.outcome == "hit", r

    # A remembered compile failure stamped far in the future (the clock then went back) is not trusted.
    neg = layout(cache).negative_dir / f"{results[0].key}.json"
    neg.write_text(json.dumps({"code": "compile_failed", "message": "x", "time": FUTURE}))
    assert ctxcache.ContextCache(root).load(rel_models[0], providers=qnn_providers).outcome == "miss"


def test_staging_of_a_live_process_survives_a_clock_jump(tmp_path: Path, rel_models: list[Path],
                                                         qnn_providers: list[Any]) -> None:
    """A device that boots in 1970 and gets the time from NTP mid-compile: another process's cleanup
    must not take the staging folder of a compile that is still running."""
    from test_reliability_support import hold_lock

    cache = ctxcache.ContextCache(tmp_path / "cache")
    layout(cache).ensure()
    # A compile running in another process holds its key's lock while its staging folder exists.
    holder = hold_lock(layout(cache).lock_path("a" * 32), 600)
    try:
        live = layout(cache).new_staging("a" * 32, pid=holder.pid)
        (live / "ctx.onnx").write_bytes(b"partial")
        os.utime(live, (PAST, PAST))
        dead = layout(cache).staging_dir / f"{'b' * 32}.{dead_pid()}.abcd"
        dead.mkdir()
        # Its pid belongs to a live process now (pid reuse), but nobody holds its lock: a dead compile.
        reused = layout(cache).staging_dir / f"{'c' * 32}.{os.getpid()}.abcd"
        reused.mkdir()
        cache.load(rel_models[0], providers=qnn_providers)  # a miss: cleans staging
        assert live.is_dir() and (live / "ctx.onnx").exists()
        assert not dead.exists() and not reused.exists()
    finally:
        holder.kill()
        holder.wait()


def test_model_edited_with_mtime_restored_gets_a_new_key(tmp_path: Path, rel_models: list[Path],
                                                         qnn_providers: list[Any]) -> None:
    """`touch -r`, rsync -t or an unpacker restoring mtimes: same size, same mtime, other weights. The
    stat memo must not hand out the old digest (ctime is in the signature), or outputs would be wrong."""
    model = tmp_path / "model.onnx"
    model.write_bytes(rel_models[0].read_bytes())
    cache = ctxcache.ContextCache(tmp_path / "cache")
    first = cache.load(model, providers=qnn_providers)
    assert first.outcome == "miss"
    st = os.stat(model)
    other = rel_models[1].read_bytes()
    assert len(other) == st.st_size  # same architecture: same size
    with open(model, "r+b") as f:
        f.write(other)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = cache.load(model, providers=qnn_providers)
    assert r.key != first.key and r.outcome == "miss", r
    out = r.session.run(None, models.random_input(r.session, seed=7))[0]
    import numpy as np
    import xxhash

    assert xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes()) == reference(rel_models[1])


THREADS = r"""
import json, sys, threading
from _report import report
import numpy as np, xxhash
import ctxcache
from ctxcache import models
cfg = json.loads(sys.argv[1])
cache = ctxcache.ContextCache(cfg["cache_dir"])
out, errors = [], []
barrier = threading.Barrier(cfg["threads"])
def work(i):
    barrier.wait()  # all threads enter the first load together: provider registration races too
    for j in range(cfg["loads"]):
        model = cfg["models"][(i + j) % len(cfg["models"])]
        try:
            r = cache.load(model, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
            y = r.session.run(None, models.random_input(r.session, seed=7))[0]
            out.append({"model": model, "outcome": r.outcome, "reason": r.reason.code if r.reason else None,
                        "digest": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(y).tobytes())})
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
ts = [threading.Thread(target=work, args=(i,)) for i in range(cfg["threads"])]
[t.start() for t in ts]
[t.join() for t in ts]
report({"records": out, "errors": errors})
"""


def test_threads_of_one_app_load_at_once(tmp_path: Path, rel_models: list[Path]) -> None:
    """Apps load their models on several threads: one ContextCache shared by 4 threads, first loads at
    the same instant in a fresh process (QNN's plugin registration included)."""
    cfg = {"cache_dir": str(tmp_path / "cache"), "models": [str(m) for m in rel_models], "threads": 4, "loads": 6}
    result = run([sys.executable, "-c", THREADS, json.dumps(cfg)], timeout=600, check=True).result
    assert result["errors"] == [], result["errors"]
    assert len(result["records"]) == 24
    by_model = {str(m): m for m in rel_models}
    for rec in result["records"]:
        assert rec["outcome"] in ("hit", "miss"), rec
        assert rec["digest"] == reference(by_model[rec["model"]]), rec
    assert sum(r["outcome"] == "miss" for r in result["records"]) == len(rel_models)  # one compile per model
    assert assert_consistent(tmp_path / "cache") == len(rel_models)


@pytest.mark.parametrize("race", ["cleared", "replaced"])
def test_entry_cleared_between_publish_and_load_is_not_remembered(
    tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any], monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    """Another process clears (or replaces) the entry this one just published, before it loads it: a
    fallback, once; not "this context cannot load here" for negative_ttl."""
    import shutil

    cache = ctxcache.ContextCache(tmp_path / "cache")
    def then_race(entry: Any) -> None:
        if race == "cleared":
            ctxcache.ContextCache(cache.root).clear()
        else:  # a rebuilt entry under the same key: other files, other entry_id
            shutil.rmtree(entry.path / "ctx_qnn.bin", ignore_errors=True)
            (entry.path / "ctx_qnn.bin").write_bytes(b"x")

    monkeypatch.setattr(hooks, "published", then_race)
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "fallback", r
    monkeypatch.undo()
    again = ctxcache.ContextCache(tmp_path / "cache").load(rel_models[0], providers=qnn_providers)
    assert again.outcome == "miss", again
    assert again.session.run(None, models.random_input(again.session, seed=7)) is not None
