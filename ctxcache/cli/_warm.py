"""``ctxcache warm``: precompile models x provider configurations before the user's first launch.

Compiles run in worker processes (``--jobs``), started with ``spawn``: a fork of a process that has
loaded ONNX Runtime's threads is unsafe, and a compiler that crashes (a segfault in a native SDK) must
cost one model, not the whole warm-up. Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole
process group); the parent turns Ctrl-C into SIGTERM, which a worker turns into KeyboardInterrupt so
the loader's ``finally`` removes its staging folder. A committed entry is one rename, so whatever the
moment of the interrupt, the cache holds whole entries or none.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
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
    preset,
    provider_name,
    providers_or_default,
    seconds,
)

_GLOB_CHARS = set("*?[")


# -- what to warm -----------------------------------------------------------------------------------
@dataclass
class Task:
    id: int
    model: str
    provider: ProviderConfig
    result: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    #: free-dimension overrides (--free-dim...), as (kind, identifier, size)
    dims: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{Path(self.model).name} [{self.provider.label()}]"


def expand_models(specs: list[str], base: Path | None = None, where: str = "") -> list[Path]:
    """Model files from paths, globs (``**`` recurses) and folders (every ``*.onnx`` below)."""
    found: list[Path] = []
    for spec in specs:
        p = Path(os.path.expanduser(spec))
        if base is not None and not p.is_absolute():
            p = base / p
        if _GLOB_CHARS & set(spec):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise UsageError(f"{where}no file matches {spec!r}")
            found += matches
        elif p.is_dir():
            matches = sorted(q for q in p.rglob("*.onnx") if q.is_file())
            if not matches:
                raise UsageError(f"{where}no .onnx file in folder {p}")
            found += matches
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"{where}model not found: {p}")
    unique: dict[str, Path] = {}
    for f in found:
        unique.setdefault(os.path.realpath(f), Path(os.path.abspath(f)))
    return list(unique.values())


def _provider_from_plan(item: Any, where: str) -> list[ProviderConfig]:
    """``{"name": "qnn", "options": {...}}``, ``{"preset": "qnn-htp"}``, or a bare name; ``options`` may be a
    list of option sets (one configuration each: the "x options" axis of a plan)."""
    if isinstance(item, str):
        return [ProviderConfig(provider_name(item))]
    if not isinstance(item, dict):
        raise UsageError(f"{where}: a provider is a name or a table with 'name' or 'preset', not {item!r}")
    unknown = set(item) - {"name", "preset", "options"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use name, preset, options")
    if "preset" in item:
        name, base = preset(str(item["preset"]))
        label = str(item["preset"])
    elif "name" in item:
        name, base, label = provider_name(str(item["name"])), {}, None
    else:
        raise UsageError(f"{where}: give 'name' or 'preset'")
    option_sets = item.get("options", {})
    if isinstance(option_sets, dict):
        option_sets = [option_sets]
    if not isinstance(option_sets, list) or not all(isinstance(o, dict) for o in option_sets):
        raise UsageError(f"{where}: 'options' is a table of KEY = VALUE or a list of such tables")
    return [ProviderConfig(name, {**base, **{str(k): v for k, v in o.items()}}, preset=label) for o in option_sets or [{}]]


def read_plan(path: Path) -> tuple[list[tuple[Path, ProviderConfig]], dict[str, Any]]:
    """Tasks and settings (``cache_dir``, ``jobs``) of a JSON or TOML plan file.

    Shape: ``{"models": [...], "providers": [...]}`` or ``{"targets": [{"models", "providers"}, ...]}``;
    paths are relative to the plan's folder.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise UsageError(f"{path}: TOML plans need Python 3.11+ (tomllib); write the plan as JSON") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the plan must be a table/object with 'models' and 'providers' or 'targets'")
    unknown = set(data) - {"models", "providers", "targets", "cache_dir", "jobs"}
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; use models, providers, targets, cache_dir, jobs")
    base = path.resolve().parent
    groups = data.get("targets", [])
    if not isinstance(groups, list):
        raise UsageError(f"{path}: 'targets' must be a list")
    if "models" in data or "providers" in data:
        groups = [{"models": data.get("models", []), "providers": data.get("providers")}, *groups]
    if not groups:
        raise UsageError(f"{path}: the plan lists no models")
    tasks: list[tuple[Path, ProviderConfig]] = []
    for i, g in enumerate(groups):
        where = f"{path.name}: " + (f"targets[{i}]" if "targets" in data else "")
        if not isinstance(g, dict) or not isinstance(g.get("models"), list) or not g["models"]:
            raise UsageError(f"{where} needs a non-empty 'models' list")
        models = expand_models([str(m) for m in g["models"]], base, where=f"{where} ")
        plist = g.get("providers")
        if plist is None:
            configs = providers_or_default(None)
        elif isinstance(plist, list) and plist:
            configs = [c for j, p in enumerate(plist) for c in _provider_from_plan(p, f"{where} providers[{j}]")]
        else:
            raise UsageError(f"{where} 'providers' must be a non-empty list")
        tasks += [(m, c) for m in models for c in configs]
    settings: dict[str, Any] = {}
    if "cache_dir" in data:
        settings["cache_dir"] = str(base / os.path.expanduser(str(data["cache_dir"])))
    if "jobs" in data:
        if not isinstance(data["jobs"], int) or data["jobs"] < 0:
            raise UsageError(f"{path}: 'jobs' must be a whole number >= 0")
        settings["jobs"] = data["jobs"]
    return tasks, settings


def _validate(configs: list[ProviderConfig]) -> dict[int, str]:
    """Check names and options before anything runs (bad input is exit 2); returns unavailable ones."""
    unavailable: dict[int, str] = {}
    for cfg in configs:
        (check,) = ctxcache.check_providers([cfg.as_tuple()])  # UnknownProviderError / ProviderOptionError -> usage
        if not check.compiles:
            raise UsageError(f"{check.name} compiles no context, so there is nothing to warm; pass e.g. --preset qnn-htp")
        if check.unavailable is not None:
            unavailable[id(cfg)] = check.unavailable
    return unavailable


# -- the worker (a separate process) ------------------------------------------------------------------
def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker(cache_kw: dict[str, Any], verbose: int, tasks: Any, results: Any) -> None:
    # Native code (the QNN SDK) writes chatter to fd 1: keep the parent's stdout for its own output
    # (--format json) and its terminal line clean; with -v it goes to stderr.
    try:
        if verbose:
            os.dup2(2, 1)
        else:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    import logging

    logger = logging.getLogger("ctxcache")
    if verbose:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"ctxcache[{os.getpid()}]: %(message)s"))
        logger.addHandler(h)
        logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())  # reasons travel back in the results, not as stray lines
        logger.propagate = False
    try:
        cache = ctxcache.ContextCache(**cache_kw)
        while True:
            item = tasks.get()
            if item is None:
                return
            task_id, model, name, options, dims = item
            results.put(("start", task_id, os.getpid()))
            results.put(("done", task_id, warm_one(cache, model, name, options, verbose, dims)))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


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
        items = ", ".join(f"{Path(t.model).name} {now - (t.started or now):.1f}s" for t in running[:4])
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


def run_tasks(tasks: list[Task], jobs: int, cache_kw: dict[str, Any], verbose: int, progress: Progress) -> bool:
    """Run ``tasks`` on ``jobs`` worker processes; ``False`` when interrupted (Ctrl-C). Where processes
    cannot be started with queues between them (Android has no ``sem_open``; a frozen app), serially."""
    try:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        todo = ctx.Queue()
        results = ctx.Queue()
    except (ImportError, OSError, NotImplementedError) as e:
        err(f"ctxcache warm: cannot run parallel jobs here ({type(e).__name__}: {e}); warming serially in this process")
        return run_serially(tasks, cache_kw, verbose, progress)
    for t in tasks:
        todo.put((t.id, t.model, t.provider.name, dict(t.provider.options), t.dims))
    by_id = {t.id: t for t in tasks}
    n = max(1, min(jobs, len(tasks)))
    for _ in range(n):
        todo.put(None)

    def spawn() -> Any:
        p = ctx.Process(target=_worker, args=(cache_kw, verbose, todo, results), daemon=True)
        # Started with SIGINT ignored, a worker is born ignoring it (exec keeps SIG_IGN, and Python then
        # installs no KeyboardInterrupt handler): a Ctrl-C during its start-up cannot print a traceback.
        try:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: signals are not ours to change
            old = None
        try:
            p.start()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        return p

    procs = [spawn() for _ in range(n)]
    running: dict[int, int] = {}  # pid -> task id
    finished: set[int] = set()
    respawns = 0
    try:
        while len(finished) < len(tasks):
            try:
                msg = results.get(timeout=0.25)
            except queue.Empty:
                for p in list(procs):
                    if p.is_alive() or p.exitcode is None:
                        continue
                    procs.remove(p)
                    tid = running.pop(p.pid or -1, None)
                    if tid is not None and tid not in finished:
                        t = by_id[tid]
                        t.result = {"status": "failed", "outcome": None, "key": None, "compile_seconds": 0.0,
                                    "reason": f"the compiling process died (exit code {p.exitcode})",
                                    "seconds": time.monotonic() - (t.started or time.monotonic())}
                        finished.add(tid)
                        progress.finished(t)
                        if respawns < len(tasks):
                            # Its end-of-work marker is still queued; a replacement picks the rest up.
                            respawns += 1
                            procs.append(spawn())
                if not procs and len(finished) < len(tasks):
                    for t in tasks:
                        if t.id not in finished:
                            t.result = {"status": "failed", "outcome": None, "key": None, "compile_seconds": 0.0,
                                        "reason": "no worker process left", "seconds": 0.0}
                            finished.add(t.id)
                            progress.finished(t)
                progress.tick([by_id[i] for i in running.values()])
                continue
            kind, tid, payload = msg
            if kind == "start":
                running[payload] = tid
                by_id[tid].started = time.monotonic()
            else:
                running = {pid: i for pid, i in running.items() if i != tid}
                by_id[tid].result = payload
                finished.add(tid)
                progress.finished(by_id[tid])
            progress.tick([by_id[i] for i in running.values()])
    except KeyboardInterrupt:
        progress.close()
        err("ctxcache: interrupted; stopping the compiles (no partial entry is kept)")
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 15
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(2)
        return False
    finally:
        progress.close()
        todo.cancel_join_thread()
        results.cancel_join_thread()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
    return True


def _detach(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this very warm-up (without --detach) in a process of its own session and return at once."""
    import subprocess
    import tempfile

    log_path = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="ctxcache-warm-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "ctxcache", *argv]
    kw: dict[str, Any] = {"start_new_session": True} if sys.platform != "win32" else {"creationflags": 0x00000008 | 0x00000200}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True, **kw)
    if args.format == "json":
        emit_json({"detached": True, "pid": proc.pid, "log": str(log_path)})
    else:
        out(f"warming in the background (pid {proc.pid}); output: {log_path}")
    return EXIT_OK


def free_dims(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``--free-dim NAME=VALUE`` / ``--free-dim-denotation DENOTATION=VALUE`` as (kind, identifier, size),
    in the order given: what warm_one sets on the SessionOptions of each compile."""
    out: list[tuple[str, str, int]] = []
    for flag, kind, items in (("--free-dim", "name", args.free_dim or []),
                              ("--free-dim-denotation", "denotation", args.free_dim_denotation or [])):
        for item in items:
            ident, sep, value = item.partition("=")
            if not sep or not ident.strip() or not value.strip().isdigit():
                raise UsageError(f"{flag} takes NAME=VALUE with a whole number, e.g. {flag} "
                                 f"{'batch' if kind == 'name' else 'DATA_BATCH'}=1; not {item!r}")
            out.append((kind, ident.strip(), int(value)))
    return out


def cmd_warm(args: argparse.Namespace) -> int:
    dims = free_dims(args)  # bad input is exit 2 now, before anything (or any detached process) starts
    if args.detach:
        # Validate here (bad input is exit 2 now, not a line in a log nobody reads), then go.
        argv = [a for a in args.argv if a != "--detach"]
        if not (args.models or args.plan):
            raise UsageError("nothing to warm: give model paths (files, globs or folders) or --plan FILE")
        if args.models:
            expand_models(args.models)
        return _detach(args, argv)
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
