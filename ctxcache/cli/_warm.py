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
import glob
import json
import os
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
    shown,
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
        return f"{shown(Path(self.model).name)} [{self.provider.label()}]"


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
        # "-": the plan on standard input (how ctxcache.warm_detached hands a warm-up its work, all paths absolute)
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
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
    base = Path.cwd() if str(path) == "-" else path.resolve().parent
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
