"""``ctxcache warm``: precompile models x provider configurations before the user's first launch.

With several models, each compile runs in a process of its own (``ctxcache.warm_detached``, at most
``--jobs`` at once): a compiler that crashes (a segfault in a native SDK) costs one model, not the whole
warm-up, and the children start isolated, so nothing another user planted in the working directory is
imported (a ``multiprocessing`` spawn pool would import ``multiprocessing`` and the main module from it).
A terminal's Ctrl-C reaches the whole process group: each child turns it into KeyboardInterrupt, so the
loader's ``finally`` removes its staging folder; the parent passes a Ctrl-C that reached only it on to
them. A committed entry is one rename, so whatever the moment of the interrupt, the cache holds whole
entries or none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import ctxcache

from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ProviderConfig,
    UsageError,
    cache_dir_arg,
    emit_json,
    err,
    out,
    providers_or_default,
    seconds,
    shown,
)
from ._warmplan import Task, _validate, expand_models, free_dims, read_plan


# -- one model, in this process ------------------------------------------------------------------
def warm_one(cache: ctxcache.ContextCache, model: str, name: str, options: dict[str, Any], verbose: int = 0,
             dims: list[tuple[str, str, int]] | None = None) -> dict[str, Any]:
    """``cache.warm`` for one model and configuration, as a plain dict for the parent process. ``dims``:
    free-dimension overrides, set as the app sets them (so the key is the app's)."""
    import onnxruntime as ort

    start = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 0 if verbose > 1 else 3  # ORT's and QNN's own warnings are noise here
    for kind, ident, size in dims or []:
        if kind == "name":
            so.add_free_dimension_override_by_name(ident, size)
        else:
            so.add_free_dimension_override_by_denotation(ident, size)
    try:
        return cache.warm(model, providers=[(name, options)], sess_options=so).as_dict()
    except Exception as e:  # noqa: BLE001 - a worker reports, it never dies on one model
        bad_input = isinstance(e, (ctxcache.errors.InvalidModelError, ctxcache.errors.ModelNotFoundError))
        return {"model": model, "status": "failed", "outcome": None, "key": None, "compile_seconds": 0.0,
                "reason": f"{type(e).__name__}: {e}"[:2000], "seconds": time.perf_counter() - start, "replaced": None,
                "bad_input": bad_input}


# -- progress ---------------------------------------------------------------------------------------
class Progress:
    """Plain lines, one per finished model; on a terminal also a live line of what is compiling."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet  # --format json: stdout is for the summary only
        self.live = sys.stderr.isatty()
        self._shown = False

    def _clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self._shown = False

    def finished(self, task: Task) -> None:
        self.done += 1
        self._clear()
        if self.quiet:
            return
        r = task.result
        line = f"{r['status']:<9} {task.label}  {seconds(r.get('seconds'))}"
        if r.get("replaced"):
            line += f"  (replaced a damaged entry: {r['replaced']})"
        if r["status"] == "failed" and r.get("reason"):
            line += f"  {r['reason']}"
        out(line)

    def tick(self, running: list[Task]) -> None:
        if not self.live or (not running and self.done >= self.total):
            return
        now = time.monotonic()
        items = ", ".join(f"{shown(Path(t.model).name)} {now - (t.started or now):.1f}s" for t in running[:4])
        more = f" +{len(running) - 4}" if len(running) > 4 else ""
        text = f"[{self.done}/{self.total}] compiling: {items}{more}" if running else f"[{self.done}/{self.total}] starting"
        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except OSError:
            width = 0
        width = width if width >= 40 else 100  # a pty without a size reports 0 columns
        sys.stderr.write("\r\x1b[2K" + text[: max(20, width - 1)])
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        self._clear()


# -- the command ------------------------------------------------------------------------------------
def run_serially(tasks: list[Task], cache_kw: dict[str, Any], verbose: int, progress: Progress) -> bool:
    """Run ``tasks`` one after the other in this process; ``False`` when interrupted (Ctrl-C)."""
    cache = ctxcache.ContextCache(**cache_kw)
    try:
        for t in tasks:
            t.started = time.monotonic()
            t.result = warm_one(cache, t.model, t.provider.name, dict(t.provider.options), verbose, t.dims)
            progress.finished(t)
    except KeyboardInterrupt:
        progress.close()
        err("ctxcache: interrupted (no partial entry is kept)")
        return False
    return True


def _failed(reason: str, seconds_: float = 0.0) -> dict[str, Any]:
    return {"status": "failed", "outcome": None, "key": None, "compile_seconds": 0.0, "reason": reason,
            "seconds": seconds_}


def run_tasks(tasks: list[Task], jobs: int, cache_kw: dict[str, Any], verbose: int, progress: Progress) -> bool:
    """Run ``tasks`` on up to ``jobs`` processes at once; ``False`` when interrupted (Ctrl-C).

    Each task is one ``ctxcache.warm_detached`` child (isolated: nothing from the working directory or a
    folder another user can write is importable, unlike a multiprocessing pool, whose ``spawn`` children
    import ``multiprocessing`` and the main module with the working directory first on ``sys.path``), in
    this process group: a terminal's Ctrl-C reaches each child, which removes its staging folder. A
    compiler that crashes (a segfault in a native SDK) costs one model. Where no process can be started
    (a frozen app), serially in this process.
    """
    import shutil
    import tempfile

    if len(tasks) <= 1:
        return run_serially(tasks, cache_kw, verbose, progress)
    logs = Path(tempfile.mkdtemp(prefix="ctxcache-warm-jobs-"))
    todo = list(tasks)
    running: dict[int, tuple[Task, ctxcache.WarmProcess]] = {}

    def start(t: Task) -> bool:
        try:
            proc = ctxcache.warm_detached(targets=[(t.model, [t.provider.as_tuple()])], detach=False,
                                          log=logs / f"{t.id}.log", verbose=verbose, free_dims=t.dims,
                                          **{k: v for k, v in cache_kw.items() if v is not None})
        except ctxcache.errors.DetachError as e:
            err(f"ctxcache warm: cannot run parallel jobs here ({e.reason}); warming serially in this process")
            return False
        t.started = time.monotonic()
        running[t.id] = (t, proc)
        return True

    def finish(t: Task, proc: ctxcache.WarmProcess, code: int) -> None:
        summary = proc.result()
        results = summary.get("results") if summary else None
        if isinstance(results, list) and results and isinstance(results[0], dict):
            t.result = {k: v for k, v in results[0].items() if k not in ("model", "provider")}
        else:
            tail = ""
            try:
                tail = proc.log.read_text(errors="replace").strip()[-300:]
            except OSError:
                pass
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            t.result = _failed(f"the compiling process died ({why}){': ' + tail if tail else ''}",
                               time.monotonic() - (t.started or time.monotonic()))
        if verbose:
            try:
                sys.stderr.write(proc.log.read_text(errors="replace"))
            except OSError:
                pass
        progress.finished(t)

    serial: list[Task] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                if not start(todo[0]):
                    serial, todo = todo, []  # the running ones finish; the rest warm in this process
                    break
                todo.pop(0)
            for tid, (t, proc) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    del running[tid]
                    finish(t, proc, code)
            progress.tick([t for t, _ in running.values()])
            time.sleep(0.05)
    except KeyboardInterrupt:
        progress.close()
        err("ctxcache: interrupted; stopping the compiles (no partial entry is kept)")
        for _, proc in running.values():
            proc.interrupt()
        deadline = time.monotonic() + 15
        for _, proc in running.values():
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
        return False
    finally:
        progress.close()
        shutil.rmtree(logs, ignore_errors=True)
    return run_serially(serial, cache_kw, verbose, progress) if serial else True


def _detach(args: argparse.Namespace, pairs: list[tuple[Path, ProviderConfig]], settings: dict[str, Any],
            dims: list[tuple[str, str, int]]) -> int:
    """Start this very warm-up in a process of its own session (ctxcache.warm_detached) and return at once."""
    cache_dir = cache_dir_arg(args) or settings.get("cache_dir")
    jobs = args.jobs if args.jobs is not None else settings.get("jobs", 1)
    try:
        proc = ctxcache.warm_detached(targets=[(m, [c.as_tuple()]) for m, c in pairs], cache_dir=cache_dir,
                                      app_name=args.app_name, app_author=args.app_author, extra_key=args.extra_key,
                                      embed=args.embed, jobs=jobs, log=args.log, free_dims=dims)
    except ctxcache.errors.DetachError as e:
        err(f"ctxcache warm --detach: {e}")
        return EXIT_FAILED
    if args.format == "json":
        emit_json({"detached": True, "pid": proc.pid, "log": str(proc.log)})
    else:
        out(f"warming in the background (pid {proc.pid}); output: {proc.log}")
    return EXIT_OK


def cmd_warm(args: argparse.Namespace) -> int:
    dims = free_dims(args)  # bad input is exit 2 now, before anything (or any detached process) starts
    pairs: list[tuple[Path, ProviderConfig]] = []
    settings: dict[str, Any] = {}
    if args.plan:
        pairs, settings = read_plan(Path(args.plan))
    if args.models:
        configs = providers_or_default(args.providers)
        pairs += [(m, c) for m in expand_models(args.models) for c in configs]
    elif args.providers and not args.plan:
        raise UsageError("give model paths (files, globs or folders) or --plan FILE")
    if not pairs:
        raise UsageError("nothing to warm: give model paths (files, globs or folders) or --plan FILE")
    if args.detach:
        # Validated here (bad input is exit 2 now, not a line in a log nobody reads), then handed over.
        _validate([c for _, c in pairs])
        return _detach(args, pairs, settings, dims)

    # One task per (model, configuration); the same pair listed twice is warmed once.
    tasks: list[Task] = []
    seen: set[str] = set()
    for model, cfg in pairs:
        ident = json.dumps([os.path.realpath(model), cfg.name, sorted((k, str(v)) for k, v in cfg.options.items())])
        if ident not in seen:
            seen.add(ident)
            tasks.append(Task(len(tasks), str(model), cfg, dims=dims))
    unavailable = _validate([t.provider for t in tasks])

    cache_dir = cache_dir_arg(args) or settings.get("cache_dir")
    cache_kw: dict[str, Any] = {
        "cache_dir": cache_dir, "app_name": args.app_name, "app_author": args.app_author,
        "extra_key": args.extra_key, "embed": args.embed,
    }
    root = ctxcache.ContextCache(**cache_kw).root
    jobs = args.jobs if args.jobs is not None else settings.get("jobs", 1)
    if jobs < 0:
        raise UsageError(f"--jobs takes a whole number >= 0 (0: one per CPU), not {jobs}")
    if jobs == 0:
        jobs = os.cpu_count() or 1

    progress = Progress(len(tasks), quiet=args.format == "json")
    start = time.monotonic()
    runnable = []
    for t in tasks:
        why = unavailable.get(id(t.provider))
        if why is not None:
            t.result = {"status": "failed", "outcome": "bypass", "key": None, "compile_seconds": 0.0,
                        "reason": f"provider_unavailable: {why}", "seconds": 0.0}
            progress.finished(t)
        else:
            runnable.append(t)
    completed = run_tasks(runnable, jobs, cache_kw, args.verbose, progress) if runnable else True
    elapsed = time.monotonic() - start

    counts = {s: sum(1 for t in tasks if t.result.get("status") == s) for s in ("compiled", "cached", "failed")}
    if not completed:
        return EXIT_INTERRUPTED
    # A file that is not a model is bad input, as for every command (exit 2); the other models are still warmed.
    bad_input = any(t.result.get("bad_input") for t in tasks)
    code = EXIT_USAGE if bad_input else EXIT_FAILED if counts["failed"] else EXIT_OK
    if args.format == "json":
        emit_json({
            "cache_dir": str(root),
            "jobs": jobs,
            "total": len(tasks),
            **counts,
            "seconds": round(elapsed, 3),
            "exit_code": code,
            "results": [
                {"model": t.model, "provider": t.provider.as_dict(), **dict(t.result.items())}
                for t in tasks
            ],
        })
    else:
        out(
            f"warmed {counts['compiled'] + counts['cached']} of {len(tasks)}: {counts['compiled']} compiled, "
            f"{counts['cached']} already cached, {counts['failed']} failed, in {seconds(elapsed)} ({root})"
        )
    return code
