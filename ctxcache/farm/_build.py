"""One cell on a worker: compile into a private cache, check the key, publish to the remote store.

Runs in a worker process (a local child process, or a Dask worker). It returns only a small result
(key, size, seconds, error): the artifact goes from the worker straight to the store, through the
remote tier's one push (``ctxcache.push`` -> ``RemoteTier.push``: files first, the record last, so an
entry exists for readers only once complete; a worker killed mid-cell leaves no entry).

``python -m ctxcache.farm._build`` reads one job (JSON) on stdin and prints its result (JSON) last on
stdout: the local engine's child process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import ctxcache

from .. import _fingerprint, _key

Status = Literal["built", "present", "failed"]


@dataclass(frozen=True)
class Job:
    """What every cell of a run shares: where to publish, the signing key's file, the key settings.
    Small and picklable: it travels with each cell to its worker (the key itself never does)."""

    store: str
    endpoint_url: str | None = None
    signing_key: str | None = None
    embed: bool = False
    extra_key: str | None = None
    #: a cell whose cost is simulated (benchmarks of the scheduler): sleep this long instead of compiling
    simulate: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CellResult:
    """What a worker sends back for one attempt at a cell."""

    id: str
    key: str
    status: Status
    size: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    error: str | None = None
    worker: str = ""
    built_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_remotes: dict[Job, ctxcache.RemoteTier] = {}
_remotes_lock = threading.Lock()


def remote_of(job: Job) -> ctxcache.RemoteTier:
    """The store's tier, one per job and worker process: a new S3 client per cell cost ~0.3 s of each
    cell (measured, benchmarks/bench_farm.py)."""
    with _remotes_lock:
        tier = _remotes.get(job)
        if tier is None:
            # match="portable": a cell built on another host (its key differs in host parts only) counts as
            # held. retry_after=0: a farm retries a cell after an outage, it does not skip the store for a minute.
            tier = _remotes[job] = ctxcache.RemoteTier(job.store, endpoint_url=job.endpoint_url, match="portable",
                                                       retry_after=0.0,
                                                       signing_key=Path(job.signing_key) if job.signing_key else None)
        return tier


def _cannot_build(here: dict[str, Any], want: dict[str, Any]) -> str:
    diffs = [d for d in _fingerprint.diff(here, want) if d[0].split(".")[0] not in _key.HOST_PARTS]
    return ("this worker cannot build for the device class: " + ", ".join(_key.render(d) for d in diffs)
            + " (install the versions the devices run on the workers)")


def _env_mismatch(cache: ctxcache.ContextCache, cell: dict[str, Any]) -> str | None:
    """Before compiling: whether this worker's environment could give the cell's key at all."""
    here = cache.environment(str(cell["provider"]), dict(cell["options"]))
    if isinstance(here, str):
        return f"{cell['provider']} cannot run on this worker: {here}"
    want = {str(k): v for k, v in cell["parts"] if k in here}
    if {k: v for k, v in here.items() if k not in _key.HOST_PARTS} == {k: v for k, v in want.items()
                                                                         if k not in _key.HOST_PARTS}:
        return None
    return _cannot_build(here, want)


def _mismatch(cell: dict[str, Any], built: dict[str, Any]) -> str | None:
    """After compiling: why the entry would not serve the cell's devices (``None``: it would). The
    authority: the built entry's own key parts against the cell's."""
    want = {str(k): v for k, v in cell["parts"]}
    if built.get("model") != want.get("model"):
        return "the model file changed since the plan (its content digest differs); plan again"
    if _key.portable_key(built.items()) == _key.portable_key(want.items()):
        return None
    return _cannot_build(built, want)


def build_cell(cell: dict[str, Any], job: Job) -> CellResult:
    """Compile ``cell`` (a plan cell's dict) and publish it. Never raises: the error is in the result."""
    start = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    cid, key = str(cell["id"]), str(cell["key"])

    def done(status: Status, **kw: Any) -> CellResult:
        return CellResult(cid, key, status, seconds=time.perf_counter() - start, worker=worker, **kw)

    try:
        remote = remote_of(job)
        if remote.lookup(key, [tuple(p) for p in cell["parts"]]):
            return done("present")  # idempotent by key: done by an earlier run or another worker
        if job.simulate is not None:
            time.sleep(job.simulate)
            return done("built")
        with tempfile.TemporaryDirectory(prefix="ctxcache-farm-cell-") as tmp:
            cache = ctxcache.ContextCache(tmp, embed=job.embed, extra_key=job.extra_key)
            early = _env_mismatch(cache, cell)
            if early is not None:
                return done("failed", error=early)  # without spending a compile on it
            r = cache.warm(cell["model"], providers=[(cell["provider"], dict(cell["options"]))])
            if r.status == "failed" or r.key is None:
                return done("failed", error=f"compile failed: {r.reason}", compile_seconds=r.compile_seconds)
            (info,) = cache.select(keys=[r.key])
            why = _mismatch(cell, info.parts)
            if why is not None:
                return done("failed", error=why, compile_seconds=r.compile_seconds, built_key=r.key)
            pushed = ctxcache.push(cache, remote, keys=[r.key])
            status = pushed.results.get(r.key, "failed: not pushed")
            if status not in ("pushed", "present"):
                return done("failed", error=status, compile_seconds=r.compile_seconds, built_key=r.key)
            return done("built" if status == "pushed" else "present", size=info.size,
                        compile_seconds=r.compile_seconds, built_key=r.key)
    except Exception as e:  # noqa: BLE001 - a cell's failure is data for the driver (retried, reported), never a crash
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return done("failed", error=f"{type(e).__name__}: {text}"[:500])


def main() -> int:
    request = json.loads(sys.stdin.read())
    result = build_cell(request["cell"], Job(**request["job"]))
    # Last line of stdout: the QNN simulator writes its own lines to stdout too.
    sys.stdout.write("\n" + json.dumps(result.as_dict()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
