"""Shared fixtures: generated models, a fresh cache per test, QNN options, and a subprocess runner.

Everything runs against the real onnxruntime and the real onnxruntime-qnn HTP compiler + simulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ctxcache import models

ROOT = Path(__file__).resolve().parent.parent
QNN = "QNNExecutionProvider"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A test must never touch the developer's real cache, nor inherit strict mode from the shell.
    monkeypatch.setenv("CTXCACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("CTXCACHE_STRICT", raising=False)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def qnn_options() -> dict[str, str]:
    return models.qnn_htp_options()


@pytest.fixture
def qnn_providers(qnn_options: dict[str, str]) -> list[Any]:
    return [(QNN, qnn_options)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def conv_model(model_dir: Path) -> Path:
    return models.conv_net(model_dir / "conv.onnx", layers=4, channels=16, seed=1)


@pytest.fixture(scope="session")
def conv_model_b(model_dir: Path) -> Path:
    """Same architecture as conv_model, other weights."""
    return models.conv_net(model_dir / "conv_b.onnx", layers=4, channels=16, seed=2)


@pytest.fixture(scope="session")
def external_model(model_dir: Path) -> Path:
    return models.conv_net(model_dir / "ext" / "conv_ext.onnx", layers=3, channels=32, seed=3, external_data=True)


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a real second process, as a second app launch is)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def last_json(stdout: str) -> Any:
    """The last line of a subprocess's stdout that is JSON (ORT and QNN print their own lines too)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout}")


# A launch as an app would do it, in a fresh process: prints outcome, reason, outputs' checksum.
LAUNCH = """
import json, sys, numpy as np
import ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({cache_dir!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
feeds = models.random_input(r.session, seed=7)
out = r.session.run(None, feeds)[0]
print(json.dumps({{"outcome": r.outcome, "reason": r.reason.code if r.reason else None, "key": r.key,
                   "providers": r.providers, "sum": float(np.float64(out.astype(np.float64).sum())),
                   "out": out.ravel()[:64].tolist()}}))
"""


def launch(cache_dir: Path, model: Path, **kw: Any) -> dict[str, Any]:
    proc = run_python(LAUNCH.format(cache_dir=str(cache_dir), model=str(model)), **kw)
    return last_json(proc.stdout)  # type: ignore[no-any-return]
