"""Starting a ctxcache child process (a probe load, a background compile), or knowing that none can be.

A child runs this very ctxcache (its package folder is put first on ``PYTHONPATH``) with the running
interpreter. Where there is no interpreter to start, it says so and the caller falls back to doing the
work in process: a frozen app (PyInstaller, Briefcase: ``sys.executable`` is the app itself, which would
start a second copy of the app), an embedded interpreter without an executable, a platform whose sandbox
forbids ``fork``/``exec`` (Android apps without ``subprocess`` rights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def python_command() -> list[str] | None:
    """The command that starts a Python like this one, or ``None`` where none can be started."""
    if getattr(sys, "frozen", False):
        return None
    exe = sys.executable
    if not exe or not os.path.isfile(exe):
        return None
    return [exe]


def child_env() -> dict[str, str]:
    """This environment, with this ctxcache first on the path (installed or not)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def unavailable_reason() -> str | None:
    """Why no child process can be started here (``None`` when one can)."""
    if python_command() is not None:
        try:
            import subprocess  # noqa: F401 - some embedded Pythons ship without it
        except ImportError:
            return "the subprocess module is missing from this Python"
        return None
    if getattr(sys, "frozen", False):
        return "a frozen app (sys.executable is the app itself)"
    return "this Python has no interpreter executable to start"
