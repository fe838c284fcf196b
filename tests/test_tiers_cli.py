"""``ctxcache export`` / ``import`` on the real QNN compiler: round trip, selection, signing via a key
file, exit codes for refused and hostile bundles. (push / pull are in test_tiers_remote.py.)"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN, SIGNING_KEY_ENV, launch

import ctxcache
from ctxcache import models
from ctxcache.cli import main


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory, conv_model: Path, conv_model_b: Path, keys: dict[str, Any]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("clisrc")
    cache = ctxcache.ContextCache(root / "cache")
    a = cache.load(conv_model, providers=[(QNN, models.qnn_htp_options())])
    b = cache.load(conv_model_b, providers=[(QNN, models.qnn_htp_options())])
    keyfile = root / "key.txt"
    keyfile.write_text("cli-secret\n")  # an HMAC secret, as existing users have them
    return {"dir": root / "cache", "a": a.key, "b": b.key, "keyfile": keyfile, "pem": keys["a"].path,
            "public": keys["a"].public_key, "key_id": keys["a"].key_id}


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_export_import_round_trip(src: dict[str, Any], tmp_path: Path, conv_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "app.tar.gz"
    rc = main(["export", str(bundle), "--cache-dir", str(src["dir"]), "--model", str(conv_model), "--preset", "qnn-htp",
               "--signing-key-file", str(src["pem"]), "--signing-key-file", str(src["keyfile"]), "--format", "json"])
    assert rc == 0
    res = _json(capsys)
    assert res["exported"] == [src["a"]] and res["signed"] is True  # only conv_model's entry
    assert res["signed_by"] == [src["key_id"], "hmac-sha256"]
    dest = tmp_path / "device"
    assert main(["import", str(bundle), "--cache-dir", str(dest), "--signing-key-file", str(src["keyfile"]),
                 "--trusted-key", src["public"], "--format", "json"]) == 0
    assert _json(capsys)["installed"] == [src["a"]]
    assert launch(dest, conv_model)["outcome"] == "hit"
    # The same bundle with the wrong key: refused as a whole, exit 1, nothing installed.
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the key")
    assert main(["import", str(bundle), "--cache-dir", str(tmp_path / "other"), "--signing-key-file", str(wrong),
                 "--trusted-key", src["public"]]) == 1
    assert "signature" in capsys.readouterr().err
    assert not ctxcache.ContextCache(tmp_path / "other").entries()


def test_export_selection_union_and_errors(src: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two provider configs select their union; only soc 60 exists, so this is both entries.
    rc = main(["export", str(tmp_path / "b"), "--cache-dir", str(src["dir"]), "-p", "qnn", "-o", "soc_model=60",
               "-p", "qnn", "-o", "soc_model=69", "--format", "json"])
    assert rc == 0 and sorted(_json(capsys)["exported"]) == sorted([src["a"], src["b"]])
    assert main(["export", str(tmp_path / "c"), "--cache-dir", str(src["dir"]), "-p", "qnn", "-o", "soc_model=69"]) == 1
    assert "no entry" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "b"), "--cache-dir", str(src["dir"])]) == 2  # exists: bad input, as everywhere
    assert "already exists" in capsys.readouterr().err


def test_import_reports_refused_entries(src: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "b"), "--cache-dir", str(src["dir"]), "--format", "json"]) == 0
    capsys.readouterr()
    binf = tmp_path / "b" / "entries" / src["b"] / "ctx_qnn.bin"
    data = bytearray(binf.read_bytes())
    data[100] ^= 0xFF
    binf.write_bytes(bytes(data))
    assert main(["import", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "dev"), "--format", "json", "--allow-unsigned"]) == 1
    res = _json(capsys)
    assert res["installed"] == [src["a"]] and list(res["refused"]) == [src["b"]]
    assert "tier_digest" in res["refused"][src["b"]]


def test_import_hostile_archive_exit_1(src: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "ok.tar"), "--cache-dir", str(src["dir"]), "--format", "json"]) == 0
    capsys.readouterr()
    evil = tmp_path / "evil.tar"
    shutil.copy(tmp_path / "ok.tar", evil)
    with tarfile.open(evil, "a") as tf:
        info = tarfile.TarInfo("../../escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        tf.addfile(info)
    assert main(["import", str(evil), "--cache-dir", str(tmp_path / "dev")]) == 1
    assert "escape" in capsys.readouterr().err  # the message names the hostile member
    assert not ctxcache.ContextCache(tmp_path / "dev").entries()


def test_export_and_import_model_package(src: dict[str, Any], tmp_path: Path, conv_model_b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkg = tmp_path / "pkg"
    assert main(["export", str(pkg), "--package", "--cache-dir", str(src["dir"]), "--model", str(conv_model_b),
                 "--format", "json"]) == 0
    assert _json(capsys)["format"] == "model-package"
    assert (pkg / "manifest.json").is_file()
    assert main(["import", str(pkg), "--cache-dir", str(tmp_path / "dev"), "--format", "json"]) == 1  # unsigned
    assert _json(capsys)["refused"][src["b"]].startswith("tier_untrusted")
    assert main(["import", str(pkg), "--cache-dir", str(tmp_path / "dev"), "--format", "json", "--allow-unsigned"]) == 0
    assert _json(capsys)["installed"] == [src["b"]]
    assert launch(tmp_path / "dev", conv_model_b)["outcome"] == "hit"


def test_explain_and_doctor_show_the_tiers_consulted(src: dict[str, Any], tmp_path: Path, conv_model: Path,
                                                     conv_model_b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "only_a.tar"
    assert main(["export", str(bundle), "--cache-dir", str(src["dir"]), "--model", str(conv_model),
                 "--signing-key-file", str(src["pem"])]) == 0
    capsys.readouterr()
    device = tmp_path / "device"
    trust = ["--trusted-key", src["public"]]
    # Locally a miss, but the bundle holds the exact key: the app's load would be a hit from the tier.
    assert main(["explain", str(conv_model), "--cache-dir", str(device), "--tier", str(bundle), "--format", "json", *trust]) == 0
    res = _json(capsys)
    # explain's verdict is the load's outcome: a hit (from the tier), and it says which tier; not here yet.
    assert res["verdict"] == "hit" and not res["hit"] and res["served_by_tier"] == f"bundle {bundle}"
    assert [(t["has"], t["signed_by"], t["trusted"]) for t in res["tiers"]] == [("exact", src["key_id"], True)]
    # A model the bundle does not hold: a compile, exit 1, and the tier line says so.
    assert main(["explain", str(conv_model_b), "--cache-dir", str(device), "--tier", str(bundle), *trust]) == 1
    text = capsys.readouterr().out
    assert "tier" in text and "no entry for this key" in text
    # Without --tier nothing about tiers is said or consulted.
    assert main(["explain", str(conv_model), "--cache-dir", str(device), "--format", "json"]) == 1
    assert _json(capsys)["tiers"] == []
    # The load agrees with explain: a hit from the bundle, no compile.
    r = ctxcache.ContextCache(device, tiers=[str(bundle)], trusted_keys=[src["public"]]).load(
        conv_model, providers=[(QNN, models.qnn_htp_options())])
    assert (r.outcome, r.tier, r.timings.compile) == ("hit", "bundle", 0)
    main(["doctor", "--cache-dir", str(device), "--tier", str(bundle), "--format", "json", *trust])
    tiers = _json(capsys)["tiers"]
    assert [t["kind"] for t in tiers] == ["bundle"] and str(bundle) in tiers[0]["tier"]
