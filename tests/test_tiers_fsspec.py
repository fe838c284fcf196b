"""The remote tier on an fsspec URL (a shared folder, ``file://``): write-back from one machine, a hit
in a fresh process on another cache, tampering refused, ``ctxcache pull`` from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fsspec", reason="fsspec URLs for the remote tier need fsspec (in the 'remote' and 'test' extras)")

from conftest import QNN, SIGNING_KEY_ENV, launch, layout, run_python

import ctxcache
from ctxcache import (
    RemoteTier,
    models,
)

SECRET = "share-secret"

LAUNCH = """
import json, ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({cache_dir!r}, tiers=[ctxcache.RemoteTier({url!r}, signing_key={key!r})],
                              trusted_keys={trusted!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
from _report import report
report({{"outcome": r.outcome, "tier": r.tier, "compile": r.timings.compile, "out": out.ravel()[:64].tolist()}})
"""


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)


@pytest.fixture
def signer(keys: dict[str, Any]) -> dict[str, Any]:
    """The office build machine signs with Ed25519 key a and the share's HMAC secret; desks trust key a."""
    return {"sign": [keys["a"].path, SECRET], "trusted": [keys["a"].public_key]}


def _seed(tmp_path: Path, model: Path, sign: Any) -> tuple[str, str]:
    url = (tmp_path / "share").as_uri()
    builder = ctxcache.ContextCache(tmp_path / "builder", tiers=[RemoteTier(url, write_back=True, signing_key=sign)])
    r = builder.load(model, providers=[(QNN, models.qnn_htp_options())])
    assert r.outcome == "miss"
    return url, r.key  # type: ignore[return-value]


def test_shared_folder_write_back_then_hit_in_fresh_process(tmp_path: Path, conv_model: Path, signer: dict[str, Any]) -> None:
    url, key = _seed(tmp_path, conv_model, signer["sign"])
    share = tmp_path / "share" / "v1" / key
    assert all((share / n).is_file() for n in ("record.json", "record.json.sig", "record.json.ed25519"))
    assert RemoteTier(url).keys() == [key]
    reference = launch(tmp_path / "builder", conv_model)
    code = LAUNCH.format(cache_dir=str(tmp_path / "device"), url=url, key=SECRET, model=str(conv_model),
                         trusted=signer["trusted"])
    r: dict[str, Any] = run_python(code).result
    assert (r["outcome"], r["tier"], r["compile"]) == ("hit", "remote", 0.0)
    assert r["out"] == reference["out"]


@pytest.mark.parametrize("damage", ["flip_bin", "record_edited_unsigned", "record_edited_ed25519_only"])
def test_tampered_share_is_refused(tmp_path: Path, conv_model: Path, damage: str, signer: dict[str, Any]) -> None:
    url, key = _seed(tmp_path, conv_model, signer["sign"])
    share = tmp_path / "share" / "v1" / key
    if damage == "flip_bin":
        b = share / "files" / "ctx_qnn.bin"
        data = bytearray(b.read_bytes())
        data[777] ^= 0x10
        b.write_bytes(bytes(data))
        tier = RemoteTier(url)  # no HMAC secret: the digest catches it
    else:
        rec = json.loads((share / "record.json").read_text())
        rec["model"]["name"] = "evil.onnx"
        (share / "record.json").write_text(json.dumps(rec))
        # The HMAC catches it, or without a secret the Ed25519 signature does.
        tier = RemoteTier(url, signing_key=SECRET if damage == "record_edited_unsigned" else None)
    r = ctxcache.ContextCache(tmp_path / "device", tiers=[tier], trusted_keys=signer["trusted"]).load(
        conv_model, providers=[(QNN, models.qnn_htp_options())])
    assert (r.outcome, r.tier) == ("miss", None)


def test_cli_pull_from_shared_folder(tmp_path: Path, conv_model: Path, capsys: pytest.CaptureFixture[str],
                                     signer: dict[str, Any]) -> None:
    from ctxcache.cli import main

    url, key = _seed(tmp_path, conv_model, signer["sign"])
    keyfile = tmp_path / "k"
    keyfile.write_text(SECRET)
    assert main(["pull", url, "--cache-dir", str(tmp_path / "dst"), "--signing-key-file", str(keyfile), "--format", "json",
                 "--trusted-key", signer["trusted"][0]]) == 0
    assert json.loads(capsys.readouterr().out) == {key: "installed"}
    assert launch(tmp_path / "dst", conv_model)["outcome"] == "hit"


def test_portable_match_from_a_build_farm_push(tmp_path: Path, conv_model: Path, signer: dict[str, Any]) -> None:
    """A build host pushes an entry whose key differs only in host/devices/ep_libraries; a device with
    match="portable" uses it (published under its own key), match="exact" does not."""
    import shutil


    providers = [(QNN, models.qnn_htp_options())]
    local = ctxcache.ContextCache(tmp_path / "local")
    real = local.load(conv_model, providers=providers)
    reference = real.session.run(None, models.random_input(real.session, seed=7))[0].ravel()[:64].tolist()
    # The same context as the build farm would have it: relabelled for another host.
    entry_dir = layout(local).entry_path(real.key)
    entry_manifest = json.loads((entry_dir / "manifest.json").read_text())
    parts = {p[0]: p[1] for p in entry_manifest["parts"]}
    parts.update(host="linux-x86_64-farm", devices=[{"type": "CPU", "vendor": "farm"}],
                 ep_libraries=dict.fromkeys(parts["ep_libraries"], "f" * 32))
    new_parts = [[label, parts[label]] for label, _ in entry_manifest["parts"]]
    farm_key = ctxcache.Fingerprint(tuple((p[0], p[1]) for p in new_parts)).key
    farm = ctxcache.ContextCache(tmp_path / "farm")
    layout(farm).ensure()
    shutil.copytree(entry_dir, layout(farm).entry_path(farm_key))
    mpath = layout(farm).entry_path(farm_key) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest.update(key=farm_key, parts=new_parts)
    mpath.write_text(json.dumps(manifest))
    url = (tmp_path / "share").as_uri()
    assert ctxcache.push(farm, RemoteTier(url, signing_key=signer["sign"]), keys=[farm_key]).results == {farm_key: "pushed"}

    trust = {"trusted_keys": signer["trusted"]}
    exact = ctxcache.ContextCache(tmp_path / "exact", tiers=[RemoteTier(url, signing_key=SECRET)], **trust)
    assert exact.load(conv_model, providers=providers).outcome == "miss"
    device = ctxcache.ContextCache(tmp_path / "device", tiers=[RemoteTier(url, signing_key=SECRET, match="portable")], **trust)
    r = device.load(conv_model, providers=providers)
    assert (r.outcome, r.tier, r.key) == ("hit", "remote", real.key)
    assert r.session.run(None, models.random_input(r.session, seed=7))[0].ravel()[:64].tolist() == reference
    origin = json.loads((tmp_path / "device" / "v1" / "entries" / real.key / "manifest.json").read_text())["origin"]
    assert origin["key"] == farm_key
