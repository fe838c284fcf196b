"""Bundles against the real QNN compiler: export on one cache, hit from the bundle in a fresh process on
another, tampering refused (then a normal compile), hostile archives refused, a bad entry falls back.

The archive is signed with a real Ed25519 key (and an HMAC); the folder bundle is unsigned, so the
tests that use it say where the app vouches for it (``trusted_dirs`` or ``require_signature=False``).
Signature refusals in detail: test_tiers_signing.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN, SIGNING_KEY_ENV, ed25519_lines, hmac_sign, launch, layout, run_python

import ctxcache
from ctxcache import Bundle, errors, export_bundle, import_bundle

SECRET = "vendor-build-secret"

# A launch in a fresh process with tiers configured; prints what the app would see.
TIER_LAUNCH = """
import json, numpy as np, ctxcache
from ctxcache import models
from ctxcache import Bundle
cache = ctxcache.ContextCache({cache_dir!r}, tiers=[Bundle({bundle!r}, signing_key={key!r})],
                              trusted_keys={trusted!r}, trusted_dirs={dirs!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
from _report import report
report({{"outcome": r.outcome, "tier": r.tier, "reason": r.reason.code if r.reason else None,
         "compile": r.timings.compile, "fetch": r.timings.fetch, "providers": r.providers,
         "out": out.ravel()[:64].tolist(), "stats": cache.stats().as_dict()}})
"""


def tier_launch(cache_dir: Path, bundle: Path, model: Path, key: str | None = None, *, trusted: list[str] | None = None,
                own: bool = False) -> dict[str, Any]:
    """A fresh-process launch; ``own``: the bundle's folder is the app's own (``trusted_dirs``)."""
    code = TIER_LAUNCH.format(cache_dir=str(cache_dir), bundle=str(bundle), model=str(model), key=key,
                              trusted=trusted or [], dirs=[str(bundle.parent)] if own else [])
    return run_python(code).result  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, conv_model: Path, keys: dict[str, Any]) -> dict[str, Any]:
    """One compiled cache ("the build machine"), its outputs, an archive signed with Ed25519 key ``a`` and an
    HMAC, and an unsigned folder bundle."""
    root = tmp_path_factory.mktemp("build")
    cache = ctxcache.ContextCache(root / "cache")
    first = cache.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert first.outcome == "miss"
    reference = launch(root / "cache", conv_model)  # a hit in a fresh process: the outputs to match
    assert reference["outcome"] == "hit"
    tar = export_bundle(cache, root / "bundle.tar", models=[conv_model], signing_key=[keys["a"].path, SECRET])
    folder = export_bundle(cache, root / "bundle", provider=QNN, options={"soc_model": "60"})
    assert list(tar.keys) == list(folder.keys) == [first.key] and tar.signed and not folder.signed
    assert tar.signed_by == (keys["a"].key_id, "hmac-sha256")
    return {"cache": cache, "key": first.key, "reference": reference, "tar": root / "bundle.tar", "folder": root / "bundle",
            "trusted": [keys["a"].public_key], "keys": keys}


def ctxcache_models() -> Any:
    from ctxcache import models

    return models


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _events(cache_dir: Path) -> list[str]:
    path = cache_dir / "v1" / "events.log"
    return [json.loads(line)["o"] for line in path.read_text().splitlines()] if path.exists() else []


# -- export -----------------------------------------------------------------------------------------------
def test_export_selection_and_layout(built: dict[str, Any], tmp_path: Path, conv_model_b: Path) -> None:
    index = json.loads((built["folder"] / "index.json").read_text())
    rec = index["entries"][built["key"]]
    assert set(rec["files"]) == {"manifest.json", "ctx.onnx", "ctx_qnn.bin"}
    assert not (built["folder"] / "index.json.sig").exists()
    with tarfile.open(built["tar"]) as tf:
        names = tf.getnames()
    assert {"index.json.sig", "index.json.ed25519", f"entries/{built['key']}/ctx_qnn.bin"} <= set(names)
    # Filters that match nothing are an error, not an empty bundle.
    with pytest.raises(errors.BundleError) as e:
        export_bundle(built["cache"], tmp_path / "b69", options={"soc_model": "69"})
    assert e.value.code == "nothing_selected"
    with pytest.raises(errors.BundleError):
        export_bundle(built["cache"], tmp_path / "bm", models=[conv_model_b])
    with pytest.raises(errors.BundleError) as e:
        export_bundle(built["cache"], built["folder"], keys=[built["key"][:8]])
    assert e.value.code == "exists"
    assert not list(tmp_path.iterdir())  # no half-written bundle left behind


# -- hits from a bundle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tar", "folder"])
def test_bundle_hit_in_fresh_process(built: dict[str, Any], tmp_path: Path, conv_model: Path, kind: str) -> None:
    key = SECRET if kind == "tar" else None
    fresh = tmp_path / "device-cache"
    # The signed archive is used from anywhere by a device that trusts key a; the unsigned folder only
    # because the app names its folder as its own.
    trust: dict[str, Any] = {"trusted": built["trusted"]} if kind == "tar" else {"own": True}
    r = tier_launch(fresh, built[kind], conv_model, key, **trust)
    assert (r["outcome"], r["tier"], r["reason"]) == ("hit", "bundle", None)
    assert r["compile"] == 0.0 and r["fetch"] > 0
    assert r["stats"]["misses"] == 0 and r["stats"]["compile_seconds"] == 0
    assert QNN in r["providers"]
    assert r["out"] == built["reference"]["out"]  # bit-identical to the build machine's context
    # The entry now lives in the local cache: the next launch is a plain local hit.
    again = tier_launch(fresh, built[kind], conv_model, key, **trust)
    assert (again["outcome"], again["tier"]) == ("hit", None)
    manifest = json.loads((fresh / "v1" / "entries" / built["key"] / "manifest.json").read_text())
    assert manifest["origin"]["tier"] == "bundle"


def test_import_then_hit(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    dest = ctxcache.ContextCache(tmp_path / "c", trusted_keys=built["trusted"])
    res = import_bundle(dest, built["tar"], signing_key=SECRET)
    assert list(res.installed) == [built["key"]] and not res.refused
    assert import_bundle(dest, built["tar"], signing_key=SECRET).present == (built["key"],)
    r = launch(tmp_path / "c", conv_model)  # fresh process, no tiers configured
    assert r["outcome"] == "hit" and r["out"] == built["reference"]["out"]
    with pytest.raises(errors.BundleError) as e:
        import_bundle(ctxcache.ContextCache(tmp_path / "d", trusted_keys=built["trusted"]), built["tar"], signing_key="another key")
    assert e.value.code == "tier_signature"
    assert not (tmp_path / "d" / "v1" / "entries").exists() or not list((tmp_path / "d" / "v1" / "entries").iterdir())


# -- tampering ------------------------------------------------------------------------------------------------
def _flip(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_index(bundle: Path, edit: Any, key: str | None, signer: Path | None = None) -> None:
    """Edit the index; HMAC it with ``key`` and sign it with the Ed25519 key file ``signer`` when given."""
    index = json.loads((bundle / "index.json").read_text())
    edit(index)
    raw = json.dumps(index, sort_keys=True, indent=1).encode()
    (bundle / "index.json").write_bytes(raw)
    if key is not None:
        (bundle / "index.json.sig").write_bytes(hmac_sign(raw, key.encode()))
    if signer is not None:
        (bundle / "index.json.ed25519").write_bytes(ed25519_lines(raw, [signer], "bundle-index"))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "damage",
    ["flip_bin", "flip_context", "bad_signature", "unsigned_with_key", "bin_and_index_not_resigned", "parts_edited"],
)
def test_tampered_bundle_is_refused_and_compiled(
    built: dict[str, Any], tmp_path: Path, conv_model: Path, damage: str
) -> None:
    k = built["key"]
    bundle = _copy_folder(built["folder"], tmp_path / "bundle")
    edir = bundle / "entries" / k
    use_key: str | None = SECRET
    own = False
    _rewrite_index(bundle, lambda i: None, SECRET, built["keys"]["a"].path)  # a correctly signed copy, then damage it
    if damage == "flip_bin":
        _flip(edir / "ctx_qnn.bin")
    elif damage == "flip_context":
        _flip(edir / "ctx.onnx", 200)
    elif damage == "bad_signature":
        _rewrite_index(bundle, lambda i: None, "some other key")
    elif damage == "unsigned_with_key":
        (bundle / "index.json.sig").unlink()
    elif damage == "bin_and_index_not_resigned":
        # The attacker updates the digest too; only the signature can catch that.
        _flip(edir / "ctx_qnn.bin")
        sha = _sha(edir / "ctx_qnn.bin")
        _rewrite_index(bundle, lambda i: i["entries"][k]["files"]["ctx_qnn.bin"].update(sha256=sha), None)
    elif damage == "parts_edited":
        # No key configured, in the app's own folder: the parts must still hash to the key they claim.
        use_key, own = None, True
        (bundle / "index.json.ed25519").unlink()

        def edit(i: dict[str, Any]) -> None:
            i["entries"][k]["parts"][1][1] = "0" * 32

        _rewrite_index(bundle, edit, None)
    r = tier_launch(tmp_path / "device", bundle, conv_model, use_key, trusted=built["trusted"], own=own)
    assert (r["outcome"], r["tier"]) == ("miss", None), r  # refused, compiled locally instead
    assert r["compile"] > 0
    assert r["out"] == built["reference"]["out"]
    manifest = json.loads((tmp_path / "device" / "v1" / "entries" / k / "manifest.json").read_text())
    assert "origin" not in manifest


def test_tampered_without_key_is_still_caught_by_digests(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    bundle = _copy_folder(built["folder"], tmp_path / "bundle")
    _flip(bundle / "entries" / built["key"] / "ctx_qnn.bin")
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[bundle], trusted_dirs=[tmp_path])
    r = cache.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert r.outcome == "miss" and r.tier is None
    strict = ctxcache.ContextCache(tmp_path / "s", tiers=[bundle], strict=True, trusted_dirs=[tmp_path])
    with pytest.raises(errors.CacheFaultError) as e:
        strict.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert e.value.code == "tier_digest"


def test_entry_that_verifies_but_fails_to_load_falls_back(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    """A bundle whose .bin is garbage *with matching digests* (a bad build, not an attack)."""
    k = built["key"]
    bundle = _copy_folder(built["folder"], tmp_path / "bundle")
    binf = bundle / "entries" / k / "ctx_qnn.bin"
    binf.write_bytes(os.urandom(binf.stat().st_size))
    sha = _sha(binf)
    _rewrite_index(bundle, lambda i: i["entries"][k]["files"]["ctx_qnn.bin"].update(sha256=sha), None)
    providers = [(QNN, ctxcache_models().qnn_htp_options())]
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[Bundle(bundle, require_signature=False)])
    r = cache.load(conv_model, providers=providers)
    assert (r.outcome, r.tier, r.reason and r.reason.code) == ("fallback", "bundle", "load_failed")
    assert r.session.run(None, ctxcache_models().random_input(r.session, seed=7))[0].size  # a working session
    # Next launch does not fetch the same bad entry again: it compiles, then hits locally.
    r2 = cache.load(conv_model, providers=providers)
    assert (r2.outcome, r2.tier) == ("miss", None)
    assert cache.load(conv_model, providers=providers).outcome == "hit"


def test_missing_bundle_degrades_to_compile(tmp_path: Path, conv_model: Path) -> None:
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[tmp_path / "not-installed.tar", tmp_path / "nor-this"])
    r = cache.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert r.outcome == "miss"


# -- hostile archives ------------------------------------------------------------------------------------------
def _hostile_tar(src_tar: Path, dst: Path, kind: str) -> Path:
    """The genuine archive plus one hostile member."""
    with tarfile.open(src_tar) as src, tarfile.open(dst, "w") as out:
        for m in src.getmembers():
            f = src.extractfile(m)
            out.addfile(m, f)
        info = tarfile.TarInfo()
        payload = b"pwned"
        if kind == "traversal":
            info.name, info.size = "../../evil.txt", len(payload)
        elif kind == "traversal_inside":
            info.name, info.size = "entries/../../evil.txt", len(payload)
        elif kind == "absolute":
            info.name, info.size = str(dst.parent / "abs-evil.txt"), len(payload)
        elif kind == "symlink":
            info.name, info.type, info.linkname, payload = "entries/link", tarfile.SYMTYPE, "/etc/passwd", b""
        elif kind == "hardlink":
            info.name, info.type, info.linkname, payload = "index.json.sig", tarfile.LNKTYPE, "/etc/passwd", b""
        elif kind == "device":
            info.name, info.type, info.devmajor, info.devminor, payload = "entries/dev", tarfile.CHRTYPE, 1, 3, b""
        elif kind == "fifo":
            info.name, info.type, payload = "entries/fifo", tarfile.FIFOTYPE, b""
        elif kind == "duplicate":
            info.name, info.size = "index.json", len(payload)
        elif kind == "unexpected":
            info.name, info.size = "setup.sh", len(payload)
        elif kind == "newline":
            info.name, info.size = "index.json\n", len(payload)
        out.addfile(info, io.BytesIO(payload) if payload else None)
    return dst


HOSTILE = ["traversal", "traversal_inside", "absolute", "symlink", "hardlink", "device", "fifo", "duplicate", "unexpected",
           "newline"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_archive_is_refused(built: dict[str, Any], tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    evil = _hostile_tar(built["tar"], work / "bundle.tar", kind)
    monkeypatch.chdir(work)  # a traversal that escaped would land next to it
    cache = ctxcache.ContextCache(tmp_path / "c")
    with pytest.raises(errors.BundleError) as e:
        import_bundle(cache, evil, signing_key=SECRET)
    assert e.value.code == "tier_unsafe", e.value
    assert not layout(cache).keys()
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []
    assert not (tmp_path / "c" / "v1" / "entries" / "link").exists()


def test_hostile_archive_as_tier_compiles_instead(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    evil = _hostile_tar(built["tar"], tmp_path / "bundle.tar", "symlink")
    r = tier_launch(tmp_path / "c", evil, conv_model, SECRET, trusted=built["trusted"])
    assert (r["outcome"], r["tier"]) == ("miss", None)


# -- built on another host ---------------------------------------------------------------------------------
def _as_if_built_elsewhere(src: Path, dst: Path, key: str, edit_options: dict[str, str] | None = None) -> str:
    """Rewrite a folder bundle as if its entry had been compiled on an x86 build host for an ARM device:
    other host, devices and EP library digests (so another key), same context bytes. Returns the new key."""
    import hashlib

    from ctxcache import _fingerprint

    shutil.copytree(src, dst)
    index = json.loads((dst / "index.json").read_text())
    rec = index["entries"].pop(key)
    parts = {p[0]: p[1] for p in rec["parts"]}
    parts["host"] = "linux-x86_64-buildfarm"
    parts["devices"] = [{"type": "CPU", "vendor": "build-host"}]
    parts["ep_libraries"] = dict.fromkeys(parts["ep_libraries"], "0" * 32)
    if edit_options:
        parts["ep_options"] = dict(parts["ep_options"], **edit_options)
    new_parts = [[label, parts[label]] for label, _ in rec["parts"]]
    new_key = _fingerprint.build([(p[0], p[1]) for p in new_parts]).key
    os.rename(dst / "entries" / key, dst / "entries" / new_key)
    mpath = dst / "entries" / new_key / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest.update(key=new_key, parts=new_parts)
    mpath.write_text(json.dumps(manifest))
    rec.update(key=new_key, parts=new_parts)
    rec["files"]["manifest.json"] = {"size": mpath.stat().st_size, "sha256": hashlib.sha256(mpath.read_bytes()).hexdigest()}
    index["entries"][new_key] = rec
    (dst / "index.json").write_text(json.dumps(index))
    return new_key


def test_portable_match_uses_an_entry_built_on_another_host(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    foreign = _as_if_built_elsewhere(built["folder"], tmp_path / "bundle", built["key"])
    assert foreign != built["key"]
    providers = [(QNN, ctxcache_models().qnn_htp_options())]
    own = {"trusted_dirs": [tmp_path / "bundle"]}  # relabelled here, unsigned: the app vouches for its folder
    exact = ctxcache.ContextCache(tmp_path / "exact", tiers=[Bundle(tmp_path / "bundle")], **own).load(conv_model, providers=providers)
    assert (exact.outcome, exact.tier) == ("miss", None)  # the default never uses another host's entry
    cache = ctxcache.ContextCache(tmp_path / "portable", tiers=[Bundle(tmp_path / "bundle", match="portable")], **own)
    r = cache.load(conv_model, providers=providers)
    assert (r.outcome, r.tier, r.key) == ("hit", "bundle", built["key"])
    out = r.session.run(None, ctxcache_models().random_input(r.session, seed=7))[0]
    assert out.ravel()[:64].tolist() == built["reference"]["out"]
    manifest = json.loads((tmp_path / "portable" / "v1" / "entries" / built["key"] / "manifest.json").read_text())
    assert manifest["origin"]["key"] == foreign
    assert {p[0]: p[1] for p in manifest["parts"]}["host"] != "linux-x86_64-buildfarm"  # answers to this machine
    assert cache.load(conv_model, providers=providers).outcome == "hit"  # later launches: plain local hits
    assert cache.stats().tier_hits == {"bundle": 1} and cache.stats().hits == 2  # one fetched, one local


def test_portable_match_still_requires_the_same_binary_options(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    _as_if_built_elsewhere(built["folder"], tmp_path / "bundle", built["key"], edit_options={"soc_model": "69"})
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[Bundle(tmp_path / "bundle", match="portable", require_signature=False)])
    r = cache.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert (r.outcome, r.tier) == ("miss", None)


def test_concurrent_first_launches_fetch_once(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    """Four processes start at once on an empty cache: one fills from the bundle under the key's lock,
    the others find the published entry when they look again. All hit, nobody compiles."""
    from _child import Child

    code = TIER_LAUNCH.format(cache_dir=str(tmp_path / "shared"), bundle=str(built["folder"]), model=str(conv_model), key=None,
                              trusted=[], dirs=[str(built["folder"])])
    procs = [Child.python(code) for _ in range(4)]
    results = [p.finish(timeout=300).check().result for p in procs]
    assert [r["outcome"] for r in results] == ["hit"] * 4
    assert sorted(str(r["tier"]) for r in results) == ["None", "None", "None", "bundle"]
    assert all(r["compile"] == 0.0 and r["out"] == built["reference"]["out"] for r in results)


def test_tier_report_says_which_tier_holds_the_key(built: dict[str, Any], tmp_path: Path, conv_model: Path, conv_model_b: Path) -> None:
    _as_if_built_elsewhere(built["folder"], tmp_path / "foreign", built["key"])
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[Bundle(tmp_path / "nowhere.tar"), Bundle(built["tar"]),
                                                         Bundle(tmp_path / "foreign", match="portable")],
                                  trusted_keys=built["trusted"], trusted_dirs=[tmp_path / "foreign"])
    providers = [(QNN, ctxcache_models().qnn_htp_options())]
    report = cache.explain(conv_model, providers=providers).tiers
    assert [r.has for r in report][1:] == ["exact", "portable"]
    assert str(report[0].has).startswith("error: tier_unreachable")
    assert [r.would_serve for r in report] == [False, True, False]
    assert [(r.signed_by, r.signature, r.signature_required) for r in report][1:] == [
        (built["keys"]["a"].key_id, "trusted", True), (None, "unsigned", False)]
    assert [r.has for r in cache.explain(conv_model_b, providers=providers).tiers][1:] == [None, None]
    assert not layout(cache).keys()  # read-only: nothing was installed


def test_a_local_hit_imports_no_tier_code(built: dict[str, Any], conv_model: Path) -> None:
    """Tiers given as paths are only turned into objects at the first miss: hits stay as cheap as without."""
    code = f"""
import json, sys, ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({str(built['cache'].root)!r}, tiers=[{str(built['tar'])!r}, "s3://bucket/prefix"],
                              trusted_keys={built['trusted']!r})
r = cache.load({str(conv_model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
from _report import report
report({{"outcome": r.outcome, "loaded": sorted(m for m in sys.modules if m.startswith("ctxcache.tiers")
                                                 or m == "ctxcache._transfer" or m.startswith("cryptography"))}})
"""
    r = run_python(code).result
    assert r == {"outcome": "hit", "loaded": []}


def test_folder_bundle_with_a_symlinked_file_is_refused(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    """Even a link to a file with the right bytes: a bundle is read without following links."""
    bundle = _copy_folder(built["folder"], tmp_path / "bundle")
    binf = bundle / "entries" / built["key"] / "ctx_qnn.bin"
    real = tmp_path / "elsewhere.bin"
    shutil.move(binf, real)
    binf.symlink_to(real)
    cache = ctxcache.ContextCache(tmp_path / "c", tiers=[Bundle(bundle, require_signature=False)])
    r = cache.load(conv_model, providers=[(QNN, ctxcache_models().qnn_htp_options())])
    assert (r.outcome, r.tier) == ("miss", None)
    res = import_bundle(ctxcache.ContextCache(tmp_path / "d"), bundle, require_signature=False)
    assert not res.installed and "tier_unsafe" in res.refused[built["key"]]
