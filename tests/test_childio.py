"""ctxcache's own child processes (the crash probe) report on a channel native output cannot reach:
``ctxcache._childio``. The probe's verdict and detail must not depend on what native libraries print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxcache import _probe
from ctxcache._childio import child_code, read_result

NOISY = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.printf(b'{"error": "forged by native code"}\n')  # C stdio, flushed at exit: after everything else
libc.fflush(None)
libc.printf(b" # LIBNATIVE: No alternate configuration present\n")
os.write(1, b'{"error": "written to fd 1 directly"}\n')
print("python print", flush=True)
send_result({"error": "the real one"})
sys.exit(3)
"""


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_native_output_never_reaches_the_result(unbuffered: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.run([sys.executable, "-c", child_code(NOISY)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3
    assert read_result(proc.stdout) == {"error": "the real one"}, proc.stdout
    # It went somewhere a failure message can still quote: stderr.
    assert "forged by native code" in proc.stderr and "LIBNATIVE" in proc.stderr and "python print" in proc.stderr


@pytest.mark.parametrize("stdout", ["", "\n", "not json", '["a list"]', '{"a": 1}\n{"b": 2}\n'])
def test_no_result_or_a_malformed_one_is_none(stdout: str) -> None:
    assert read_result(stdout) is None


def test_a_probe_that_cannot_load_quotes_the_error_not_native_output(tmp_path: Path) -> None:
    """A context file that is not a model: the probe's child reports ORT's error; QNN's simulator line (on
    stdout at the child's exit) is not the detail."""
    bad = tmp_path / "ctx.onnx"
    bad.write_bytes(b"this is not an onnx model")
    from ctxcache import models

    verdict, detail = _probe.probe(bad, "QNNExecutionProvider", models.qnn_htp_options())
    assert verdict == "fails", detail
    assert "LIBNATIVE" not in detail and ("InvalidProtobuf" in detail or "protobuf" in detail.lower()), detail
