"""``ctxcache.quiet_native_stdout()``: what native code writes to fd 1 inside the block goes to stderr (or
nowhere), the app's own stdout keeps exactly its own lines, fd 1 is put back on every way out.

Native writes are made the way QNN's simulator makes them: C's ``printf`` into C stdio's buffer (through
ctypes), which is flushed at exit when stdout is not a terminal. The real QNN line is checked by
tests/test_readme.py (README's recipe, stdout a pipe, a file and a terminal).
"""

from __future__ import annotations

import pytest
from _child import run_python

import ctxcache

APP = r"""
import ctypes, os, sys
import ctxcache
from _report import report
libc = ctypes.CDLL(None)
mode = sys.argv[1]
fd1 = os.fstat(1)
print("app: before", flush=True)
libc.printf(b"native: pending before\n")  # the app's own C output, still in C's buffer: stays on stdout
if mode == "raise":
    try:
        with ctxcache.quiet_native_stdout():
            libc.printf(b"native: in the block\n")
            raise RuntimeError("the load failed")
    except RuntimeError:
        pass
elif mode == "nested":
    with ctxcache.quiet_native_stdout():
        with ctxcache.quiet_native_stdout(to="devnull"):  # the outer redirection stands
            libc.printf(b"native: inner\n")
        libc.printf(b"native: in the block\n")
elif mode == "devnull":
    with ctxcache.quiet_native_stdout(to="devnull"):
        libc.printf(b"native: in the block\n")
else:
    with ctxcache.quiet_native_stdout():
        libc.printf(b"native: in the block\n")
after = os.fstat(1)
report((fd1.st_dev, fd1.st_ino) == (after.st_dev, after.st_ino))
print("app: after")
libc.printf(b"native: after the block\n")  # outside the block: stdout, as the app asked for nothing
"""


@pytest.mark.parametrize("mode", ["ok", "raise", "nested", "devnull"])
def test_native_output_in_the_block_leaves_stdout_and_fd1_comes_back(mode: str) -> None:
    # C stdio buffered as in a user's shell: PYTHONUNBUFFERED would make C's stdout unbuffered too.
    proc = run_python(APP, mode, env={"PYTHONUNBUFFERED": None})
    assert proc.result is True  # fd 1 is the same file again, also after an exception in the block
    lines = proc.stdout.splitlines()
    assert [line for line in lines if line.startswith("app:")] == ["app: before", "app: after"]
    assert "native: in the block" not in proc.stdout and "native: inner" not in proc.stdout
    assert "native: pending before" in lines and "native: after the block" in lines
    if mode == "devnull":
        assert "native: in the block" not in proc.stderr
    else:
        assert "native: in the block" in proc.stderr
    if mode == "nested":
        assert "native: inner" in proc.stderr  # the outer block's redirection stands until the last one ends


def test_a_bad_target_is_refused_before_fd1_is_touched() -> None:
    with pytest.raises(ValueError, match="stderr"), ctxcache.quiet_native_stdout(to="stdout"):  # type: ignore[arg-type]
        pass
