"""The remote tier against a real S3 server (moto's server mode) on 127.0.0.1, with the real QNN compiler:
write-back from one machine (records signed with a real Ed25519 key, plus an HMAC), a remote hit on a
fresh cache in a fresh process, tampered and poisoned objects refused (each with its reason, then a
local compile with the JIT reference's outputs), outages (server stopped, server hung) degrading to a
local compile within the timeout."""

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

from conftest import QNN, SIGNING_KEY_ENV, ed25519_lines, first_outputs, hmac_sign, jit_outputs, launch, run_python

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
cache = ctxcache.ContextCache({cache_dir!r}, tiers=[RemoteTier({url!r}, endpoint_url={endpoint!r}, signing_key={key!r})],
                              trusted_keys={trusted!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
from _report import report
report({{"outcome": r.outcome, "tier": r.tier, "compile": r.timings.compile, "fetch": r.timings.fetch,
         "out": out.ravel()[:64].tolist()}})
"""


def remote_launch(cache_dir: Path, url: str, endpoint: str, model: Path, key: str | None, trusted: list[str]) -> dict[str, Any]:
    code = REMOTE_LAUNCH.format(cache_dir=str(cache_dir), url=url, endpoint=endpoint, model=str(model), key=key,
                                trusted=trusted)
    return run_python(code, env=CREDS).result  # type: ignore[no-any-return]


@pytest.fixture
def fleet(keys: dict[str, Any]) -> dict[str, Any]:
    """The build farm's signing keys (Ed25519 key a and the fleet's HMAC secret) and what devices trust."""
    return {"sign": [keys["a"].path, SECRET], "trusted": [keys["a"].public_key], "keys": keys}


def _seed(tmp_path: Path, s3: S3Server, bucket: str, model: Path, key: Any = SECRET) -> tuple[ctxcache.LoadResult, RemoteTier]:
    """A "build machine" cache that compiles and writes back (signed with ``key``)."""
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url, write_back=True, signing_key=key)
    cache = ctxcache.ContextCache(tmp_path / "builder", tiers=[tier])
    r = cache.load(model, providers=providers())
    assert r.outcome == "miss"
    assert tier.keys() == [r.key]
    return r, tier


def test_write_back_then_remote_hit_in_fresh_process(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path,
                                                      fleet: dict[str, Any]) -> None:
    first, _ = _seed(tmp_path, s3, bucket, conv_model, fleet["sign"])
    reference = launch(tmp_path / "builder", conv_model)
    r = remote_launch(tmp_path / "device", f"s3://{bucket}/team", s3.url, conv_model, SECRET, fleet["trusted"])
    assert (r["outcome"], r["tier"], r["compile"]) == ("hit", "remote", 0.0)
    assert r["out"] == reference["out"]
    again = remote_launch(tmp_path / "device", f"s3://{bucket}/team", s3.url, conv_model, SECRET, fleet["trusted"])
    assert (again["outcome"], again["tier"]) == ("hit", None)  # now local
    # Objects are laid out as documented, record last.
    names = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    base = f"team/v1/{first.key}/"
    assert {base + "record.json", base + "record.json.sig", base + "record.json.ed25519", base + "files/ctx.onnx",
            base + "files/ctx_qnn.bin", base + "files/manifest.json"} <= names
    # A device that trusts nobody (the default) does not take the fleet's entry: a compile.
    r = remote_launch(tmp_path / "stranger", f"s3://{bucket}/team", s3.url, conv_model, SECRET, [])
    assert (r["outcome"], r["tier"], r["out"]) == ("miss", None, reference["out"])


def _get(c: Any, bucket: str, key: str) -> bytes:
    return c.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def _poison_bin(c: Any, bucket: str, base: str) -> dict[str, Any]:
    """Flip a byte of the binary and update its digest in the record (what a bucket writer can do)."""
    data = bytearray(_get(c, bucket, base + "files/ctx_qnn.bin"))
    data[4096] ^= 0x01
    c.put_object(Bucket=bucket, Key=base + "files/ctx_qnn.bin", Body=bytes(data))
    rec = json.loads(_get(c, bucket, base + "record.json"))
    rec["files"]["ctx_qnn.bin"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    return rec  # type: ignore[no-any-return]


def _tamper(s3: S3Server, bucket: str, key: str, what: str, fleet: dict[str, Any], other_key: str) -> None:
    c = s3.client()
    base = f"team/v1/{key}/"
    if what == "flip_bin":
        data = bytearray(_get(c, bucket, base + "files/ctx_qnn.bin"))
        data[4096] ^= 0x01
        c.put_object(Bucket=bucket, Key=base + "files/ctx_qnn.bin", Body=bytes(data))
    elif what == "flip_bin_and_record":
        c.put_object(Bucket=bucket, Key=base + "record.json", Body=json.dumps(_poison_bin(c, bucket, base)).encode())
    elif what == "bad_signature":
        raw = _get(c, bucket, base + "record.json")
        c.put_object(Bucket=bucket, Key=base + "record.json.sig", Body=hmac_sign(raw, b"wrong key"))
    elif what == "signature_deleted":
        c.delete_object(Bucket=bucket, Key=base + "record.json.sig")
    elif what in ("poisoned_signed_by_attacker", "poisoned_hmac_only"):
        raw = json.dumps(_poison_bin(c, bucket, base)).encode()
        c.put_object(Bucket=bucket, Key=base + "record.json.sig", Body=hmac_sign(raw, SECRET.encode()))  # the app's secret leaked
        attacker = ed25519_lines(raw, [fleet["keys"]["evil"].path], "remote-record") if what == "poisoned_signed_by_attacker" else b""
        c.put_object(Bucket=bucket, Key=base + "record.json.ed25519", Body=attacker)
        c.put_object(Bucket=bucket, Key=base + "record.json", Body=raw)
    elif what == "relabelled":
        # Another model's validly signed entry, copied under this key.
        other = f"team/v1/{other_key}/"
        for name in ("record.json", "record.json.sig", "record.json.ed25519", "files/manifest.json", "files/ctx.onnx",
                     "files/ctx_qnn.bin"):
            c.put_object(Bucket=bucket, Key=base + name, Body=_get(c, bucket, other + name))


TAMPERED = {"flip_bin": "tier_digest", "flip_bin_and_record": "tier_signature", "bad_signature": "tier_signature",
            "signature_deleted": "tier_signature", "poisoned_signed_by_attacker": "tier_untrusted",
            "poisoned_hmac_only": "tier_untrusted", "relabelled": "tier_record"}


@pytest.mark.parametrize("what", sorted(TAMPERED))
def test_tampered_remote_is_refused_and_compiled(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path,
                                                 conv_model_b: Path, what: str, fleet: dict[str, Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    first, tier_ = _seed(tmp_path, s3, bucket, conv_model, fleet["sign"])
    other = ctxcache.ContextCache(tmp_path / "builder", tiers=[tier_]).load(conv_model_b, providers=providers())
    _tamper(s3, bucket, str(first.key), what, fleet, str(other.key))
    # The poisoning attacker knows the app's HMAC secret: a device checking it still refuses.
    hmac_key = None if what in ("flip_bin", "poisoned_signed_by_attacker", "relabelled") else SECRET
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url, signing_key=hmac_key)
    cache = ctxcache.ContextCache(tmp_path / "device", tiers=[tier], trusted_keys=fleet["trusted"])
    with caplog.at_level("WARNING", logger="ctxcache"):
        r = cache.load(conv_model, providers=providers())
    assert (r.outcome, r.tier) == ("miss", None)
    assert r.timings.compile > 0
    assert any(f"({TAMPERED[what]}:" in rec.getMessage() for rec in caplog.records), caplog.text
    assert first_outputs(r) == jit_outputs(conv_model)
    assert "origin" not in json.loads((r.entry_path / "manifest.json").read_text())  # type: ignore[operator]


def test_unsigned_remote_needs_an_explicit_opt_out(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _seed(tmp_path, s3, bucket, conv_model, key=None)  # an office cache nobody signs
    with caplog.at_level("WARNING", logger="ctxcache"):
        r = ctxcache.ContextCache(tmp_path / "d1", tiers=[RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url)]
                                  ).load(conv_model, providers=providers())
    assert (r.outcome, r.tier) == ("miss", None) and "(tier_untrusted:" in caplog.text
    caplog.clear()
    url = f"s3://{bucket}/team"
    with caplog.at_level("WARNING", logger="ctxcache"):
        for n in range(2):
            tier = RemoteTier(url, endpoint_url=s3.url, require_signature=False)
            r = ctxcache.ContextCache(tmp_path / f"opt{n}", tiers=[tier]).load(conv_model, providers=providers())
            assert (r.outcome, r.tier) == ("hit", "remote")
    assert caplog.text.count("require_signature=False") == 1  # warned once per process


def test_tampered_remote_without_key_caught_by_digest(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path) -> None:
    first, _ = _seed(tmp_path, s3, bucket, conv_model, key=None)
    _tamper(s3, bucket, str(first.key), "flip_bin", {}, "")
    tier = RemoteTier(f"s3://{bucket}/team", endpoint_url=s3.url, require_signature=False)
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


def test_push_and_pull(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path, conv_model_b: Path,
                       fleet: dict[str, Any]) -> None:
    src = ctxcache.ContextCache(tmp_path / "src")
    a = src.load(conv_model, providers=providers())
    b = src.load(conv_model_b, providers=providers())
    tier = RemoteTier(f"s3://{bucket}/p", endpoint_url=s3.url)
    keys = [str(a.key), str(b.key)]
    assert push(src, tier, keys=keys, signing_key=fleet["keys"]["a"].path).results == {a.key: "pushed", b.key: "pushed"}
    assert push(src, tier, keys=keys).results == {a.key: "present", b.key: "present"}
    untrusting = pull(ctxcache.ContextCache(tmp_path / "nobody"), tier)
    assert not untrusting.installed and all(v.startswith("tier_untrusted") for v in untrusting.refused.values())
    dst = ctxcache.ContextCache(tmp_path / "dst", trusted_keys=fleet["trusted"])
    assert pull(dst, tier, [str(a.key)[:10]]).installed == (a.key,)
    res = pull(dst, tier)
    assert (res.present, res.installed, res.refused) == ((a.key,), (b.key,), {})
    r = launch(tmp_path / "dst", conv_model_b)
    assert r["outcome"] == "hit"


def test_cli_push_pull(s3: S3Server, bucket: str, tmp_path: Path, conv_model: Path, capsys: pytest.CaptureFixture[str],
                       fleet: dict[str, Any]) -> None:
    from ctxcache.cli import main

    src = ctxcache.ContextCache(tmp_path / "src")
    key = src.load(conv_model, providers=providers()).key
    hmac_file = tmp_path / "k"
    hmac_file.write_text(SECRET)
    url = f"s3://{bucket}/cli"
    common = ["--endpoint-url", s3.url, "--format", "json"]
    assert main(["push", url, "--cache-dir", str(tmp_path / "src"), "--model", str(conv_model), *common,
                 "--signing-key-file", str(fleet["keys"]["a"].path), "--signing-key-file", str(hmac_file)]) == 0
    assert json.loads(capsys.readouterr().out) == {key: "pushed"}
    trust = ["--trusted-key", fleet["trusted"][0], "--signing-key-file", str(hmac_file)]
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst"), *common, *trust]) == 0
    assert json.loads(capsys.readouterr().out) == {key: "installed"}
    assert launch(tmp_path / "dst", conv_model)["outcome"] == "hit"
    # Pulling with another HMAC secret: the record's HMAC does not match, the entry is refused (exit 1).
    hmac_file.write_text("another")
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst2"), *common, *trust]) == 1
    assert "tier_signature" in json.loads(capsys.readouterr().out)[key]
    # Trusting another Ed25519 key: refused as untrusted.
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst3"), *common, "--trusted-key",
                 fleet["keys"]["b"].public_key]) == 1
    assert json.loads(capsys.readouterr().out)[key].startswith("refused: tier_untrusted")
    # An unreachable server: a one-line error, exit 1.
    assert main(["pull", "s3://x/y", "--endpoint-url", "http://127.0.0.1:9", "--timeout", "1",
                 "--cache-dir", str(tmp_path / "dst3")]) == 1
    assert "cannot list" in capsys.readouterr().err
