"""The one rule that decides whether a committed entry may be served to a session.

Load, ``explain``, ``warm`` and ``verify`` all ask :func:`entry_problem`; none re-states any part of
it. (When ``explain`` had its own copy it said "hit" where the load fell back as ``incompatible``.)

Content is verified at every hit by default: a stat signature says nothing about block-level damage,
so every byte served is re-hashed. :class:`ContentCheck` does it on a thread while ONNX Runtime creates
the session (both read the same, page-cached file; xxh3 and the session setup release the GIL), and the
loader hands the session out only once the digests agree.
"""

from __future__ import annotations

import _thread
import json
from typing import Literal, get_args

from . import _fs
from ._log import log
from ._manifest import Entry
from ._markers import consume, dead_markers, deaths, note_death
from ._store import Problem, Store
from ._types import Reason
from .providers import ExecutionProvider
from .providers._base import Verdict

Digests = Literal["all", "changed", "none"]
_ANSWERS = frozenset(get_args(Verdict))


#: Loaders of one entry killed this many times in a row, each time with a probe load that came through,
#: and the entry is condemned all the same: a context that kills only the app's process (memory, other
#: sessions) must not make every launch crash. Fewer are external kills (service stop, force-stop, OOM).
MAX_DEATHS = 3


def entry_problem(store: Store, entry: Entry, ep: ExecutionProvider | None, *, digests: Digests,
                  consume_markers: bool = False, fresh: bool = False,
                  options: dict[str, str] | None = None, env: str = "") -> Reason | None:
    """:func:`judge`'s reason alone."""
    return judge(store, entry, ep, digests=digests, consume_markers=consume_markers, fresh=fresh, options=options,
                 env=env)[0]


def judge(store: Store, entry: Entry, ep: ExecutionProvider | None, *, digests: Digests,
          consume_markers: bool = False, fresh: bool = False,
          options: dict[str, str] | None = None, env: str = "") -> tuple[Reason | None, Verdict, str]:
    """Why ``entry`` must not be served on ``ep`` here, or ``None`` when it may be.

    In order: a process died while loading it and a probe load in a child process says the context is
    why (:func:`crash_problem`); its files are missing,
    of another size or not regular, or the context refers to files outside it; their bytes differ
    from the recorded digests (``digests``: every file, only those whose stat signature changed, or
    none here because the caller runs a :class:`ContentCheck`); the provider's compatibility check
    refuses it (ONNX Runtime's verdict UNSUPPORTED, see :func:`verdict`). Returns the reason (``None``:
    servable), the provider's verdict and its detail (a caller serves a ``prefer_recompilation`` entry
    and has it rebuilt). ``consume_markers`` removes the dead loaders' markers once the caller acts on the
    verdict (the loader quarantines the entry); a read-only caller leaves them. ``fresh`` skips the
    compatibility check for a context compiled a moment ago in this process (QNN's check segfaulted
    when called right after a compile).
    """
    dead = dead_markers(store.markers_dir, entry.key)
    if dead:
        # A loader died on this entry. Bytes that are no longer the recorded ones explain that death by
        # themselves: damage (quarantined, rebuilt), never a crash counted toward turning the cache off.
        damaged = store.check_files(entry) or store.check_digests(entry, only_changed=False)
        if damaged is not None:
            if consume_markers:
                consume(store.markers_dir, dead)
            return Reason(damaged.code, f"{damaged.message} (a loader died on these bytes)"), "unknown", ""
        crashed = crash_problem(store, entry, ep, options, act=consume_markers)
        if crashed is not None:
            return crashed, "unknown", ""
    problem = store.check_files(entry)
    if problem is not None and problem.code in ("artifact_unreadable", "unsafe_context"):
        # A context that does not parse, or names files it should not, may just be damaged bytes:
        # say so when the digests disagree (the root cause, and what a re-hash would have found).
        problem = store.check_digests(entry, only_changed=False) or problem
    elif problem is None and digests != "none":
        problem = store.check_digests(entry, only_changed=digests == "changed")
    if problem is not None:
        return Reason(problem.code, problem.message), "unknown", ""
    if ep is None or fresh:
        return None, "unknown", "not asked"
    answer, detail = verdict(store, entry, ep, env)
    if answer == "unsupported":
        return Reason("incompatible", f"{detail}: the context does not run on this device (a driver or SDK "
                                      "update?); it is rebuilt"), answer, detail
    return None, answer, detail


def verdict(store: Store, entry: Entry, ep: ExecutionProvider, env: str) -> tuple[Verdict, str]:
    """The provider's verdict on ``entry`` here, asked from the compatibility string the entry recorded
    (no session needed) and remembered per entry and environment (``env``: a digest of the devices,
    drivers and versions), so a hit asks ONNX Runtime once, not at every launch."""
    info = entry.compat.get(ep.name)
    if info is None:
        return "unknown", "the context records no compatibility string"
    cache = store.memo_dir / f"verdict-{entry.key}-{entry.entry_id or 'x'}-{env or 'x'}.json"
    try:
        data = json.loads(_fs.read_small(cache, 4096))
        if data.get("verdict") in _ANSWERS and isinstance(data.get("detail"), str):
            return data["verdict"], data["detail"]
    except (OSError, ValueError, RecursionError, AttributeError):
        pass
    answer, detail = ep.compatibility(info)
    try:
        _fs.atomic_write(cache, json.dumps({"verdict": answer, "detail": detail, "key": entry.key}).encode(), durable=False)
    except OSError:
        pass
    return answer, detail


def crash_problem(store: Store, entry: Entry, ep: ExecutionProvider | None, options: dict[str, str] | None,
                  *, act: bool) -> Reason | None:
    """A loader of ``entry`` died during its context load (its crash marker outlived it): was it the context?

    A probe load in a child process tells: killed or hung there too, the context is a killer
    (``crashed_during_load``); refused with an error, it does not load here (``load_failed``); loaded,
    the death was an external kill and the entry is kept, unless its loaders died :data:`MAX_DEATHS`
    times in a row. Where no child process can be started, the marker alone condemns it (the
    conservative answer). ``act`` (the loader) consumes the markers and counts the death; a read-only
    caller (explain, verify) only reports.
    """
    dead = dead_markers(store.markers_dir, entry.key)
    if not dead:
        return None
    if not _fs.can_write(store.markers_dir):
        # No loader on this device could have left a marker in a folder it cannot write: it came with a
        # read-only image. Probing it would start a child process at every launch, for nothing.
        log.debug("ignoring %d crash marker(s) of %s in a read-only cache", len(dead), entry.key[:12])
        return None
    from ._probe import probe  # a child process, only when a loader died: not on the hit path

    verdict, detail = ("unavailable", "no provider to probe with") if ep is None else probe(
        entry.context_path, ep.name, options or {})
    log.info("a loader of %s died during the context load; probe: %s (%s)", entry.key[:12], verdict, detail)
    if verdict == "loads":
        count = deaths(store.markers_dir, entry.key) + 1
        if act and consume(store.markers_dir, dead):
            count = note_death(store.markers_dir, entry.key)
        if count < MAX_DEATHS:
            return None
        return Reason("crashed_during_load", f"its loaders were killed {count} times in a row, though it loads "
                                             "in a fresh process; not loading it again")
    if act:
        consume(store.markers_dir, dead)
    if verdict == "fails":
        return Reason("load_failed", f"a loader died during the context load, and a probe load fails: {detail}")
    if verdict == "unavailable":
        return Reason("crashed_during_load", "a process died while loading this context (no probe possible here: "
                                             f"{detail}); not loading it again")
    return Reason("crashed_during_load", f"a process died while loading this context, and {detail}; not loading it again")


class ContentCheck:
    """Re-hash every artifact of ``entry`` on a thread, from construction until :meth:`result`."""

    def __init__(self, store: Store, entry: Entry) -> None:
        self._store = store
        self._entry = entry
        self._problem: Problem | None = None
        self._error: BaseException | None = None
        self._done = _thread.allocate_lock()
        self._done.acquire()
        # Not threading.Thread: its start() waits until the new thread has run, which costs a GIL
        # hand-over (measured 1.3 ms per hit); this returns at once and the hashing overlaps the session.
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._problem = self._store.check_digests(self._entry, only_changed=False)
        except BaseException as e:  # noqa: BLE001 - reported to the loader as a fault, never lost
            self._error = e
        finally:
            self._done.release()

    def result(self) -> Reason | None:
        """Wait for the digests; the reason the entry must not be served, or ``None`` when every byte matched."""
        with self._done:
            pass
        if self._error is not None:
            return Reason("artifact_unreadable", f"verifying {self._entry.path}: {type(self._error).__name__}: {self._error}")
        return Reason(self._problem.code, self._problem.message) if self._problem is not None else None
