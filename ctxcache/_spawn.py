"""Starting a ctxcache child process (a probe load, a background compile, a warm-up worker or a detached
warm-up), or knowing that none can be.

A child must never run code another user planted. A plain ``python -c ...`` or ``python -m ...`` puts
the working directory first on ``sys.path``: a ``json.py``, ``ctxcache/__main__.py`` or
``multiprocessing/`` dropped into the app's working directory by another user would run as the app's
user. So every child starts isolated (``-I``: no working directory, no ``PYTHON*`` variables, no user
site) through a tiny bootstrap that puts back, explicitly, the folders the parent itself imports from:
its own ``sys.path`` without the working directory and without any folder that fails
:func:`ctxcache._fs.path_problem` (owned or writable by another user, or below such a folder). That
keeps venvs, editable installs, ``PYTHONPATH`` users and embedded runtimes with a custom ``sys.path``
working, while nothing from the working directory or a folder others can write is importable. Children
also get a safe working directory (:func:`child_cwd`) rather than the app's.

Where there is no interpreter to start, it says so and the caller does the work in process or refuses:
a frozen app (PyInstaller, Briefcase: ``sys.executable`` is the app itself, which would start a second
copy of the app), an embedded interpreter without an executable, a platform whose sandbox forbids
``fork``/``exec`` (Android apps without ``subprocess`` rights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import _fs

# Runs in the child before anything is imported from a path entry: argv[1] is the JSON list of folders,
# then "-m MODULE args..." or "-c CODE args...", as a plain interpreter would take them.
_BOOT = """\
import sys, json
_p = json.loads(sys.argv[1])
sys.path[:] = _p + [e for e in sys.path if e not in _p]
_mode, _target = sys.argv[2], sys.argv[3]
if _mode == "-m":
    import runpy
    sys.argv = [_target, *sys.argv[4:]]
    runpy.run_module(_target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *sys.argv[4:]]
    exec(compile(_target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def package_root() -> str:
    """The folder this ctxcache package lives in (what a child needs to import this very ctxcache)."""
    return str(Path(__file__).resolve().parent.parent)


def import_path() -> list[str]:
    """The folders a child may import from: this process's ``sys.path`` without the working directory
    (``""`` included) and without any folder that :func:`_fs.path_problem` refuses; this ctxcache's own
    folder first unless the parent already finds it on its path."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    root = package_root()
    out: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str) or not entry:
            continue
        full = os.path.abspath(entry)
        real = os.path.realpath(full)
        if full in out or (real == cwd and real != root) or _fs.path_problem(full) is not None:
            continue
        out.append(full)
    if root not in out and _fs.path_problem(root) is None:
        out.insert(0, root)  # found through a finder (editable install) or a custom importer: this copy, first
    return out


def python_command() -> list[str] | None:
    """The command that starts a Python like this one, isolated, or ``None`` where none can be started.

    It takes ``-m MODULE args`` or ``-c CODE args`` after it, as a plain interpreter does.
    """
    exe = _interpreter()
    return None if exe is None else [exe, *_isolation(), "-c", _BOOT, json.dumps(import_path())]


def _isolation() -> list[str]:
    """``-I`` (no working directory on the path, no ``PYTHON*`` variables, no user site). An embedded
    runtime that finds its standard library through ``$PYTHONHOME`` would not start under ``-I`` (it
    ignores that variable too): there ``-s`` plus ``-P`` (3.11+; no working directory on the path), with
    ``PYTHONPATH`` left out of the child's environment (:func:`child_env`) and a safe working directory."""
    if not os.environ.get("PYTHONHOME"):
        return ["-I"]
    return ["-s", "-P"] if sys.version_info >= (3, 11) else ["-s"]


def _interpreter() -> str | None:
    if getattr(sys, "frozen", False):
        return None
    exe = sys.executable
    return exe if exe and os.path.isfile(exe) else None


def child_env() -> dict[str, str]:
    """The environment of a child: this one without ``PYTHONPATH`` (the folders the child needs travel,
    filtered, in :func:`python_command`; ``-I`` ignores the variable anyway where it is used)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def child_cwd(preferred: str | os.PathLike[str] | None = None) -> str:
    """A working directory for a child that no other user controls: ``preferred`` (e.g. the cache root)
    when it passes :func:`_fs.path_problem`, else the file system root."""
    if preferred is not None:
        where = os.path.abspath(os.fspath(preferred))
        if _fs.path_problem(where) is None and os.path.isdir(where):
            return where
    return os.path.abspath(os.sep)


def unavailable_reason() -> str | None:
    """Why no child process can be started here (``None`` when one can)."""
    if _interpreter() is not None:
        try:
            import subprocess  # noqa: F401 - some embedded Pythons ship without it
        except ImportError:
            return "the subprocess module is missing from this Python"
        return None
    if getattr(sys, "frozen", False):
        return "a frozen app (sys.executable is the app itself)"
    return "this Python has no interpreter executable to start"
