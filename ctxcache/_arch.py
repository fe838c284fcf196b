"""What architecture this Python runs as, and whether the machine natively is another one.

Windows-on-ARM runs x64 (and ARM64EC) Pythons emulated: contexts they build record HTP arch 0 and are
UNSUPPORTED under a native ARM64 Python (onnxruntime/onnxruntime-qnn #701). The key separates them (its
``host`` part is the Python's own architecture); ``doctor`` says when the Python is emulated.
"""

from __future__ import annotations

import platform
import sys

_NAMES = {"x86_64": "amd64", "amd64": "amd64", "x64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def python_machine() -> str:
    """The architecture this interpreter was built for (what an emulated Python reports)."""
    m = platform.machine().lower()
    return _NAMES.get(m, m)


def native_machine() -> str | None:
    """The machine's own architecture where the OS tells it apart from the process's, else ``None``."""
    if sys.platform == "win32":  # pragma: no cover - Windows
        try:
            import ctypes
            from ctypes import wintypes

            process, native = wintypes.USHORT(), wintypes.USHORT()
            kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
            if kernel32.IsWow64Process2(kernel32.GetCurrentProcess(), ctypes.byref(process), ctypes.byref(native)):
                return {0x8664: "amd64", 0xAA64: "arm64", 0x14C: "x86"}.get(native.value)
        except (OSError, AttributeError):
            return None
        return None
    if sys.platform == "darwin":  # pragma: no cover - macOS: Rosetta 2
        try:
            import subprocess

            out = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5)
            return "arm64" if out.stdout.strip() == "1" else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def describe() -> dict[str, object]:
    native = native_machine()
    python = python_machine()
    return {"python": python, "native": native or python, "emulated": native is not None and native != python}
