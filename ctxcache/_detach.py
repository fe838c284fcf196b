"""A warm-up in a process of its own: :func:`warm_detached`, which ``ctxcache warm --detach`` and the
``warm --jobs`` workers use.

The child is ``ctxcache warm --plan - --format json`` started through :mod:`ctxcache._spawn` (isolated:
nothing from the caller's working directory or a folder another user can write is importable), in a
safe working directory, with the plan on its standard input: every path in the plan is made absolute
here, so the child's working directory does not matter. Where no interpreter can be started (a frozen
app, an embedded runtime without an executable) it raises :class:`~ctxcache.errors.DetachError` with the
reason instead of starting a second copy of the app; the caller then warms in the foreground or refuses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._spawn import child_cwd, child_env, python_command, unavailable_reason
from .errors import DetachError

ProviderSpec = Any  # a name, or (name, options), as InferenceSession's providers= takes them


def _provider(spec: ProviderSpec) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"name": spec}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return {"name": spec[0], "options": {str(k): v for k, v in spec[1].items()}}
    raise TypeError(f"a provider is a name or a (name, options) pair, not {spec!r}")


class WarmProcess:
    """A warm-up running in a process of its own (what :func:`warm_detached` returns).

    ``pid`` and ``log`` (the file that receives its output; with ``--format json`` the last thing in it
    is the JSON summary ``ctxcache warm`` prints) stay valid after this process exits; :meth:`poll`,
    :meth:`wait`, :meth:`interrupt` and :meth:`result` are for a caller that stays to watch it.
    """

    def __init__(self, proc: Any, log: Path, command: list[str]) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        self.log = log
        self.command = tuple(command)

    def __repr__(self) -> str:
        return f"WarmProcess(pid={self.pid}, log={str(self.log)!r})"

    def poll(self) -> int | None:
        """The exit code, or ``None`` while it runs."""
        return self._proc.poll()  # type: ignore[no-any-return]

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end (``subprocess.TimeoutExpired`` after ``timeout``); the exit code."""
        return self._proc.wait(timeout)  # type: ignore[no-any-return]

    def interrupt(self) -> None:
        """Ask it to stop as Ctrl-C would (it removes its staging folder; no half entry is ever kept)."""
        if self._proc.poll() is not None:
            return
        try:
            if sys.platform == "win32":  # pragma: no cover - Windows
                self._proc.terminate()
            else:
                os.kill(self._proc.pid, signal.SIGINT)
        except OSError:
            pass

    def kill(self) -> None:
        try:
            self._proc.kill()
        except OSError:
            pass

    def result(self) -> dict[str, Any] | None:
        """The JSON summary the finished warm-up wrote at the end of its log, or ``None``."""
        try:
            with open(self.log, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return None
        start = text.rfind("\n{\n")
        start = start + 1 if start >= 0 else (0 if text.startswith("{") else -1)
        if start < 0:
            return None
        try:
            # raw_decode: native libraries may print after it (QNN's simulator flushes a line at exit).
            data, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


def warm_detached(models: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
                  providers: Sequence[ProviderSpec] | None = None, *,
                  targets: Sequence[tuple[str | os.PathLike[str], Sequence[ProviderSpec]]] = (),
                  cache_dir: str | os.PathLike[str] | None = None, app_name: str = "ctxcache",
                  app_author: str | None = None, extra_key: str | None = None, embed: bool = False,
                  jobs: int = 1, log: str | os.PathLike[str] | None = None, detach: bool = True,
                  verbose: int = 0, free_dims: Sequence[tuple[str, str, int]] = ()) -> WarmProcess:
    """Warm ``models`` for ``providers`` (and each ``(model, providers)`` of ``targets``) in a process of
    its own and return at once with its :class:`WarmProcess` (``pid``, ``log``).

    ``detach=True`` (the default) starts it in a session of its own, so it outlives this process and a
    Ctrl-C or hang-up of this one; ``detach=False`` keeps it in this process group (a worker of ours).
    ``providers=None`` warms the default configuration (``--preset qnn-htp``). Output goes to ``log``
    (default: a new file in the temp folder). Raises :class:`~ctxcache.errors.DetachError` where no
    process can be started here (frozen app, no interpreter), ``FileNotFoundError`` for a missing model.
    ``free_dims``: free-dimension overrides as ``(kind, identifier, size)``, kind ``"name"`` or
    ``"denotation"`` (as ``SessionOptions.add_free_dimension_override_by_*`` and ``--free-dim``).
    """
    import subprocess

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    groups: list[dict[str, Any]] = []
    default = None if providers is None else [_provider(p) for p in providers]
    if models:
        groups.append({"models": [os.path.abspath(os.fspath(m)) for m in models], "providers": default})
    for model, specs in targets:
        groups.append({"models": [os.path.abspath(os.fspath(model))], "providers": [_provider(p) for p in specs]})
    if not groups:
        raise ValueError("warm_detached: nothing to warm; give models or targets")
    for g in groups:
        for m in g["models"]:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"model not found: {m}")
        if g["providers"] is None:
            del g["providers"]
    cmd = python_command()
    why = unavailable_reason()
    if cmd is None or why is not None:
        raise DetachError(f"cannot start a warm-up process here: {why}; warm in this process instead "
                          "(ContextCache.warm, or `ctxcache warm` without --detach)", reason=why or "")
    argv = ["-m", "ctxcache", "warm", "--plan", "-", "--format", "json", "--jobs", str(jobs),
            "--app-name", app_name, *(["-v"] * verbose)]
    if cache_dir is not None:
        argv += ["--cache-dir", os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))]
    if app_author is not None:
        argv += ["--app-author", app_author]
    if extra_key is not None:
        argv += ["--extra-key", extra_key]
    if embed:
        argv.append("--embed")
    for kind, ident, size in free_dims:
        if kind not in ("name", "denotation"):
            raise ValueError(f"warm_detached: a free dimension is overridden by 'name' or 'denotation', not {kind!r}")
        argv += ["--free-dim" if kind == "name" else "--free-dim-denotation", f"{ident}={int(size)}"]
    if log is None:
        fd, name = tempfile.mkstemp(prefix="ctxcache-warm-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    else:
        log_path = Path(os.path.abspath(os.fspath(log)))
    kw: dict[str, Any] = {}
    if detach:
        if sys.platform == "win32":  # pragma: no cover - Windows
            kw["creationflags"] = 0x00000008 | 0x00000200  # DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP
        else:
            kw["start_new_session"] = True
    full = [*cmd, *argv]
    try:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=out, stderr=out, close_fds=True,
                                    env=child_env(), cwd=child_cwd(), **kw)
    except OSError as e:
        raise DetachError(f"cannot start a warm-up process: {e}", reason=str(e)) from None
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps({"targets": groups}).encode("utf-8"))
        proc.stdin.close()
    except OSError:
        pass  # it died at once: its log says why
    return WarmProcess(proc, log_path, full)
