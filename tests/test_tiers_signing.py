"""Signed distribution (README, "Signatures and trust") with real Ed25519 keys, real bundles and packages
on disk and the real QNN compiler: what a device accepts, what it refuses and why (the refusal code in
the log, the strict-mode error, ``explain``), and that every refusal ends in a local compile whose
outputs are the JIT reference's."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    QNN,
    REVOKED_KEYS_ENV,
    TRUSTED_KEYS_ENV,
    ed25519_lines,
    first_outputs,
    hmac_sign,
    jit_outputs,
    run_python,
)

import ctxcache
from ctxcache import Bundle, errors, export_bundle, import_bundle, models

pytest.importorskip("cryptography", reason="signatures need the 'sign' extra: pip install -e '.[sign,test]'")

SECRET = "fleet-hmac-secret"
PROVIDERS = [(QNN, models.qnn_htp_options())]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, conv_model: Path, conv_model_b: Path) -> dict[str, Any]:
    """The build machine: a cache with models A and B compiled, the JIT references of both."""
    root = tmp_path_factory.mktemp("signbuild")
    cache = ctxcache.ContextCache(root / "cache")
    a = cache.load(conv_model, providers=PROVIDERS)
    b = cache.load(conv_model_b, providers=PROVIDERS)
    assert (a.outcome, b.outcome) == ("miss", "miss")
    ref_a, ref_b = jit_outputs(conv_model), jit_outputs(conv_model_b)
    assert ref_a != ref_b  # else a swap could not be seen in the outputs
    return {"root": root, "cache": cache, "a": a.key, "b": b.key, "ref_a": ref_a, "ref_b": ref_b}


def _bundle(build: dict[str, Any], dest: Path, signing_key: Any = None, models_: list[Path] | None = None) -> Path:
    export_bundle(build["cache"], dest, keys=None if models_ else [build["a"]], models=models_, signing_key=signing_key)
    return dest


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The codes of the tier refusals the library logged (``tier ... refused for KEY (code: why)``)."""
    return [m.group(1) for r in caplog.records if (m := re.search(r"refused for \w+ \((tier_\w+):", r.getMessage()))]


def _load(cache_dir: Path, tiers: list[Any], model: Path, caplog: pytest.LogCaptureFixture, **kw: Any) -> Any:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        return ctxcache.ContextCache(cache_dir, tiers=tiers, **kw).load(model, providers=PROVIDERS)


def _assert_refused_and_compiled(r: Any, caplog: pytest.LogCaptureFixture, code: str, reference: list[float]) -> None:
    assert refusals(caplog) == [code], [rec.getMessage() for rec in caplog.records]
    assert (r.outcome, r.tier) == ("miss", None)
    assert r.timings.compile > 0
    assert first_outputs(r) == reference  # the local compile serves the model's own outputs
    assert "origin" not in json.loads((r.entry_path / "manifest.json").read_text())


def _rewrite_index(bundle: Path, edit: Any) -> bytes:
    index = json.loads((bundle / "index.json").read_text())
    edit(index)
    raw = json.dumps(index, sort_keys=True, indent=1).encode()
    (bundle / "index.json").write_bytes(raw)
    return raw


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- accepted ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["tar.gz", "folder"])
def test_signed_bundle_is_used_anywhere_by_a_device_that_trusts_the_key(
        build: dict[str, Any], keys: dict[str, Any], tmp_path: Path, conv_model: Path, form: str,
        caplog: pytest.LogCaptureFixture) -> None:
    bundle = _bundle(build, tmp_path / ("b.tar.gz" if form == "tar.gz" else "b"), keys["a"].path)
    r = _load(tmp_path / "device", [bundle], conv_model, caplog, trusted_keys=[keys["a"].public_key])
    assert (r.outcome, r.tier, r.timings.compile) == ("hit", "bundle", 0.0)
    assert first_outputs(r) == build["ref_a"] and refusals(caplog) == []
    origin = json.loads((r.entry_path / "manifest.json").read_text())["origin"]
    assert (origin["signed_by"], origin["signature"]) == (keys["a"].key_id, "trusted")


def test_rotation_two_trusted_keys_either_signs(build: dict[str, Any], keys: dict[str, Any], tmp_path: Path,
                                                 conv_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Old key a and new key b both trusted: a bundle signed by either is used; one signed by both is used
    by a device that trusts only the new key (the overlap period of a rotation)."""
    trusted = [keys["a"].public_key, keys["b"].public_key]
    for n, signer in enumerate([keys["a"].path, keys["b"].path]):
        bundle = _bundle(build, tmp_path / f"b{n}", signer)
        r = _load(tmp_path / f"dev{n}", [bundle], conv_model, caplog, trusted_keys=trusted)
        assert (r.outcome, r.tier) == ("hit", "bundle") and first_outputs(r) == build["ref_a"]
    both = _bundle(build, tmp_path / "both", [keys["a"].path, keys["b"].path])
    assert len((both / "index.json.ed25519").read_text().splitlines()) == 2
    r = _load(tmp_path / "dev-new", [both], conv_model, caplog, trusted_keys=[keys["b"].public_key])
    assert (r.outcome, r.tier) == ("hit", "bundle")
    assert json.loads((r.entry_path / "manifest.json").read_text())["origin"]["signed_by"] == keys["b"].key_id


def test_trusted_keys_from_the_environment_in_a_fresh_process(build: dict[str, Any], keys: dict[str, Any],
                                                               tmp_path: Path, conv_model: Path) -> None:
    bundle = _bundle(build, tmp_path / "b.tar", keys["b"].path)
    code = f"""
import json, ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({str(tmp_path / 'device')!r}, tiers=[{str(bundle)!r}])
r = cache.load({str(conv_model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
from _report import report
report({{"outcome": r.outcome, "tier": r.tier, "out": [float(x) for x in out.ravel()[:64]]}})
"""
    env = {TRUSTED_KEYS_ENV: f"{keys['a'].public_key}, {keys['b'].public_key}"}
    r = run_python(code, env=env).result
    assert (r["outcome"], r["tier"], r["out"]) == ("hit", "bundle", build["ref_a"])
    # The same launch with key b revoked through the environment: refused, compiled, same outputs.
    env[REVOKED_KEYS_ENV] = keys["b"].key_id
    r = run_python(code.replace("device", "device2"), env=env).result
    assert (r["outcome"], r["tier"], r["out"]) == ("miss", None, build["ref_a"])


def test_unsigned_bundle_in_the_apps_own_folder(build: dict[str, Any], tmp_path: Path, conv_model: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    install = tmp_path / "opt" / "myapp"
    install.mkdir(parents=True)
    bundle = _bundle(build, install / "ctx-bundle")
    r = _load(tmp_path / "dev", [bundle], conv_model, caplog, trusted_dirs=[install])
    assert (r.outcome, r.tier) == ("hit", "bundle") and first_outputs(r) == build["ref_a"]
    # The same bundle one folder over: refused, compiled.
    elsewhere = shutil.copytree(bundle, tmp_path / "downloads" / "ctx-bundle")
    r = _load(tmp_path / "dev2", [elsewhere], conv_model, caplog, trusted_dirs=[install])
    _assert_refused_and_compiled(r, caplog, "tier_untrusted", build["ref_a"])
    # A link inside the app's folder that points out of it does not make the target the app's own.
    (install / "linked").symlink_to(elsewhere)
    r = _load(tmp_path / "dev3", [install / "linked"], conv_model, caplog, trusted_dirs=[install])
    _assert_refused_and_compiled(r, caplog, "tier_untrusted", build["ref_a"])
    # require_signature=True overrides the folder; require_signature=False is the app vouching for any path.
    r = _load(tmp_path / "dev4", [Bundle(bundle, require_signature=True)], conv_model, caplog, trusted_dirs=[install])
    _assert_refused_and_compiled(r, caplog, "tier_untrusted", build["ref_a"])
    r = _load(tmp_path / "dev5", [Bundle(elsewhere, require_signature=False)], conv_model, caplog)
    assert (r.outcome, r.tier) == ("hit", "bundle")


def test_hmac_keeps_working_for_existing_users(build: dict[str, Any], tmp_path: Path, conv_model: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """HMAC-only bundles: integrity between machines that share the secret, where the app vouches for
    the location (trusted_dirs or require_signature=False); a wrong secret is still refused."""
    bundle = _bundle(build, tmp_path / "own" / "b", SECRET)
    assert (bundle / "index.json.sig").exists() and not (bundle / "index.json.ed25519").exists()
    r = _load(tmp_path / "dev", [Bundle(bundle, signing_key=SECRET)], conv_model, caplog, trusted_dirs=[tmp_path / "own"])
    assert (r.outcome, r.tier) == ("hit", "bundle")
    r = _load(tmp_path / "dev2", [Bundle(bundle, signing_key="another secret", require_signature=False)], conv_model, caplog)
    _assert_refused_and_compiled(r, caplog, "tier_signature", build["ref_a"])


# -- refused ------------------------------------------------------------------------------------------------------
REFUSALS = {
    # damage: the code the device logs
    "unsigned": "tier_untrusted",
    "signature_garbled": "tier_signature",
    "signed_by_untrusted_key": "tier_untrusted",
    "signed_by_revoked_key": "tier_untrusted",
    "index_edited_after_signing": "tier_signature",
    "relabelled_and_resigned_by_trusted_key": "tier_record",
    "swapped_files_unsigned": "tier_untrusted",
    "swapped_files_resigned_by_attacker": "tier_untrusted",
    "downgraded_to_hmac_only": "tier_untrusted",
    "downgraded_to_unsigned": "tier_untrusted",
    "signature_for_another_place": "tier_signature",
}


def _swap_in_b(build: dict[str, Any], bundle: Path) -> bytes:
    """A's entry gets model B's context files, and the index B's digests for them: the attack the
    integrity finding describes (index and manifest name A, the binary is B's)."""
    a, b = build["a"], build["b"]
    src = build["cache"].root / "v1" / "entries" / b
    for name in ("ctx.onnx", "ctx_qnn.bin"):
        shutil.copyfile(src / name, bundle / "entries" / a / name)

    def edit(index: dict[str, Any]) -> None:
        for name in ("ctx.onnx", "ctx_qnn.bin"):
            f = bundle / "entries" / a / name
            index["entries"][a]["files"][name] = {"size": f.stat().st_size, "sha256": _sha(f)}

    return _rewrite_index(bundle, edit)


@pytest.mark.parametrize("damage", sorted(REFUSALS))
def test_refused_with_a_clear_reason_then_compiled(build: dict[str, Any], keys: dict[str, Any], tmp_path: Path,
                                                   conv_model: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    a = build["a"]
    bundle = _bundle(build, tmp_path / "bundle", [keys["a"].path, SECRET])
    sig = bundle / "index.json.ed25519"
    kw: dict[str, Any] = {"trusted_keys": [keys["a"].public_key, keys["b"].public_key]}
    hmac_key: str | None = None
    if damage == "unsigned":
        sig.unlink()
        (bundle / "index.json.sig").unlink()
    elif damage == "signature_garbled":
        text = sig.read_text()
        sig.write_text(text[:30] + ("A" if text[30] != "A" else "B") + text[31:])
    elif damage == "signed_by_untrusted_key":
        sig.write_bytes(ed25519_lines((bundle / "index.json").read_bytes(), [keys["evil"].path], "bundle-index"))
    elif damage == "signed_by_revoked_key":
        kw["revoked_keys"] = [keys["a"].key_id]
    elif damage == "index_edited_after_signing":
        _rewrite_index(bundle, lambda i: i["entries"][a]["model"].update(name="other.onnx"))
    elif damage == "relabelled_and_resigned_by_trusted_key":
        # A trusted signature does not make a record answer to parts it does not hash to.
        raw = _rewrite_index(bundle, lambda i: i["entries"][a]["parts"][1].__setitem__(1, "0" * 32))
        sig.write_bytes(ed25519_lines(raw, [keys["a"].path], "bundle-index"))
    elif damage == "swapped_files_unsigned":
        _swap_in_b(build, bundle)
        sig.unlink()
        (bundle / "index.json.sig").unlink()
    elif damage == "swapped_files_resigned_by_attacker":
        sig.write_bytes(ed25519_lines(_swap_in_b(build, bundle), [keys["evil"].path], "bundle-index"))
    elif damage == "downgraded_to_hmac_only":
        # Whoever unpacked an app has its HMAC secret: an HMAC they made is not a trusted signature.
        raw = _swap_in_b(build, bundle)
        (bundle / "index.json.sig").write_bytes(hmac_sign(raw, SECRET.encode()))
        sig.unlink()
        hmac_key = SECRET
    elif damage == "downgraded_to_unsigned":
        sig.unlink()
    elif damage == "signature_for_another_place":
        # A valid signature by a trusted key over the same bytes, made for a remote record.
        sig.write_bytes(ed25519_lines((bundle / "index.json").read_bytes(), [keys["a"].path], "remote-record"))
    r = _load(tmp_path / "device", [Bundle(bundle, signing_key=hmac_key)], conv_model, caplog, **kw)
    _assert_refused_and_compiled(r, caplog, REFUSALS[damage], build["ref_a"])
    with pytest.raises(errors.CacheFaultError) as e:  # strict mode (CI) raises the same code
        ctxcache.ContextCache(tmp_path / "strict", tiers=[Bundle(bundle, signing_key=hmac_key)], strict=True,
                              **kw).load(conv_model, providers=PROVIDERS)
    assert e.value.code == REFUSALS[damage]


def test_swapped_files_cannot_be_seen_without_a_signature(build: dict[str, Any], tmp_path: Path, conv_model: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Why unsigned bundles are refused outside the app's own folders: with the index's digests updated,
    nothing in the files shows that A's entry holds B's binary, and it serves B's outputs for A."""
    own = tmp_path / "own"
    bundle = _bundle(build, own / "bundle")
    _swap_in_b(build, bundle)
    r = _load(tmp_path / "device", [bundle], conv_model, caplog, trusted_dirs=[own])
    assert (r.outcome, r.tier) == ("hit", "bundle")
    assert first_outputs(r) == build["ref_b"] != build["ref_a"]  # the documented limit of an unsigned bundle


def test_import_admits_like_a_load(build: dict[str, Any], keys: dict[str, Any], tmp_path: Path) -> None:
    unsigned = _bundle(build, tmp_path / "u")
    res = import_bundle(ctxcache.ContextCache(tmp_path / "c1"), unsigned)
    assert not res.installed and res.refused[build["a"]].startswith("tier_untrusted")
    assert import_bundle(ctxcache.ContextCache(tmp_path / "c2"), unsigned, require_signature=False).installed == (build["a"],)
    signed = _bundle(build, tmp_path / "s.tar", keys["a"].path)
    trusted = ctxcache.ContextCache(tmp_path / "c3", trusted_keys=[keys["a"].public_key])
    assert import_bundle(trusted, signed).installed == (build["a"],)
    revoked = ctxcache.ContextCache(tmp_path / "c4", trusted_keys=[keys["a"].public_key], revoked_keys=[keys["a"].public_key])
    assert "revoked" in import_bundle(revoked, signed).refused[build["a"]]


# -- explain, doctor, CLI ----------------------------------------------------------------------------------------
def test_explain_and_doctor_say_who_signed_and_whether_trusted(build: dict[str, Any], keys: dict[str, Any],
                                                               tmp_path: Path, conv_model: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from ctxcache.cli import main

    good = _bundle(build, tmp_path / "good.tar", keys["a"].path)
    evil = _bundle(build, tmp_path / "evil.tar", keys["evil"].path)
    cache = ctxcache.ContextCache(tmp_path / "dev", tiers=[evil, good], trusted_keys=[keys["a"].public_key])
    ex = cache.explain(conv_model, providers=PROVIDERS)
    t_evil, t_good = ex.tiers
    assert (t_evil.has, t_evil.signed_by, t_evil.signature, t_evil.would_serve) == ("exact", keys["evil"].key_id, "untrusted", False)
    assert t_evil.refused is not None and t_evil.refused.startswith("tier_untrusted")
    assert (t_good.signed_by, t_good.signature, t_good.would_serve, t_good.refused) == (keys["a"].key_id, "trusted", True, None)
    assert ex.served_by is t_good
    # The load agrees: the untrusted bundle is skipped, the trusted one serves.
    r = cache.load(conv_model, providers=PROVIDERS)
    assert (r.outcome, r.tier) == ("hit", "bundle") and first_outputs(r) == build["ref_a"]

    argv = ["explain", str(conv_model), "--cache-dir", str(tmp_path / "dev2"), "--tier", str(evil), "--tier", str(good),
            "--trusted-key", keys["a"].public_key]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"signed by ed25519 key {keys['evil'].key_id} (untrusted); REFUSED tier_untrusted" in text
    assert f"signed by ed25519 key {keys['a'].key_id} (trusted)  -> a load would fetch it" in text
    assert main([*argv[:-2], "--format", "json"]) == 1  # nobody trusted: no tier would serve, a compile
    assert [t["trusted"] for t in json.loads(capsys.readouterr().out)["tiers"]] == [False, False]

    assert main(["doctor", "--cache-dir", str(tmp_path / "dev2"), "--tier", str(good), "--tier", str(evil),
                 "--trusted-key", keys["a"].public_key, "--revoked-key", keys["b"].key_id, "--format", "json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in d["trust"]["trusted_keys"]] == [keys["a"].key_id]
    assert d["trust"]["revoked_keys"] == [keys["b"].key_id]
    assert [(t["signed_by"], t["trusted"], t["signature_required"]) for t in d["tiers"]] == [
        (keys["a"].key_id, True, True), (keys["evil"].key_id, False, True)]
    assert main(["doctor", "--cache-dir", str(tmp_path / "dev2"), "--tier", str(evil)]) == 0
    assert f"index signed by ed25519 key {keys['evil'].key_id} (untrusted)); a load would refuse it" in capsys.readouterr().out


def test_cli_keygen_sign_import(build: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctxcache.cli import main

    key = tmp_path / "k.pem"
    assert main(["keygen", str(key), "--format", "json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert key.stat().st_mode & 0o777 == 0o600 and made["public_key"].startswith("ed25519:")
    before = key.read_bytes()
    assert main(["keygen", str(key)]) == 2  # never overwritten by accident
    assert "already exists" in capsys.readouterr().err and key.read_bytes() == before
    assert main(["keygen", str(key), "--force", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] != made["key_id"] and key.stat().st_mode & 0o777 == 0o600
    assert main(["keygen", str(tmp_path / "k2.pem"), "--format", "json"]) == 0
    pub = json.loads(capsys.readouterr().out)["public_key"]

    bundle = tmp_path / "b.tar"
    assert main(["export", str(bundle), "--cache-dir", str(build["cache"].root), "--key", build["a"][:12],
                 "--signing-key-file", str(tmp_path / "k2.pem"), "--format", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["signed"] and res["signed_by"] == [ctxcache_key_id(pub)]
    dev = ["--cache-dir", str(tmp_path / "dev"), "--format", "json"]
    assert main(["import", str(bundle), *dev]) == 1  # nobody trusted
    assert json.loads(capsys.readouterr().out)["refused"][build["a"]].startswith("tier_untrusted")
    assert main(["import", str(bundle), *dev, "--trusted-key", pub]) == 0
    assert json.loads(capsys.readouterr().out)["installed"] == [build["a"]]
    pubfile = tmp_path / "trusted.pub"
    pubfile.write_text(f"# the vendor's release key\n{pub}\n")
    assert main(["import", str(bundle), "--cache-dir", str(tmp_path / "dev2"), "--trusted-key", str(pubfile)]) == 0
    capsys.readouterr()
    # Bad key material: one line naming the file and the fix, exit 2, nothing written.
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    assert main(["export", str(tmp_path / "o.tar"), "--cache-dir", str(build["cache"].root), "--signing-key-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "keygen" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.tar").exists()
    assert main(["import", str(bundle), "--cache-dir", str(tmp_path / "dev3"), "--trusted-key", "ed25519:nope"]) == 2
    assert "ed25519:" in capsys.readouterr().err


def ctxcache_key_id(public_key: str) -> str:
    import base64

    return hashlib.sha256(base64.b64decode(public_key.removeprefix("ed25519:"))).hexdigest()[:16]


# -- keys and configuration ------------------------------------------------------------------------------------
def test_bad_trust_configuration(tmp_path: Path, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(errors.SigningKeyError) as e:
        ctxcache.ContextCache(tmp_path / "c", trusted_keys=["ed25519:AAAA"])
    assert "trusted_keys[0]" in str(e.value)
    with pytest.raises(errors.SigningKeyError) as e:  # a private key where a public one belongs
        ctxcache.ContextCache(tmp_path / "c", trusted_keys=[keys["a"].path.read_text()])
    assert "never the private key" in str(e.value)
    with pytest.raises(errors.SigningKeyError) as e:  # a file path as a str would be an HMAC secret equal to the name
        export_bundle(ctxcache.ContextCache(tmp_path / "c"), tmp_path / "b", signing_key=str(keys["a"].path))
    assert "pathlib.Path" in str(e.value) and not (tmp_path / "b").exists()
    # A malformed environment variable does not break the launch: nothing is trusted, and doctor says so.
    monkeypatch.setenv(TRUSTED_KEYS_ENV, f"{keys['a'].public_key},garbage")
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        cache = ctxcache.ContextCache(tmp_path / "c")
    assert cache.trust.public_key(keys["a"].key_id) is None and "TRUSTED_KEYS item 2" in (cache.trust.problem or "")
    assert any("no key is trusted" in r.getMessage() for r in caplog.records)
    assert any("trust:" in p for p in ctxcache.diagnose(cache).problems)


def test_secrets_never_show(keys: dict[str, Any]) -> None:
    from ctxcache._trust import signing_key

    key = signing_key(keys["a"].path)
    assert key.scheme == "ed25519" and key.key_id == keys["a"].key_id
    assert key.secret.hex() not in repr(key) and "secret" not in repr(key)
    hmac_key = signing_key(SECRET)
    assert hmac_key.scheme == "hmac-sha256" and SECRET not in repr(hmac_key)


def test_import_ctxcache_and_a_local_hit_load_no_cryptography(build: dict[str, Any], keys: dict[str, Any],
                                                              conv_model: Path) -> None:
    code = f"""
import json, sys, ctxcache
from ctxcache import models
after_import = sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")
cache = ctxcache.ContextCache({str(build['cache'].root)!r}, tiers=["s3://bucket/p"], trusted_keys=[{keys['a'].public_key!r}])
r = cache.load({str(conv_model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
from _report import report
report({{"outcome": r.outcome, "after_import": after_import,
         "after_hit": sorted(m for m in sys.modules if m.split(".")[0] == "cryptography"
                             or m.startswith("ctxcache.tiers"))}})
"""
    assert run_python(code).result == {"outcome": "hit", "after_import": [], "after_hit": []}


def test_readme_documents_every_tier_code() -> None:
    from conftest import ROOT

    from ctxcache.tiers._base import TIER_CODES

    text = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(tier_\w+)` \| (yes|no) \|", text, flags=re.M))
    assert rows == {code: "yes" if fault else "no" for code, (fault, _) in TIER_CODES.items()}
