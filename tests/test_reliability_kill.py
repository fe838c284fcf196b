"""kill -9 of a real app process at every step of a miss and during a context load, then launch again.

Each case: the killed process leaves whatever it leaves; the on-disk invariant holds (no half-visible
entry), the next launch gets a working QNN session whose output is bit-identical to a JIT session on
the original model, and the launch after that is a hit (the cache healed itself).
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from _child import Child, run
from test_reliability_support import (
    SOAK,
    app,
    app_cmd,
    app_killed,
    assert_consistent,
    assert_correct,
    kill_randomly,
    launch,
    plant_killer,
    reference,
    report,
)

# Points of a miss, in the order a load passes them; what the relaunch must report after each.
# Before the commit rename nothing is visible (relaunch compiles: miss); after it the entry is whole (hit).
KILL_POINTS = [
    ("locked", "miss"),  # lock taken, nothing written yet
    ("before_compile", "miss"),  # staging folder created, empty
    ("mid_compile", "miss"),  # native compiler killed at a random instant while it writes
    ("after_compile", "miss"),  # ctx.onnx + .bin staged, no manifest
    ("manifest_tmp", "miss"),  # manifest temp file written, not renamed
    ("before_rename", "miss"),  # whole entry staged and fsynced, commit rename not done
    ("after_rename", "hit"),  # committed, entries/ not yet fsynced, no session yet
    ("after_publish", "hit"),  # committed and pruned, killed before the context load
]


@pytest.mark.parametrize("point,relaunch", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_kill_during_miss_then_relaunch_heals(tmp_path: Path, rel_models: list[Path], point: str, relaunch: str) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[0]
    app_killed(cache_dir, model, point)
    assert_consistent(cache_dir)
    second = launch(cache_dir, model)
    if point == "mid_compile":
        # The timer may fire after the compile returned (then the entry may be committed): either is right.
        assert second["outcome"] in ("miss", "hit"), second
    else:
        assert second["outcome"] == relaunch, second
    assert_correct(second, model)
    third = launch(cache_dir, model)
    assert third["outcome"] == "hit", third
    assert_correct(third, model)
    assert assert_consistent(cache_dir) == 1
    # The dead process's staging folder is gone once a later compile ran (or there was none).
    staging = cache_dir / "v1" / "staging"
    if second["outcome"] == "miss":
        assert not any(staging.iterdir()), list(staging.iterdir())


def test_an_external_kill_during_a_context_load_keeps_the_entry(tmp_path: Path, rel_models: list[Path]) -> None:
    """Killed from outside inside ORT's load of a freshly compiled context (a service stop, the
    low-memory killer): the crash marker is there, but a probe load in a child process shows the
    context loads, so the entry is kept and the next launch hits."""
    cache_dir, model = tmp_path / "cache", rel_models[0]
    proc = app_killed(cache_dir, model, "load_any")
    dying = [r for r in proc.reports if isinstance(r, dict) and r.get("event") == "dying_in_load"]
    assert dying and any(m.count(".") == 2 for m in dying[0]["markers"]), dying  # the marker was in place
    second = launch(cache_dir, model)
    assert second["outcome"] == "hit", second
    assert_correct(second, model)
    markers = cache_dir / "v1" / "markers"
    assert [p.name for p in markers.iterdir()] == []  # consumed; the death note is gone after a good load
    assert launch(cache_dir, model)["outcome"] == "hit"


def test_two_external_kills_do_not_switch_the_cache_off(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[1]
    assert launch(cache_dir, model)["outcome"] == "miss"
    app_killed(cache_dir, model, "load_any")
    app_killed(cache_dir, model, "load_any")  # killed again, in a row
    third = launch(cache_dir, model)
    assert third["outcome"] == "hit", third  # not quarantined, not remembered for negative_ttl
    assert_correct(third, model)
    assert not any((cache_dir / "v1" / "negative").iterdir())
    assert not any((cache_dir / "v1" / "quarantine").iterdir())


def test_a_context_that_kills_its_loader_is_condemned_by_the_probe(tmp_path: Path, rel_models: list[Path],
                                                                  killer_context: tuple[Path, Path]) -> None:
    """A real killer (SIGSEGV in session creation): the launch dies once; the next one's probe dies too,
    so that context is never loaded in the app again; it is rebuilt."""
    cache_dir, model = tmp_path / "cache", rel_models[0]
    first = launch(cache_dir, model)
    plant_killer(cache_dir / "v1" / "entries" / first["key"], killer_context)
    died = run(app_cmd(cache_dir, model), timeout=300)
    assert died.returncode == -signal.SIGSEGV, (died.returncode, died.stderr[-2000:])
    second = launch(cache_dir, model)
    assert (second["outcome"], second["reason"]) == ("fallback", "crashed_during_load"), second
    assert_correct(second, model, ("fallback",))
    assert assert_consistent(cache_dir) == 0 and any((cache_dir / "v1" / "quarantine").iterdir())
    assert launch(cache_dir, model)["outcome"] == "miss"
    assert launch(cache_dir, model)["outcome"] == "hit"


def test_a_context_that_kills_only_the_app_is_condemned_after_three_deaths(tmp_path: Path, rel_models: list[Path]) -> None:
    """A context that kills the app's process but loads in a probe (here: every app launch dies inside
    the context load): three deaths in a row and it is condemned, not a crash at every launch."""
    cache_dir, model = tmp_path / "cache", rel_models[2]
    app_killed(cache_dir, model, "load_any")  # compile, death 1 (its probe at the next launch loads)
    app_killed(cache_dir, model, "load_any")  # death 2
    app_killed(cache_dir, model, "load_any")  # death 3
    r = app(cache_dir, model, kill_at="load_any")[0]  # would die too if it loaded the context
    assert (r["outcome"], r["reason"]) == ("fallback", "crashed_during_load"), r
    assert_correct(r, model, ("fallback",))


@pytest.mark.slow
def test_kill_at_random_times_loop(tmp_path: Path, rel_models: list[Path]) -> None:
    """SIGKILL at a random instant of a launch, many times (CTXCACHE_SOAK scales it), then relaunch."""
    rng = random.Random(int(time.time()))
    cache_dir = tmp_path / "cache"
    rounds = 8 * SOAK
    landed = 0
    seen: dict[str, int] = {}
    start = time.perf_counter()
    # How long a miss takes here and now (hash, lock, compile, publish, load, run): the kills are drawn
    # over that window, so they land inside the load on a fast idle machine and a loaded one alike.
    window = launch(cache_dir, rel_models[0], extra_key="calibrate")["seconds"] * 1.1
    for i in range(rounds):
        model = rel_models[i % len(rel_models)]
        extra = f"round{i}"  # a fresh key each round, so every round kills a real compile window
        rc = kill_randomly(cache_dir, model, rng.uniform(0.0, window), extra_key=extra)
        landed += rc == -9
        assert_consistent(cache_dir)
        rec = launch(cache_dir, model, extra_key=extra)
        assert_correct(rec, model)
        seen[rec["outcome"]] = seen.get(rec["outcome"], 0) + 1
        # A kill inside the context load is an external kill: the probe shows the context loads, so
        # not even that costs a fallback.
        assert rec["outcome"] in ("hit", "miss"), rec
    # The loop proves nothing if the kills never landed inside a load.
    assert landed >= rounds // 2, (landed, rounds)
    report("kill_random_loop", {"rounds": rounds, "window_seconds": round(window, 3), "kills_landed": landed, "relaunch_outcomes": seen,
                                "entries": assert_consistent(cache_dir), "seconds": round(time.perf_counter() - start, 1)})


def test_reference_is_qnn_and_deterministic(rel_models: list[Path]) -> None:
    # Guard for the whole suite: the reference would make every comparison vacuous if two models
    # gave the same digest.
    digests = {reference(m) for m in rel_models}
    assert len(digests) == len(rel_models)


def test_crash_marker_survives_pid_reuse(tmp_path: Path, rel_models: list[Path], killer_context: tuple[Path, Path]) -> None:
    """The app died in a context load and its pid now belongs to a live process: in a container the
    app is pid 1 at every start, so "is the marker's pid alive?" alone would say yes and the restarted
    app would load the killer context again, forever."""
    cache_dir, model = tmp_path / "cache", rel_models[2]
    first = launch(cache_dir, model)
    assert first["outcome"] == "miss"
    plant_killer(cache_dir / "v1" / "entries" / first["key"], killer_context)
    died = run(app_cmd(cache_dir, model), timeout=300)
    assert died.returncode == -signal.SIGSEGV
    markers = list((cache_dir / "v1" / "markers").iterdir())
    assert len(markers) == 1, markers
    key, _pid, rand = markers[0].name.split(".")
    markers[0].rename(markers[0].with_name(f"{key}.1.{rand}"))  # pid 1: always alive
    second = launch(cache_dir, model)  # would die if it loaded the context
    assert (second["outcome"], second["reason"]) == ("fallback", "crashed_during_load"), second
    assert_correct(second, model, ("fallback",))


HOLD_MARKER = r"""
import sys, time
from pathlib import Path
from ctxcache import _markers  # a loader holding its crash marker while it loads
from _report import report
m = _markers.mark(Path(sys.argv[1]) / "v1" / "markers", sys.argv[2])
report("MARKED")
time.sleep(60)
"""


def test_marker_of_a_loader_still_loading_does_not_poison(tmp_path: Path, rel_models: list[Path]) -> None:
    cache_dir, model = tmp_path / "cache", rel_models[2]
    first = launch(cache_dir, model)
    holder = Child.python(HOLD_MARKER, str(cache_dir), first["key"])
    try:
        assert holder.next_report() == "MARKED"
        rec = launch(cache_dir, model)
        assert rec["outcome"] == "hit", rec
        assert_correct(rec, model)
    finally:
        holder.kill()
    # Its holder is gone now: the same marker is a dead loader's, but the context loads in a probe.
    assert launch(cache_dir, model)["outcome"] == "hit"


def test_crashed_entry_is_quarantined_even_while_its_lock_is_held(tmp_path: Path, rel_models: list[Path],
                                                                   killer_context: tuple[Path, Path]) -> None:
    """The fallback consumes the dead loader's marker; if it then left the entry alone because another
    process held the key's lock, that process (or the next launch) would load the killer context again."""
    from test_reliability_support import hold_lock

    cache_dir, model = tmp_path / "cache", rel_models[0]
    first = launch(cache_dir, model)
    plant_killer(cache_dir / "v1" / "entries" / first["key"], killer_context)
    died = run(app_cmd(cache_dir, model), timeout=300)
    assert died.returncode == -signal.SIGSEGV
    holder = hold_lock(cache_dir / "v1" / "locks" / f"{first['key']}.lock", 600)
    try:
        second = launch(cache_dir, model)
        assert (second["outcome"], second["reason"]) == ("fallback", "crashed_during_load"), second
        assert assert_consistent(cache_dir) == 0, "the crashed entry is still there to be loaded again"
    finally:
        holder.kill()
        holder.wait()


def test_a_context_that_kills_every_load_stops_being_loaded(tmp_path: Path, rel_models: list[Path],
                                                            killer_context: tuple[Path, Path]) -> None:
    """On a device where the context kills its loader every time (a driver bug), ctxcache recompiles
    once, and after the second crash runs the original model instead of crashing every other launch."""
    cache_dir, model = tmp_path / "cache", rel_models[1]
    for round_ in range(2):
        rec = launch(cache_dir, model)
        assert rec["outcome"] == "miss", (round_, rec)  # compiled (again)
        plant_killer(cache_dir / "v1" / "entries" / rec["key"], killer_context)  # ... and it kills
        died = run(app_cmd(cache_dir, model), timeout=300)
        assert died.returncode == -signal.SIGSEGV
        r = launch(cache_dir, model)
        assert (r["outcome"], r["reason"]) == ("fallback", "crashed_during_load"), r
    for _ in range(2):  # from now on: no compile, no context load, no crash
        r = launch(cache_dir, model)
        assert (r["outcome"], r["reason"]) == ("bypass", "crashed_during_load"), r
        assert_correct(r, model, ("bypass",))
    # clear() forgets it (a driver update, say); the next launch compiles again.
    import ctxcache

    ctxcache.ContextCache(cache_dir).clear()
    assert launch(cache_dir, model)["outcome"] == "miss"


MANAGE = r"""
import os, signal, sys
from pathlib import Path
import ctxcache
from ctxcache import _fs
cache_dir, op, point = sys.argv[1], sys.argv[2], sys.argv[3]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "removing":  # the entry is out of entries/ (renamed to trash), its files half deleted
    real_unlink, seen = _fs.ops.unlink, []
    def unlink(*a, **k):
        seen.append(a)
        if len(seen) == 2:
            die()
        real_unlink(*a, **k)
    _fs.ops.unlink = unlink
elif point == "quarantined":  # renamed into quarantine/, reason.json not yet written (through the seam)
    real_rename = _fs.ops.rename
    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        if "quarantine" in os.fspath(dst):
            die()
    _fs.ops.rename = rename
cache = ctxcache.ContextCache(cache_dir)
if op == "clear":
    cache.clear()
elif op == "invalidate":
    cache.invalidate(key=sys.argv[4])
elif op == "prune":
    cache.prune(max_size=0)
from _report import report
report("NOT KILLED")
"""


@pytest.mark.parametrize("op,point", [("clear", "removing"), ("invalidate", "quarantined"), ("prune", "removing")])
def test_kill_during_cache_management(tmp_path: Path, rel_models: list[Path], op: str, point: str) -> None:
    """`ctxcache clear / prune` or an invalidation killed half way: the apps never see half an entry."""
    import sys

    import ctxcache

    cache_dir = tmp_path / "cache"
    recs = app(cache_dir, rel_models)
    recs += app(cache_dir, rel_models[1:])
    key = recs[0]["key"]
    if op == "prune" and not hasattr(ctxcache.ContextCache, "prune"):
        pytest.skip("ContextCache.prune is not in this tree")
    proc = run([sys.executable, "-c", MANAGE, str(cache_dir), op, point, key], timeout=300)
    assert proc.returncode == -9, (proc.returncode, proc.reports, proc.stderr[-2000:])
    assert_consistent(cache_dir)
    outcomes = []
    for m in rel_models:
        rec = launch(cache_dir, m)
        assert_correct(rec, m, ("hit", "miss"))
        outcomes.append(rec["outcome"])
        assert launch(cache_dir, m)["outcome"] == "hit"
    assert "miss" in outcomes  # the killed operation had taken at least one entry away
    # ... and that recompile cleaned the dead process's half-deleted trash out of staging.
    leftovers = [p.name for p in (cache_dir / "v1" / "staging").iterdir()]
    assert not any(n.startswith("trash.") for n in leftovers), leftovers
