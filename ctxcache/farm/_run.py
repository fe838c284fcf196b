"""Running a plan's cells on an engine, with bounded retries, progress, and a summary.

Engines (one interface, :class:`Engine`): ``local`` runs each attempt in its own child process (no
server to start; a crash or a kill costs that attempt only), ``dask`` submits to a Dask distributed
scheduler (``pip install 'ctxcache[farm]'``). Either carries only a cell's small dict out and a
:class:`CellResult` back. A failed attempt (an error, a worker that died) is tried again up to
``retries`` times; the last reason is reported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._build import CellResult, Job, build_cell, remote_of
from ._devices import FarmError
from ._plan import Cell, mark_held

log = logging.getLogger("ctxcache")


class Engine(Protocol):
    """Runs one attempt of a cell; ``submit`` returns a future of a :class:`CellResult`."""

    name: str

    def submit(self, cell: dict[str, Any], job: Job) -> Future[CellResult]: ...

    def close(self) -> None: ...


class LocalEngine:
    """``jobs`` attempts at once, each in a fresh ``python -m ctxcache.farm._build`` process."""

    name = "local"

    def __init__(self, jobs: int = 1, timeout: float | None = None) -> None:
        self.jobs = max(1, jobs)
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="ctxcache-farm")

    def _attempt(self, cell: dict[str, Any], job: Job) -> CellResult:
        request = json.dumps({"cell": cell, "job": job.as_dict()})
        # An empty private working folder: `-m` puts the working folder first on sys.path.
        with tempfile.TemporaryDirectory(prefix="ctxcache-farm-") as cwd:
            try:
                proc = subprocess.run([sys.executable, "-m", "ctxcache.farm._build"], input=request, capture_output=True,
                                      text=True, cwd=cwd, timeout=self.timeout, check=False)
            except subprocess.TimeoutExpired:
                return CellResult(str(cell["id"]), str(cell["key"]), "failed", error=f"timed out after {self.timeout} s")
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("{"):
                try:
                    return CellResult(**json.loads(line))
                except (ValueError, TypeError):
                    break
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return CellResult(str(cell["id"]), str(cell["key"]), "failed",
                          error=f"worker process ended with code {proc.returncode} without a result {tail}".strip())

    def submit(self, cell: dict[str, Any], job: Job) -> Future[CellResult]:
        return self._pool.submit(self._attempt, cell, job)

    def close(self) -> None:
        # Cells not started yet are dropped (Ctrl-C); a running child finishes or dies with the terminal's signal.
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskEngine:
    """A Dask distributed scheduler at ``address`` (``tcp://host:port``). The cell runs in the worker
    process; a worker that dies fails the attempt (Dask's own ``allowed-failures`` first reschedules it)."""

    name = "dask"

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise FarmError("the dask engine needs Dask distributed: pip install 'ctxcache[farm]'", path=address) from None
        client: Any = Client  # distributed's API is untyped
        self._client: Any = client(address, timeout=timeout, set_as_default=False)
        self._n = 0
        # Dask releases (and may cancel) a task whose last future is garbage: hold each until it is done.
        self._live: dict[str, Any] = {}

    def submit(self, cell: dict[str, Any], job: Job) -> Future[CellResult]:
        self._n += 1
        # pure=False and a unique task key: a retry is a new task, never Dask's cached result of the old one.
        key = f"farm-{cell['id']}-{self._n}"
        dask_future: Any = self._client.submit(build_cell, cell, job, pure=False, key=key)
        self._live[key] = dask_future
        out: Future[CellResult] = Future()

        def relay(f: Any) -> None:
            try:
                out.set_result(f.result())
            except BaseException as e:  # noqa: BLE001 - KilledWorker, CancelledError, a lost scheduler: data
                out.set_exception(e)
            finally:
                self._live.pop(key, None)

        dask_future.add_done_callback(relay)
        return out

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class CellReport:
    """A cell's outcome after all its attempts."""

    cell: Cell
    result: CellResult
    attempts: int
    errors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.cell.id, "model": self.cell.model_name, "class": self.cell.device_class,
                "key": self.cell.key, "status": self.result.status, "size": self.result.size,
                "seconds": round(self.result.seconds, 3), "compile_seconds": round(self.result.compile_seconds, 3),
                "attempts": self.attempts, "error": self.result.error, "errors": list(self.errors),
                "worker": self.result.worker}


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    built: int
    present: int
    failed: int
    running: int
    retrying: int
    elapsed: float


@dataclass(frozen=True)
class RunResult:
    """What ``farm run`` did: one report per cell of the plan, in the plan's order."""

    cells: tuple[CellReport, ...] = ()
    seconds: float = 0.0
    engine: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(c.result.status == "failed" for c in self.cells)

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "seconds": round(self.seconds, 3), "counts": dict(self.counts),
                "ok": self.ok, "cells": [c.as_dict() for c in self.cells]}


def _attempts(engine: Engine, cells: Sequence[Cell], job: Job, retries: int,
              progress: Callable[[Progress], None] | None) -> Iterator[CellReport]:
    start = time.monotonic()
    pending: dict[Future[CellResult], tuple[Cell, int, tuple[str, ...]]] = {}
    counts = {"built": 0, "present": 0, "failed": 0}
    retrying = 0

    def tick() -> None:
        if progress is not None:
            progress(Progress(sum(counts.values()), len(cells), counts["built"], counts["present"], counts["failed"],
                              len(pending), retrying, time.monotonic() - start))

    for c in cells:
        pending[engine.submit(c.as_dict(), job)] = (c, 1, ())
    tick()
    while pending:
        finished, _ = wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED)
        for f in finished:
            cell, attempt, errors = pending.pop(f)
            try:
                res = f.result()
            except BaseException as e:  # noqa: BLE001 - the worker died or the engine lost the task: a failed attempt
                res = CellResult(cell.id, cell.key, "failed", error=f"{type(e).__name__}: {e}"[:500])
            if res.status == "failed":
                errors = (*errors, str(res.error))
                log.info("cell %s attempt %d failed: %s", cell.id, attempt, res.error)
                if attempt <= retries:
                    retrying += 1
                    pending[engine.submit(cell.as_dict(), job)] = (cell, attempt + 1, errors)
                    continue
            counts[res.status] += 1
            yield CellReport(cell, res, attempt, errors)
        tick()


def run(cells: Sequence[Cell], job: Job, *, engine: Engine, retries: int = 2,
        progress: Callable[[Progress], None] | None = None) -> RunResult:
    """Build every cell the store does not hold yet (asked again now: idempotent by key; a worker asks
    once more before compiling). Cells it holds are reported ``present`` without a worker."""
    if retries < 0:
        raise ValueError("retries must be >= 0")
    start = time.monotonic()
    by_id = {c.id: c for c in cells}
    checked = mark_held(by_id.values(), remote_of(job))
    reports = {c.id: CellReport(c, CellResult(c.id, c.key, "present"), 0) for c in checked if c.state == "done"}
    todo = [c for c in checked if c.state == "todo"]
    reports.update((r.cell.id, r) for r in _attempts(engine, todo, job, retries, progress))
    ordered = tuple(reports[cid] for cid in by_id)
    counts = {s: sum(1 for r in ordered if r.result.status == s) for s in ("built", "present", "failed")}
    return RunResult(ordered, time.monotonic() - start, engine.name, counts)


def make_engine(name: str, *, scheduler: str | None = None, jobs: int = 1, timeout: float | None = None) -> Engine:
    if name == "local":
        if scheduler:
            raise FarmError("--scheduler is for --engine dask", path="-")
        return LocalEngine(jobs or (os.cpu_count() or 1), timeout)
    if name == "dask":
        if not scheduler:
            raise FarmError("--engine dask needs --scheduler tcp://HOST:PORT (the address of a running Dask scheduler)",
                            path="-")
        return DaskEngine(scheduler)
    raise FarmError(f"unknown engine {name!r}: local or dask", path="-")
