"""Shared fixtures: generated models, a fresh cache per test, QNN options, a subprocess runner, and
:class:`Layout`, the documented on-disk layout of a cache (README, "Where the cache lives") that tests
use to damage, plant and inspect files.

Everything runs against the real onnxruntime and the real onnxruntime-qnn HTP compiler + simulator.
Fault injection goes through the documented seams only: ``ctxcache._seams.hooks`` (compile, locked,
published, verified) and ``ctxcache._fs.ops`` (the OS calls Windows refuses for open files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _child import run_python

from ctxcache import models

__all__ = ["run_python"]  # tests import it from here, as before: children report through tests/_child.py

ROOT = Path(__file__).resolve().parent.parent
QNN = "QNNExecutionProvider"


class Layout:
    """Where a cache keeps what (layout ``v1``), from its root folder: the paths tests damage and inspect."""

    def __init__(self, root: Path | Any) -> None:
        self.base = Path(root) if isinstance(root, (str, os.PathLike)) else Path(root.root)  # a path or a ContextCache
        self.root = self.base / "v1"
        self.entries_dir = self.root / "entries"
        self.staging_dir = self.root / "staging"
        self.quarantine_dir = self.root / "quarantine"
        self.locks_dir = self.root / "locks"
        self.memo_dir = self.root / "memo"
        self.markers_dir = self.root / "markers"
        self.negative_dir = self.root / "negative"
        self.events_path = self.root / "events.log"

    def entry_path(self, key: str | None) -> Path:
        assert key is not None
        return self.entries_dir / key

    def lock_path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.entries_dir.iterdir()) if self.entries_dir.is_dir() else []

    def ensure(self) -> None:
        """Create the folders as the library does (owner-only), so a test can plant files before a load."""
        for d in (self.base, self.root, self.entries_dir, self.staging_dir, self.quarantine_dir, self.locks_dir,
                  self.memo_dir, self.markers_dir, self.negative_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def remember_failure(self, key: str, code: str, message: str) -> None:
        """What the negative cache records (``negative/<key>.json``)."""
        import time

        self.ensure()
        (self.negative_dir / f"{key}.json").write_text(json.dumps({"code": code, "message": message, "time": time.time()}))

    def new_staging(self, key: str, pid: int | None = None) -> Path:
        """A staging folder as a compile in process ``pid`` (default: this one) names it."""
        self.ensure()
        path = self.staging_dir / f"{key}.{pid if pid is not None else os.getpid()}.{os.urandom(4).hex()}"
        path.mkdir(mode=0o700)
        return path


#: The environment variable holding the HMAC key of bundles and remote records (README, "Tiers").
SIGNING_KEY_ENV = "CTXCACHE_SIGNING_KEY"


def hmac_sign(data: bytes, key: bytes) -> bytes:
    """A signature file's content as README documents it: ``hmac-sha256:<hex>`` (the tests' own forger)."""
    import hashlib
    import hmac

    return b"hmac-sha256:" + hmac.new(key, data, hashlib.sha256).hexdigest().encode()


#: Devices' trust (README, "Signatures and trust").
TRUSTED_KEYS_ENV = "CTXCACHE_TRUSTED_KEYS"
REVOKED_KEYS_ENV = "CTXCACHE_REVOKED_KEYS"


def ed25519_lines(data: bytes, key_files: list[Path], context: str) -> bytes:
    """Ed25519 signature lines as README documents them, made with ``cryptography`` directly (the tests'
    own signer, for re-signing what they tamper with): ``ed25519:<key id>:<base64>`` over
    ``b"ctxcache-signature-v1\\0" + context + b"\\0" + data``; key id = 16 hex of SHA-256(raw public key)."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    lines = []
    for path in key_files:
        key: Any = load_pem_private_key(Path(path).read_bytes(), password=None)
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        sig = key.sign(b"ctxcache-signature-v1\0" + context.encode() + b"\0" + data)
        lines.append(f"ed25519:{hashlib.sha256(raw).hexdigest()[:16]}:{base64.b64encode(sig).decode()}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three real Ed25519 keys made by ``ctxcache.generate_signing_key``: ``a`` and ``b`` (the vendor's,
    for rotation), ``evil`` (an attacker's own key). Each a ``GeneratedKey`` (path, public_key, key_id)."""
    import ctxcache

    d = tmp_path_factory.mktemp("keys")
    return {name: ctxcache.generate_signing_key(d / f"{name}.pem") for name in ("a", "b", "evil")}


def jit_outputs(model: Path) -> list[float]:
    """The first 64 values of the first output of a JIT session on the original model (plain ORT + QNN,
    no ctxcache), on the fixed input (seed 7): what every refused tier's fallback must also give."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = models.plain_qnn_session(model, so)
    return [float(x) for x in sess.run(None, models.random_input(sess, seed=7))[0].ravel()[:64]]


def first_outputs(result: Any) -> list[float]:
    return [float(x) for x in result.session.run(None, models.random_input(result.session, seed=7))[0].ravel()[:64]]


@contextmanager
def read_only_bind(src: Path, ro: Path) -> Iterator[Path]:
    """``src`` bind-mounted read-only at ``ro`` (root ignores permission bits, so a chmod proves nothing),
    unmounted after; the test skips, saying why, where this machine cannot mount or the mount takes writes."""
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True, text=True, check=False)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        try:
            (ro / "probe").write_text("x")
            pytest.skip("the read-only mount accepted a write")
        except OSError:
            pass
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True, check=False)


def layout(cache: Any) -> Layout:
    return Layout(cache)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A test must never touch the developer's real cache, nor inherit strict mode from the shell.
    monkeypatch.setenv("CTXCACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("CTXCACHE_STRICT", raising=False)
    for name in ("CTXCACHE_SIGNING_KEY", "CTXCACHE_TRUSTED_KEYS", "CTXCACHE_REVOKED_KEYS"):
        monkeypatch.delenv(name, raising=False)


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
def rel_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small models of one architecture, other weights (same-size artifacts: swaps go unnoticed by size)."""
    from ctxcache import models

    d = tmp_path_factory.mktemp("rel-models")
    return [models.conv_net(d / f"m{i}.onnx", layers=3, channels=16, seed=10 + i) for i in range(3)]


@pytest.fixture(scope="session")
def killer_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A QNN context that kills the process loading it, for real (SIGSEGV in session creation): a
    shared-weight context binary, which the x86 HTP simulator of onnxruntime-qnn 2.7 cannot load
    (tests/test_providers_qnn_sharing.py pins that fact). Returns ``(ctx.onnx, its .bin)``."""

    from test_providers_qnn_sharing import COMPILE

    d = tmp_path_factory.mktemp("killer")
    a = models.conv_net(d / "a.onnx", seed=1, size=32)
    b = models.conv_net(d / "b.onnx", seed=1, size=64)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE), str(d / "out"), "1", str(a), str(b)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "out" / "ctx_0.onnx", d / "out" / "ctx_0_qnn.bin"


@pytest.fixture(scope="session")
def external_model(model_dir: Path) -> Path:
    return models.conv_net(model_dir / "ext" / "conv_ext.onnx", layers=3, channels=32, seed=3, external_data=True)


def output_digest(result: Any) -> str:
    """A digest of the first output of ``result.session`` on the fixed random input (seed 7): outputs
    compare bit for bit across processes and sessions."""
    import numpy as np
    import xxhash

    out = result.session.run(None, models.random_input(result.session, seed=7))[0]
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(out).tobytes())


# A launch as an app would do it, in a fresh process: prints outcome, reason, outputs' checksum.
LAUNCH = """
import json, sys, numpy as np
import ctxcache
from _report import report
from ctxcache import models
cache = ctxcache.ContextCache({cache_dir!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
feeds = models.random_input(r.session, seed=7)
out = r.session.run(None, feeds)[0]
report({{"outcome": r.outcome, "reason": r.reason.code if r.reason else None, "key": r.key,
        "providers": r.providers, "sum": float(np.float64(out.astype(np.float64).sum())),
        "out": out.ravel()[:64].tolist()}})
"""


def launch(cache_dir: Path, model: Path, **kw: Any) -> dict[str, Any]:
    return run_python(LAUNCH.format(cache_dir=str(cache_dir), model=str(model)), **kw).result  # type: ignore[no-any-return]
