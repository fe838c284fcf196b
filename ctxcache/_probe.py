"""A probe load: does this context kill the process that loads it? Asked in a child process.

A crash marker that outlived its loader says the loader died during the context load. That is not
proof that the context killed it: an ordinary external kill (a service stop, a force-stop, the
low-memory killer, a user logging off) lands there as well, and condemning a context that took
minutes to compile because of one is wrong. So before condemning, the context is loaded once in a
child process: killed by a signal (SIGSEGV, SIGABRT...) or hung, it is a killer; loaded, the death was
external (and the entry is kept); refused with an error, it does not load here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

from ._childio import child_code, read_result
from ._spawn import child_cwd, child_env, python_command

log = logging.getLogger("ctxcache")

Verdict = Literal["loads", "crashes", "fails", "hangs", "unavailable"]

#: A context load takes well under a second to a few seconds; one that takes this long is hung.
TIMEOUT = 120.0

_CHILD = child_code(r"""
import json, sys
name, ctx, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import onnxruntime as ort
from ctxcache import providers
from ctxcache._inputs import DISABLE_COMPILE
ep = providers.get(name)
so = ort.SessionOptions()
so.log_severity_level = 3
so.add_session_config_entry(DISABLE_COMPILE, "1")  # as a hit loads it: a context that "loads" by compiling does not
try:
    session = ep.session(ctx, so, ep.normalize_options(options), [])
except Exception as e:
    send_result({"error": f"{type(e).__name__}: {e}"[:2000]})
    sys.exit(3)
send_result({"providers": session.get_providers()})
""")


def probe(context: Path, ep_name: str, options: dict[str, str], *, timeout: float = TIMEOUT) -> tuple[Verdict, str]:
    """Load ``context`` on ``ep_name`` in a child process; the verdict and a one-line detail."""
    # Imported here: a probe runs only after a crash, and subprocess costs every launch ~3 ms to import.
    import signal
    import subprocess

    cmd = python_command()
    if cmd is None:
        return "unavailable", "no child process can be started here"
    try:
        # Isolated (python_command) and started in the context's own folder, never the app's working
        # directory: nothing another user planted there is imported.
        ctx = os.path.abspath(context)
        proc = subprocess.run([*cmd, "-c", _CHILD, ep_name, ctx, json.dumps(options)], capture_output=True,
                              text=True, timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL,
                              cwd=child_cwd(os.path.dirname(ctx)))
    except subprocess.TimeoutExpired:
        return "hangs", f"the probe load did not finish in {timeout:.0f} s"
    except OSError as e:
        return "unavailable", f"cannot start a probe process: {e}"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return "crashes", f"the probe load was killed by {name}"
    if proc.returncode == 0:
        return "loads", "the context loads in a fresh process"
    detail = str((read_result(proc.stdout) or {}).get("error", ""))
    return "fails", detail or f"the probe exited with {proc.returncode}: {proc.stderr.strip()[-300:]}"
