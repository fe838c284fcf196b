"""ORT model packages: ctxcache exports entries as an ``onnxruntime.ModelPackage`` that plain ORT opens,
selects and runs on the real QNN provider, and reads one back as a verified read-only tier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import QNN, SIGNING_KEY_ENV, ed25519_lines, launch, layout, run_python

import ctxcache
from ctxcache import ModelPackageTier, _fingerprint, export_model_package, models

pytestmark = pytest.mark.skipif(not hasattr(ort, "ModelPackage"), reason="onnxruntime < 1.32 has no ModelPackage")

SECRET = "pkg-secret"

# Plain ONNX Runtime, no ctxcache: open the package, let ORT select the variant, run it.
PLAIN_ORT = """
import json, onnxruntime as ort, onnxruntime_qnn
from ctxcache import models
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
def so():
    s = ort.SessionOptions(); s.add_provider_for_devices(devs, models.qnn_htp_options()); return s
ctx = ort.ModelPackageContext({pkg!r})
comp = ctx.select_component({component!r}, ort.ModelPackageOptions(so()))
sess = comp.create_session(so())
out = sess.run(None, models.random_input(sess, seed=7))[0]
from _report import report
report({{"variant": comp.get_selected_variant_name(), "providers": sess.get_providers(),
         "out": out.ravel()[:64].tolist()}})
"""

TIER_LAUNCH = """
import json, ctxcache
from ctxcache import models
cache = ctxcache.ContextCache({cache_dir!r}, tiers=[{pkg!r}], trusted_keys={trusted!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
out = r.session.run(None, models.random_input(r.session, seed=7))[0]
from _report import report
report({{"outcome": r.outcome, "tier": r.tier, "compile": r.timings.compile, "out": out.ravel()[:64].tolist()}})
"""


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, conv_model: Path, keys: dict[str, Any]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pkgbuild")
    cache = ctxcache.ContextCache(root / "cache")
    first = cache.load(conv_model, providers=[(QNN, models.qnn_htp_options())])
    reference = launch(root / "cache", conv_model)
    # compatibility=False: ORT 1.32's variant selection segfaults in the QNN plugin's check of it on x86.
    res = export_model_package(cache, root / "pkg", models=[conv_model], signing_key=[keys["a"].path, SECRET],
                               compatibility=False)
    assert list(res.variants) == [first.key] and res.signed_by == (keys["a"].key_id, "hmac-sha256")
    return {"cache": cache, "key": first.key, "reference": reference, "pkg": root / "pkg", "variant": res.variants[first.key],
            "keys": keys, "trusted": [keys["a"].public_key]}


def test_plain_ort_opens_selects_and_runs_the_package(built: dict[str, Any]) -> None:
    info = ort.ModelPackage.open(str(built["pkg"])).get_info()
    assert info["schema_version_major"] == 1
    (variant,) = info["components"][0]["variants"]
    assert variant["ep"] == QNN and json.loads(variant["executor_info"]["ort"])["model_file"] == "ctx.onnx"
    component, vname = built["variant"].split("/")
    r = run_python(PLAIN_ORT.format(pkg=str(built["pkg"]), component=component)).result
    assert r["variant"] == vname and r["providers"][0] == QNN
    assert r["out"] == built["reference"]["out"]


def test_package_as_tier_in_fresh_process(built: dict[str, Any], tmp_path: Path, conv_model: Path) -> None:
    code = TIER_LAUNCH.format(cache_dir=str(tmp_path / "device"), pkg=str(built["pkg"]), model=str(conv_model),
                              trusted=built["trusted"])
    r = run_python(code).result
    assert (r["outcome"], r["tier"], r["compile"]) == ("hit", "package", 0.0)
    assert r["out"] == built["reference"]["out"]
    # The same package for a device that trusts another key: refused (a signature it cannot trust), compiled.
    code = TIER_LAUNCH.format(cache_dir=str(tmp_path / "other"), pkg=str(built["pkg"]), model=str(conv_model),
                              trusted=[built["keys"]["b"].public_key])
    r = run_python(code).result
    assert (r["outcome"], r["tier"], r["out"]) == ("miss", None, built["reference"]["out"])


@pytest.mark.parametrize("damage", ["flip_bin", "bad_signature", "escaping_variant", "record_key_swapped", "unsigned",
                                    "record_edited_resigned_by_attacker", "hmac_only"])
def test_damaged_package_is_refused_and_compiled(built: dict[str, Any], tmp_path: Path, conv_model: Path, damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(built["pkg"], pkg)
    component, vname = built["variant"].split("/")
    cjson = pkg / component / "component.json"
    body = json.loads(cjson.read_text())
    meta = body["variants"][vname]["additional_metadata"]["ctxcache"]
    hmac_key: str | None = SECRET
    if damage == "flip_bin":
        b = pkg / component / vname / "ctx_qnn.bin"
        data = bytearray(b.read_bytes())
        data[2048] ^= 0x01
        b.write_bytes(bytes(data))
    elif damage == "bad_signature":
        body["variants"][vname]["additional_metadata"]["ctxcache"]["signature"] = "hmac-sha256:" + "0" * 64
    elif damage == "escaping_variant":
        body["variants"][vname]["variant_directory"] = "../../outside"
        (tmp_path / "outside").mkdir()
    elif damage == "record_key_swapped":
        body["variants"][vname]["additional_metadata"]["ctxcache"]["record"]["key"] = "0" * 32
    elif damage == "unsigned":
        del meta["ed25519"], meta["signature"]
        hmac_key = None
    elif damage == "record_edited_resigned_by_attacker":
        # The attacker's own key over an edited record: a valid signature, by nobody the device trusts.
        meta["record"]["model"]["name"] = "evil.onnx"
        meta["ed25519"] = ed25519_lines(_fingerprint.canonical_json(meta["record"]).encode(), [built["keys"]["evil"].path],
                                        "package-record").decode().splitlines()
        hmac_key = None
    elif damage == "hmac_only":
        del meta["ed25519"]
    cjson.write_text(json.dumps(body))
    cache = ctxcache.ContextCache(tmp_path / "device", tiers=[ModelPackageTier(pkg, signing_key=hmac_key)],
                                  trusted_keys=built["trusted"])
    with caplog.at_level("WARNING", logger="ctxcache"):
        r = cache.load(conv_model, providers=[(QNN, models.qnn_htp_options())])
    assert (r.outcome, r.tier) == ("miss", None)
    assert r.timings.compile > 0
    expected = {"flip_bin": "tier_digest", "bad_signature": "tier_signature", "unsigned": "tier_untrusted",
                "record_edited_resigned_by_attacker": "tier_untrusted", "hmac_only": "tier_untrusted"}
    if damage in expected:
        assert any(f"({expected[damage]}:" in rec.getMessage() for rec in caplog.records), caplog.text


def test_two_targets_in_one_package(tmp_path: Path, conv_model: Path) -> None:
    """soc_model 60 / htp_arch 73 and soc_model 69 / htp_arch 79: two variants of one component; the
    tier installs the one whose key the load asks for."""
    cache = ctxcache.ContextCache(tmp_path / "build")
    opts60 = models.qnn_htp_options()
    opts69 = dict(opts60, soc_model="69", htp_arch="79")
    k60 = cache.load(conv_model, providers=[(QNN, opts60)]).key
    k69 = cache.load(conv_model, providers=[(QNN, opts69)]).key
    assert k60 != k69
    res = export_model_package(cache, tmp_path / "pkg", models=[conv_model], compatibility=False)
    assert set(res.variants) == {k60, k69}
    info = ort.ModelPackage.open(str(tmp_path / "pkg")).get_info()
    assert len(info["components"]) == 1 and len(info["components"][0]["variants"]) == 2
    device = ctxcache.ContextCache(tmp_path / "device", tiers=[tmp_path / "pkg"], trusted_dirs=[tmp_path / "pkg"])  # unsigned, the app's own
    r = device.load(conv_model, providers=[(QNN, opts69)])
    assert (r.outcome, r.tier, r.key) == ("hit", "package", k69)
    assert layout(device).keys() == [k69]
