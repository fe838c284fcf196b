"""`ctxcache tuf ...`: the key ceremony from the README on a file:// store, as a publisher would type it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tuf.ngclient", reason="TUF tests need the 'tuf' extra: pip install -e '.[tuf,test]'")

from ctxcache.cli import main


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main([*argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_ceremony_init_rotate_timestamp_remove_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    url, keys = store.as_uri(), str(tmp_path / "keys")
    common = ["--store", url, "--keys", keys]
    root = _json(capsys, ["tuf", "init", *common, "--threshold", "root=2"])["root"]
    assert json.loads(Path(str(root)).read_text())["signed"]["roles"]["root"]["threshold"] == 2
    shipped = tmp_path / "app-root.json"
    shipped.write_bytes(Path(str(root)).read_bytes())
    leaked = json.loads(Path(str(root)).read_text())["signed"]["roles"]["targets"]["keyids"][0]
    assert _json(capsys, ["tuf", "rotate", *common, "--role", "targets", "--revoke", leaked[:12]])["root_version"] == 2
    assert (tmp_path / "keys" / "targets-1.key.revoked").exists()
    assert _json(capsys, ["tuf", "timestamp", *common])["timestamp_version"] == 3
    assert _json(capsys, ["tuf", "remove", *common, "a" * 32])["targets_version"] == 3
    status = _json(capsys, ["tuf", "status", "--store", url, "--root", str(shipped), "--cache-dir", str(tmp_path / "c")])
    assert status["targets_version"] == 3  # the device followed root v1 -> v2 from the shipped v1
    # Already initialised: refused, exit 1, nothing changed.
    assert main(["tuf", "init", *common]) == 1
    assert "already has a TUF root" in capsys.readouterr().err
