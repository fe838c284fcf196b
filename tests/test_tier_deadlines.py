"""No tier can hold a load without a bound (reliability guarantee 19).

- A real, slow HTTP server on 127.0.0.1 as the S3 endpoint: it sends its headers, then one byte a
  second for ten minutes (or dribbles the headers themselves). The socket timeout is per read, so only a
  deadline for the whole fetch (``RemoteTier(fetch_timeout=)``) ends it.
- Real FIFOs (``os.mkfifo``) where a tier's file belongs: ``record.json`` and an entry file in a
  ``file://`` store, ``component.json`` and a variant file in an ORT model package (ORT's own parser
  opens ``component.json`` before any signature check), a bundle archive.

Each load returns a working session on the real QNN provider well within a generous bound (the
servers would hold it for ten minutes; FIFOs for ever). Timings are bounds, never measurements.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN

import ctxcache
from ctxcache import models

PROVIDERS = [(QNN, models.qnn_htp_options())]
BOUND = 60.0  # seconds: generous against a 5 s fetch deadline; a held load would take 600 s or for ever
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class _Dribble(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stop: threading.Event
    mode: str
    requests: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dribble(self, data: bytes) -> None:
        deadline = time.monotonic() + 600
        for i in range(len(data)):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:
                return
            self.stop.wait(1.0)

    def _answer(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        if self.mode == "headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.wfile.flush()
            self._dribble(b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        if body:
            self._dribble(b"{" * 100000)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)


@pytest.fixture(params=["body", "headers"])
def slow_s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    stop = threading.Event()
    seen: list[str] = []
    handler = type("Handler", (_Dribble,), {"stop": stop, "mode": request.param, "requests": seen})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def _load_bounded(cache: ctxcache.ContextCache, model: Path) -> tuple[Any, float]:
    """The load on a thread, joined with BOUND: a held load fails the test instead of hanging it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["r"] = cache.load(model, providers=PROVIDERS)
        except BaseException as e:
            box["e"] = e

    start = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND)
    assert not t.is_alive(), f"the load did not return within {BOUND:.0f} s"
    if "e" in box:
        raise box["e"]
    return box["r"], time.monotonic() - start


def _works(r: Any) -> None:
    assert r.session.get_providers()[0] == QNN
    out = r.session.run(None, models.random_input(r.session))
    assert out and out[0].size > 0


def test_a_dribbling_s3_endpoint_cannot_hold_a_load(slow_s3: tuple[str, list[str]], tmp_path: Path,
                                                    conv_model: Path) -> None:
    url, seen = slow_s3
    remote = ctxcache.RemoteTier("s3://bucket/prefix", endpoint_url=url, require_signature=False, fetch_timeout=5)
    cache = ctxcache.ContextCache(tmp_path / "cache", tiers=[remote])
    r, _took = _load_bounded(cache, conv_model)
    assert seen, "the load never asked the slow server"
    assert (r.outcome, r.tier) == ("miss", None)  # compiled locally
    _works(r)


def test_the_fetch_deadline_is_a_documented_setting() -> None:
    assert ctxcache.RemoteTier("s3://bucket/p").fetch_timeout == 120.0
    assert ctxcache.RemoteTier("s3://bucket/p", fetch_timeout=7).fetch_timeout == 7.0
    with pytest.raises(ValueError):
        ctxcache.RemoteTier("s3://bucket/p", fetch_timeout=0)
    assert "fetch_timeout" in (ctxcache.RemoteTier.__doc__ or "")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, conv_model: Path) -> tuple[Path, str]:
    """A file:// store holding one real entry of conv_model (unsigned), and its key."""
    root = tmp_path_factory.mktemp("fifo-store")
    src = ctxcache.ContextCache(root / "src")
    r = src.load(conv_model, providers=PROVIDERS)
    assert r.outcome == "miss"
    store = root / "store"
    store.mkdir()
    result = ctxcache.push(src, ctxcache.RemoteTier(store.as_uri(), require_signature=False))
    assert list(result.results.values()) == ["pushed"], result
    return store, str(r.key)


def _fifo_at(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


@pytest.mark.parametrize("where", ["record.json", "files/ctx.onnx", "files/manifest.json"])
def test_a_fifo_in_a_file_store_cannot_hold_a_load(pushed: tuple[Path, str], where: str, tmp_path: Path,
                                                   conv_model: Path) -> None:
    store, key = pushed
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    target = copy / "v1" / key / where
    assert target.is_file()
    # The control: the intact store serves the entry.
    ok = ctxcache.ContextCache(tmp_path / "ok", tiers=[ctxcache.RemoteTier(copy.as_uri(), require_signature=False)])
    r, _ = _load_bounded(ok, conv_model)
    assert (r.outcome, r.tier) == ("hit", "remote")
    _fifo_at(target)
    cache = ctxcache.ContextCache(tmp_path / "cache", tiers=[ctxcache.RemoteTier(copy.as_uri(), require_signature=False)])
    r, _ = _load_bounded(cache, conv_model)
    assert (r.outcome, r.tier) == ("miss", None)
    _works(r)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, conv_model: Path) -> Path:
    root = tmp_path_factory.mktemp("fifo-package")
    src = ctxcache.ContextCache(root / "src")
    assert src.load(conv_model, providers=PROVIDERS).outcome == "miss"
    return ctxcache.export_model_package(src, root / "pkg").path


@pytest.mark.parametrize("where", ["component.json", "variant file", "link"])
def test_a_fifo_or_link_in_a_model_package_cannot_hold_a_load(package: Path, where: str, tmp_path: Path,
                                                              conv_model: Path) -> None:
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    ok = ctxcache.ContextCache(tmp_path / "ok", tiers=[ctxcache.ModelPackageTier(copy, require_signature=False)])
    r, _ = _load_bounded(ok, conv_model)
    assert (r.outcome, r.tier) == ("hit", "package")
    (component,) = copy.glob("*/component.json")
    if where == "component.json":
        _fifo_at(component)
    elif where == "variant file":
        (variant,) = [p for p in component.parent.iterdir() if p.is_dir()]
        _fifo_at(next(p for p in variant.iterdir() if p.suffix == ".bin"))
    else:
        body = component.read_bytes()
        outside = tmp_path / "elsewhere.json"
        outside.write_bytes(body)
        component.unlink()
        component.symlink_to(outside)
    cache = ctxcache.ContextCache(tmp_path / "cache", tiers=[ctxcache.ModelPackageTier(copy, require_signature=False)])
    r, _ = _load_bounded(cache, conv_model)
    assert (r.outcome, r.tier) == ("miss", None)
    _works(r)


def test_a_fifo_as_a_bundle_archive_cannot_hold_a_load(tmp_path: Path, conv_model: Path) -> None:
    archive = tmp_path / "app" / "bundle.tar.gz"
    archive.parent.mkdir()
    os.mkfifo(archive, 0o600)
    cache = ctxcache.ContextCache(tmp_path / "cache", tiers=[archive], trusted_dirs=[tmp_path / "app"])
    r, _ = _load_bounded(cache, conv_model)
    assert (r.outcome, r.tier) == ("miss", None)
    _works(r)
