"""The remote tier against a real S3 server (moto's server mode) on 127.0.0.1, with the real QNN compiler:
write-back from one machine, a remote hit on a fresh cache in a fresh process, tampered objects refused,
outages (server stopped, server hung) degrading to a local compile within the timeout."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3", reason="remote tier tests need the 'remote' extra: pip install -e '.[remote,test]'")
pytest.importorskip("moto.server", reason="remote tier tests need moto[server] (in the 'test' extra) for a local S3 server")

from conftest import QNN, SIGNING_KEY_ENV, hmac_sign, last_json, launch, run_python

import ctxcache
from ctxcache import RemoteTier, errors, models, pull, push

SECRET = "fleet-secret"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=0.5)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    name = "b" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
    s3.client().create_bucket(Bucket=name)
    return name


def providers() -> list[Any]:
    return [(QNN, models.qnn_htp_options())]


REMOTE_LAUNCH = """
import json, ctxcache
from ctxcache import models
from ctxcache import RemoteTier
cache = ctxcache.ContextCache({cache_dir!r}, tiers=[RemoteTier({url!r}, endpoint_url={endpoint!r}, signing_key={key!r})])
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
print(json.dumps({{"outcome": r.outcome, "tier": r.tier, "compile": r.timings.compile, "fetch": r.timings.fetch,
                   "out": out.ravel()[:64].tolist()}}))
"""


def remote_launch(cache_dir: Path, url: str, endpoint: str, model: Path, key: str | None) -> dict[str, Any]:
    code = REMOTE_LAUNCH.format(cache_dir=str(cache_dir), url=url, endpoint=endpoint, model=str(model), key=key)
    return last_json(run_python(code, env=CREDS).stdout)  # type: ignore[no-any-return]


def _seed(tmp_path: Path, s3: S3Server, bucket: str, model: Path, key: str | None = SECRET) -> tuple[ctxcache.LoadResult, RemoteTier]:
    """A "build machine" cache that compiles and writes back."""
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url, write_back=True, signing_key=key)
    cache = ctxcache.ContextCache(tmp_path / "builder", tiers=[tier])
    r = cache.load(model, providers=providers())
    assert r.outcome == "miss"
    assert tier.keys() == [r.key]
    return r, tier


def test_write_back_then_remote_hit_in_fresh_process(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path) -> None:
    first, _ = _seed(tmp_path, s3, bucket, conv_model)
    reference = launch(tmp_path / "builder", conv_model)
    r = remote_launch(tmp_path / "device", f"s3://{bucket}/team", s3.url, conv_model, SECRET)
    assert (r["outcome"], r["tier"], r["compile"]) == ("hit", "remote", 0.0)
    assert r["out"] == reference["out"]
    again = remote_launch(tmp_path / "device", f"s3://{bucket}/team", s3.url, conv_model, SECRET)
    assert (again["outcome"], again["tier"]) == ("hit", None)  # now local
    # Objects are laid out as documented, record last.
    names = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    base = f"team/v1/{first.key}/"
    assert {base + "record.json", base + "record.json.sig", base + "files/ctx.onnx", base + "files/ctx_qnn.bin",
            base + "files/manifest.json"} <= names


def _tamper(s3: S3Server, bucket: str, key: str, what: str) -> None:
    c = s3.client()
    base = f"team/v1/{key}/"
    if what in ("flip_bin", "flip_bin_and_record"):
        data = bytearray(c.get_object(Bucket=bucket, Key=base + "files/ctx_qnn.bin")["Body"].read())
        data[4096] ^= 0x01
        c.put_object(Bucket=bucket, Key=base + "files/ctx_qnn.bin", Body=bytes(data))
        if what == "flip_bin_and_record":
            rec = json.loads(c.get_object(Bucket=bucket, Key=base + "record.json")["Body"].read())
            rec["files"]["ctx_qnn.bin"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
            c.put_object(Bucket=bucket, Key=base + "record.json", Body=json.dumps(rec).encode())
    elif what == "bad_signature":
        raw = c.get_object(Bucket=bucket, Key=base + "record.json")["Body"].read()
        c.put_object(Bucket=bucket, Key=base + "record.json.sig", Body=hmac_sign(raw, b"wrong key"))
    elif what == "signature_deleted":
        c.delete_object(Bucket=bucket, Key=base + "record.json.sig")


@pytest.mark.parametrize("what", ["flip_bin", "flip_bin_and_record", "bad_signature", "signature_deleted"])
def test_tampered_remote_is_refused_and_compiled(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path, what: str) -> None:
    first, _ = _seed(tmp_path, s3, bucket, conv_model)
    _tamper(s3, bucket, first.key, what)
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url, signing_key=SECRET)
    cache = ctxcache.ContextCache(tmp_path / "device", tiers=[tier])
    r = cache.load(conv_model, providers=providers())
    assert (r.outcome, r.tier) == ("miss", None)
    assert r.timings.compile > 0
    assert "origin" not in json.loads((r.entry_path / "manifest.json").read_text())  # type: ignore[operator]


def test_tampered_remote_without_key_caught_by_digest(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path) -> None:
    first, _ = _seed(tmp_path, s3, bucket, conv_model, key=None)
    _tamper(s3, bucket, first.key, "flip_bin")
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url)
    strict = ctxcache.ContextCache(tmp_path / "strict", tiers=[tier], strict=True)
    with pytest.raises(errors.CacheFaultError) as e:
        strict.load(conv_model, providers=providers())
    assert e.value.code == "tier_digest"
    assert ctxcache.ContextCache(tmp_path / "device", tiers=[tier]).load(conv_model, providers=providers()).outcome == "miss"


def test_outage_server_stopped(tmp_path: Path, conv_model: Path, conv_model_b: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = S3Server()
    server.client().create_bucket(Bucket="fleet")
    _seed(tmp_path, server, "fleet", conv_model)
    server.stop()
    tier = RemoteTier("s3://fleet/team", endpoint_url=server.url, timeout=1.0, write_back=True)
    cache = ctxcache.ContextCache(tmp_path / "device", tiers=[tier])
    with caplog.at_level("WARNING", logger="ctxcache"):
        r = cache.load(conv_model, providers=providers())
    assert r.outcome == "miss"
    # Connection refused is immediate; the bound leaves room for boto3's client set-up on a loaded machine.
    assert r.timings.fetch < 4.0
    assert any("tier_unreachable" in rec.getMessage() for rec in caplog.records)
    # The outage is remembered: the next miss does not wait for the dead server again.
    r2 = cache.load(conv_model_b, providers=providers())
    assert r2.outcome == "miss" and r2.timings.fetch < 0.5


def test_outage_server_hung(tmp_path: Path, conv_model: Path) -> None:
    """A server that accepts connections and never answers: one attempt, bounded by the read timeout."""
    import threading

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:  # accept and hold every connection, never write a byte
        while True:
            try:
                conn, _ = hung.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        cache = ctxcache.ContextCache(tmp_path / "c", tiers=[RemoteTier("s3://x/y", endpoint_url=url, timeout=0.5)])
        r = cache.load(conv_model, providers=providers())
        assert r.outcome == "miss"
        assert r.timings.fetch < 5.0, r.timings  # 0.5 s read timeout + client set-up
        assert len(held) == 1  # no retries: boto3's default would try again with backoff
    finally:
        hung.close()
        for conn in held:
            conn.close()


def test_push_and_pull(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path, conv_model_b: Path) -> None:
    src = ctxcache.ContextCache(tmp_path / "src")
    a = src.load(conv_model, providers=providers())
    b = src.load(conv_model_b, providers=providers())
    tier = RemoteTier(f"s3://{bucket}/p", endpoint_url=s3.url, signing_key=SECRET)
    keys = [str(a.key), str(b.key)]
    assert push(src, tier, keys=keys).results == {a.key: "pushed", b.key: "pushed"}
    assert push(src, tier, keys=keys).results == {a.key: "present", b.key: "present"}
    dst = ctxcache.ContextCache(tmp_path / "dst")
    assert pull(dst, tier, [str(a.key)[:10]]).installed == (a.key,)
    res = pull(dst, tier)
    assert (res.present, res.installed, res.refused) == ((a.key,), (b.key,), {})
    r = launch(tmp_path / "dst", conv_model_b)
    assert r["outcome"] == "hit"


def test_cli_push_pull(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctxcache.cli import main

    src = ctxcache.ContextCache(tmp_path / "src")
    key = src.load(conv_model, providers=providers()).key
    keyfile = tmp_path / "k"
    keyfile.write_text(SECRET)
    url = f"s3://{bucket}/cli"
    common = ["--endpoint-url", s3.url, "--signing-key-file", str(keyfile), "--format", "json"]
    assert main(["push", url, "--cache-dir", str(tmp_path / "src"), "--model", str(conv_model), *common]) == 0
    assert json.loads(capsys.readouterr().out) == {key: "pushed"}
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst"), *common]) == 0
    assert json.loads(capsys.readouterr().out) == {key: "installed"}
    assert launch(tmp_path / "dst", conv_model)["outcome"] == "hit"
    # Pulling with another key: the record's signature does not match, the entry is refused (exit 1).
    keyfile.write_text("another")
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst2"), *common]) == 1
    assert "tier_signature" in json.loads(capsys.readouterr().out)[key]
    # An unreachable server: a one-line error, exit 1.
    assert main(["pull", "s3://x/y", "--endpoint-url", "http://127.0.0.1:9", "--timeout", "1",
                 "--cache-dir", str(tmp_path / "dst3")]) == 1
    assert "cannot list" in capsys.readouterr().err
