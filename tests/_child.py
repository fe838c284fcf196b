"""The one way tests start a child process and hear back from it: a report channel of the child's own.

A child's stdout is not its own. Native libraries write to file descriptor 1 behind Python's back: the QNN
simulator's libnative prints ``# LIBNATIVE: ...`` through C stdio, which is flushed when the process exits
when stdout is not a terminal, so it lands AFTER the child's last line (and only in a plain shell: with
``PYTHONUNBUFFERED=1`` CPython makes C stdio unbuffered too and the line comes first). So "the last line of
stdout is the result" is true on one machine and false on the next.

Here a child reports through a file descriptor of its own (``pass_fds``) that the test opened on an
unlinked temporary file, and that no native library knows about. In the child::

    from _report import report      # tests/ is on the child's PYTHONPATH
    report({"outcome": r.outcome})  # one JSON value per call

In the test: ``run_python(code).result`` (the last report), ``.reports`` (all of them), or a started
:class:`Child` whose ``next_report`` waits for a handshake (``"READY"``) while the child runs. The child's
stdout and stderr stay what they are (pipes the test can read, or whatever the test passed), so a test of
what an app's stdout shows still sees exactly that.

The child's side is tests/_report.py, which imports nothing but ``json`` and ``os``: some children measure
what got imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _report import REPORT_FD

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# -- in the test ---------------------------------------------------------------------------------------
def child_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    """The test's environment, with this checkout's ctxcache and tests/ (for ``_report``) first on the path,
    then ``env``'s entries (a PYTHONPATH given there goes first; ``None`` removes a variable)."""
    full = dict(os.environ)
    extra = dict(env or {})
    path = [p for p in (extra.pop("PYTHONPATH", None), str(ROOT), str(TESTS), full.get("PYTHONPATH")) if p]
    for name, value in extra.items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    full["PYTHONPATH"] = os.pathsep.join(path)
    return full


@dataclass(frozen=True)
class Finished:
    """A child that has exited: its exit code, its stdout and stderr (``""`` when not piped), its reports."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    reports: list[Any] = field(default_factory=list)

    @property
    def result(self) -> Any:
        """The child's last report; an AssertionError showing its output when it made none."""
        if not self.reports:
            raise AssertionError(f"the child reported nothing (exit {self.returncode}): {self.argv[:3]}\n"
                                 f"STDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-3000:]}")
        return self.reports[-1]

    def check(self) -> Finished:
        """``self``, or an AssertionError with the output when the child did not exit 0."""
        if self.returncode != 0:
            raise AssertionError(f"child exited {self.returncode}: {self.argv[:3]}\n"
                                 f"STDOUT:\n{self.stdout[-3000:]}\nSTDERR:\n{self.stderr[-4000:]}")
        return self


class Child:
    """A started child process with a report channel. stdout and stderr are pipes unless given."""

    def __init__(self, argv: list[str], *, env: dict[str, str | None] | None = None, cwd: Path | str | None = None,
                 stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE,
                 start_new_session: bool = False) -> None:
        self.argv = argv
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked, closed by finish/kill: the channel's only name is its descriptor
        fd = self._file.fileno()
        # O_APPEND: the child's writes go to the end whatever this side's offset; this side reads with pread.
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        full_env = child_env(env)
        full_env[REPORT_FD] = str(fd)
        self.proc = subprocess.Popen(argv, env=full_env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=True,
                                     pass_fds=(fd,), start_new_session=start_new_session)
        self._seen = 0

    @classmethod
    def python(cls, code: str, *args: str, **kw: Any) -> Child:
        """``python -c code args...`` (``code`` dedented) with this interpreter."""
        return cls([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], **kw)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reports(self) -> list[Any]:
        """Every whole report so far (the child may still be writing the next one)."""
        data = b""
        while chunk := os.pread(self._file.fileno(), 1 << 20, len(data)):
            data += chunk
        return [json.loads(line) for line in data.split(b"\n")[:-1]]

    def next_report(self, timeout: float = 120) -> Any:
        """Wait for the child's next report (a handshake while it runs); an AssertionError if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.reports()
            if len(got) > self._seen:
                self._seen += 1
                return got[self._seen - 1]
            if self.proc.poll() is not None:
                if len(self.reports()) > self._seen:
                    continue
                raise AssertionError(f"the child exited ({self.proc.returncode}) before its next report: {self.argv[:3]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no report from the child within {timeout} s: {self.argv[:3]}")
            time.sleep(0.01)

    def finish(self, timeout: float = 300) -> Finished:
        """Wait for the child to exit (reading its pipes), then close the channel."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        try:
            return Finished(self.argv, self.proc.returncode, out or "", err or "", self.reports())
        finally:
            self._file.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (if still running) and reap; the pipes are drained and closed."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self._file.close()


def run(argv: list[str], *, timeout: float = 300, check: bool = False, **kw: Any) -> Finished:
    """Run a child to its end; ``check`` asserts exit 0."""
    done = Child(argv, **kw).finish(timeout)
    return done.check() if check else done


def run_python(code: str, *args: str, timeout: float = 300, check: bool = True, **kw: Any) -> Finished:
    """``python -c code args...`` to its end, a real second process (as a second app launch is)."""
    return run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], timeout=timeout, check=check, **kw)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (for markers and guards of a dead owner)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid
