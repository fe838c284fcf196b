"""TUF over the remote tier, on a real S3 server (moto's server mode on 127.0.0.1) and on a file:// store,
with the real QNN compiler: a build machine pushes (each push a TUF publication), devices load through
ngclient. Each attack (replay of an older build, a frozen store, mix-and-match, a leaked and revoked key, a
forged root after a rotation, a threshold not met) is refused with its reason code and the app still gets
a working session (a local compile, outputs equal to the JIT reference's)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tuf.ngclient", reason="TUF tests need the 'tuf' extra: pip install -e '.[tuf,test]'")
pytest.importorskip("boto3", reason="remote tier tests need the 'remote' extra")
pytest.importorskip("moto.server", reason="S3 tests need moto[server] (in the 'test' extra)")

from conftest import QNN, first_outputs, jit_outputs
from test_tiers_remote import CREDS, S3Server

import ctxcache
from ctxcache import RemoteTier, models
from ctxcache import _tuf as tufmod
from ctxcache import _tuf_publish as tuf_publish

P = [(QNN, models.qnn_htp_options())]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@dataclass
class Fleet:
    """A store, the publisher's TUF key folder and the Ed25519 build key devices also trust."""

    url: str
    endpoint: str | None
    keys_dir: Path
    root: Path
    build_key: Any
    tmp: Path

    def tier(self, **kw: Any) -> RemoteTier:
        return RemoteTier(self.url, endpoint_url=self.endpoint, **kw)

    def builder(self, name: str = "builder") -> tuple[ctxcache.ContextCache, RemoteTier]:
        t = self.tier(write_back=True, signing_key=self.build_key.path, tuf_keys=self.keys_dir)
        return ctxcache.ContextCache(self.tmp / name, tiers=[t]), t

    def device(self, name: str = "device", root: Path | None = None) -> ctxcache.ContextCache:
        return ctxcache.ContextCache(self.tmp / name, tiers=[self.tier(tuf_root=root or self.root)],
                                     trusted_keys=[self.build_key.public_key])

    def get(self, name: str) -> bytes:
        data = self.tier()._backend.get(name, None, time.monotonic() + 60)
        assert data is not None, name
        return data

    def put(self, name: str, data: bytes) -> None:
        self.tier()._backend.put(name, data)


@pytest.fixture(params=["file", "s3"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Fleet:
    if request.param == "s3":
        for k, v in CREDS.items():
            monkeypatch.setenv(k, v)
        server: S3Server = request.getfixturevalue("s3")
        bucket = "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:20]
        server.client().create_bucket(Bucket=bucket)
        url, endpoint = f"s3://{bucket}/fleet", server.url
    else:
        (tmp_path / "store").mkdir()
        url, endpoint = (tmp_path / "store").as_uri(), None
    kdir = tmp_path / "tuf-keys"
    root = tuf_publish.init(RemoteTier(url, endpoint_url=endpoint).tuf_objects(), kdir, url)
    return Fleet(url, endpoint, kdir, root, keys["a"], tmp_path)


def _build(fleet: Fleet, model: Path, name: str = "builder") -> ctxcache.LoadResult:
    cache, tier = fleet.builder(name)
    r = cache.load(model, providers=P)
    listed = tier.keys()
    assert r.outcome == "miss" and r.key in listed
    return r


def _refused(caplog: pytest.LogCaptureFixture, device: ctxcache.ContextCache, model: Path, code: str) -> ctxcache.LoadResult:
    """The device's load: the remote refused with ``code``, compiled here, outputs as JIT."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        start = time.monotonic()
        r = device.load(model, providers=P)
        took = time.monotonic() - start
    assert (r.outcome, r.tier) == ("miss", None), r
    assert f"{code}:" in caplog.text, caplog.text
    assert took < 60  # never hangs (a bound, not a speed claim)
    assert first_outputs(r) == jit_outputs(model)
    return r


def test_push_publishes_and_device_hits_through_tuf(fleet: Fleet, conv_model: Path) -> None:
    built = _build(fleet, conv_model)
    meta = fleet.tier().tuf_objects()
    ts = json.loads(meta.get("tuf/metadata/timestamp.json") or b"{}")
    assert ts["signed"]["version"] == 2  # init, then the push's publication
    device = fleet.device()
    r = device.load(conv_model, providers=P)
    assert (r.outcome, r.tier) == ("hit", "remote")
    assert first_outputs(r) == jit_outputs(conv_model)
    entry = json.loads((r.entry_path / "manifest.json").read_text())  # type: ignore[operator]
    origin = entry["origin"]["tuf"]
    assert origin["target"] == f"{built.key}/record.json" and origin["targets_version"] == 2
    assert tufmod.still_trusted(entry["origin"], device.root) is None
    # The device kept what it verified inside its cache root (rollback floor), nothing beside it.
    state = tufmod.state_folder(device.root, fleet.url)
    assert sorted(p.name for p in state.iterdir()) == ["root.1.json", "snapshot.json", "targets.json", "timestamp.json"]


def test_replay_of_an_older_build_is_refused(fleet: Fleet, conv_model: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Two builds of one key (the same model compiled from two paths); the older one, validly signed by the
    build key, is put back over the current one. A device without TUF takes it; a TUF device refuses it."""
    old = _build(fleet, conv_model, "builder-old")
    key = old.key
    assert key is not None
    names = [f"v1/{key}/record.json", f"v1/{key}/record.json.ed25519"] + [
        f"v1/{key}/files/{n}" for n in ("manifest.json", "ctx.onnx", "ctx_qnn.bin")]
    saved = {n: fleet.get(n) for n in names}
    copy = tmp_path / "elsewhere" / "conv.onnx"
    copy.parent.mkdir()
    shutil.copy(conv_model, copy)
    cache = ctxcache.ContextCache(fleet.tmp / "builder-new")  # another build host, no remote to read from
    tier = fleet.builder("unused")[1]
    new = cache.load(copy, providers=P)
    assert new.key == key and new.outcome == "miss"
    from ctxcache._store import Store

    assert tier.push(Store(cache.root).lookup(key), overwrite=True)  # type: ignore[arg-type]
    assert fleet.get(f"v1/{key}/record.json") != saved[f"v1/{key}/record.json"]
    current = json.loads(fleet.get("tuf/metadata/timestamp.json"))["signed"]["version"]
    assert current == 3
    # The replay: the older build's objects put back at the current names.
    for n, data in saved.items():
        fleet.put(n, data)
    plain = ctxcache.ContextCache(tmp_path / "no-tuf", tiers=[fleet.tier()], trusted_keys=[fleet.build_key.public_key])
    assert plain.load(conv_model, providers=P).tier == "remote"  # the attack works without TUF
    _refused(caplog, fleet.device(), conv_model, "tier_digest")
    # The older record put at the current publication's hash-named object too: refused by TUF's own check.
    sha = json.loads(fleet.get("tuf/metadata/3.targets.json"))["signed"]["targets"][f"{key}/record.json"]["hashes"]["sha256"]
    fleet.put(f"v1/{key}/{sha}.record.json", saved[f"v1/{key}/record.json"])
    _refused(caplog, fleet.device("device-2"), conv_model, "tier_digest")


def test_rollback_of_metadata_is_refused(fleet: Fleet, conv_model: Path, conv_model_b: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    _build(fleet, conv_model)
    old_ts = fleet.get("tuf/metadata/timestamp.json")
    _build(fleet, conv_model_b, "builder-b")
    device = fleet.device()
    assert device.load(conv_model_b, providers=P).tier == "remote"  # saw publication 3
    fleet.put("tuf/metadata/timestamp.json", old_ts)  # the store rolled back to publication 2
    # A new cache object on the same folder (as the next launch): the floor comes from the cache's TUF state.
    _refused(caplog, fleet.device(), conv_model, "tier_rollback")


def test_frozen_store_is_detected_and_the_load_compiles(fleet: Fleet, conv_model: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    (fleet.keys_dir / "tuf.json").write_text(json.dumps({"expiry": {"timestamp": 2.0}}))
    _build(fleet, conv_model)
    time.sleep(3)  # nobody ran `ctxcache tuf timestamp`: the store is frozen
    _refused(caplog, fleet.device(), conv_model, "tier_stale")
    tuf_publish.refresh_timestamp(fleet.tier().tuf_objects(), tuf_publish.load_keys(fleet.keys_dir), fleet.url)
    assert fleet.device("device-2").load(conv_model, providers=P).tier == "remote"


def test_mix_and_match_is_refused(fleet: Fleet, conv_model: Path, conv_model_b: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    _build(fleet, conv_model)
    _build(fleet, conv_model_b, "builder-b")
    # Publication 3's snapshot with publication 2's targets (both validly signed).
    fleet.put("tuf/metadata/3.targets.json", fleet.get("tuf/metadata/2.targets.json"))
    _refused(caplog, fleet.device(), conv_model, "tier_mixed")


def test_revoked_targets_key_and_revocation_of_installed_entries(fleet: Fleet, conv_model: Path, conv_model_b: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The targets key leaks. The publisher rotates it (root v2), drops the entry published under it; an
    attacker holding the old key (and a copy of the online keys from before) publishes anyway."""
    built = _build(fleet, conv_model)
    device = fleet.device()
    r = device.load(conv_model, providers=P)
    assert r.tier == "remote"
    origin = json.loads((r.entry_path / "manifest.json").read_text())["origin"]  # type: ignore[operator]
    stolen = fleet.tmp / "stolen-keys"
    shutil.copytree(fleet.keys_dir, stolen)
    keys = tuf_publish.load_keys(fleet.keys_dir)
    leaked = tuf_publish.own_root(keys).signed.roles["targets"].keyids[0]
    objects = fleet.tier().tuf_objects()
    assert tuf_publish.rotate(objects, fleet.keys_dir, fleet.url, "targets", revoke=[leaked]) == 2
    assert (fleet.keys_dir / "targets-1.key.revoked").exists()
    tuf_publish.publish(objects, tuf_publish.load_keys(fleet.keys_dir), fleet.url, remove=[built.key])  # type: ignore[list-item]
    # The installed entry: still trusted until the device refreshes; then revoked, from local files only.
    assert tufmod.still_trusted(origin, device.root) is None
    assert device.tiers[0].tuf_refresh() >= 4  # type: ignore[attr-defined]
    why = tufmod.still_trusted(origin, device.root)
    assert why is not None and why.code == "tuf_revoked"
    # `ctxcache verify` reports it, and --fix quarantines it (the hit-side check is the loader's call).
    (report,) = device.verify_entries()
    assert report.problem is not None and report.problem.code == "tuf_revoked"
    (fixed,) = device.verify_entries(fix=True)
    assert fixed.quarantined and device.verify_entries() == []
    # The attacker's publication, signed by the revoked targets key, on top of the current one.
    other = _build(fleet, conv_model_b, "attacker-build")  # an entry the attacker re-lists under the old key
    raw = fleet.get(f"v1/{other.key}/record.json")
    stolen_keys = tuf_publish.load_keys(stolen)
    pub = tuf_publish.current(objects, tuf_publish.own_root(tuf_publish.load_keys(fleet.keys_dir)))
    from tuf.api.metadata import MetaFile, TargetFile

    pub.targets.signed.targets[f"{other.key}/record.json"] = TargetFile.from_data(f"{other.key}/record.json", raw, ["sha256"])
    pub.targets.signed.version += 10
    tbytes = tuf_publish._signed(pub.targets, [stolen_keys.signers[leaked]], 1, "targets")
    pub.snapshot.signed.meta["targets.json"] = MetaFile(pub.targets.signed.version, len(tbytes),
                                                         {"sha256": hashlib.sha256(tbytes).hexdigest()})
    pub.snapshot.signed.version += 10
    sbytes = tuf_publish._signed(pub.snapshot, keys.for_role(pub.root.signed, "snapshot"), 1, "snapshot")
    fleet.put(f"tuf/metadata/{pub.targets.signed.version}.targets.json", tbytes)
    fleet.put(f"tuf/metadata/{pub.snapshot.signed.version}.snapshot.json", sbytes)
    tuf_publish._write_timestamp(objects, keys, pub, pub.snapshot.signed.version, sbytes)
    _refused(caplog, fleet.device("device-2"), conv_model_b, "tier_untrusted")


def test_rotated_root_is_followed_and_a_forged_root_refused(fleet: Fleet, conv_model: Path, conv_model_b: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    shipped = fleet.tmp / "app-root-v1.json"
    shutil.copy(fleet.root, shipped)  # the app ships root v1 and is never updated
    objects = fleet.tier().tuf_objects()
    old_root_key = tuf_publish.own_root(tuf_publish.load_keys(fleet.keys_dir)).signed.roles["root"].keyids[0]
    assert tuf_publish.rotate(objects, fleet.keys_dir, fleet.url, "root", revoke=[old_root_key]) == 2
    assert tuf_publish.rotate(objects, fleet.keys_dir, fleet.url, "timestamp") == 3
    _build(fleet, conv_model)
    device = fleet.device(root=shipped)
    assert device.load(conv_model, providers=P).tier == "remote"  # v1 -> v2 -> v3, each signed by old and new
    # A root v4 signed only by a key nobody trusts.
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, Root

    forged = Metadata.from_bytes(fleet.get("tuf/metadata/3.root.json"))
    evil = CryptoSigner.generate_ed25519()
    assert isinstance(forged.signed, Root)
    forged.signed.version = 4
    for role in ("root", "targets", "snapshot", "timestamp"):
        for kid in list(forged.signed.roles[role].keyids):
            forged.signed.revoke_key(kid, role)
        forged.signed.add_key(evil.public_key, role)
    forged.sign(evil)
    fleet.put("tuf/metadata/4.root.json", forged.to_bytes())
    _refused(caplog, fleet.device("device-2", root=shipped), conv_model_b, "tier_untrusted")


@pytest.fixture
def threshold_fleet(fleet: Fleet) -> Fleet:
    """The same store, re-initialised with two targets keys and a threshold of 2."""
    fresh = fleet.tmp / "tuf-keys-2"
    url = fleet.url + "/t2"  # init refuses a store that has a root already: a new prefix
    root = tuf_publish.init(RemoteTier(url, endpoint_url=fleet.endpoint).tuf_objects(), fresh, url,
                            thresholds={"targets": 2})
    return Fleet(url, fleet.endpoint, fresh, root, fleet.build_key, fleet.tmp)


def test_threshold_not_met_is_refused(threshold_fleet: Fleet, conv_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet = threshold_fleet
    key_file = fleet.keys_dir / "targets-2.key"
    moved = fleet.tmp / "targets-2.key.offline"
    shutil.move(key_file, moved)  # the second targets key holder is away
    cache, tier = fleet.builder()
    with caplog.at_level(logging.WARNING, logger="ctxcache"):
        r = cache.load(conv_model, providers=P)
    assert r.outcome == "miss"  # the builder's own app is unaffected; the publication is refused
    assert "needs 2 signature(s)" in caplog.text
    # An attacker with that one key publishes anyway (the record is in the store: the push got that far).
    objects = tier.tuf_objects()
    keys = tuf_publish.load_keys(fleet.keys_dir)
    pub = tuf_publish.current(objects, tuf_publish.own_root(keys))
    from tuf.api.metadata import MetaFile, TargetFile

    raw = fleet.get(f"v1/{r.key}/record.json")
    sha = hashlib.sha256(raw).hexdigest()
    fleet.put(f"v1/{r.key}/{sha}.record.json", raw)
    pub.targets.signed.targets[f"{r.key}/record.json"] = TargetFile.from_data(f"{r.key}/record.json", raw, ["sha256"])
    pub.targets.signed.version += 1
    tbytes = tuf_publish._signed(pub.targets, keys.for_role(pub.root.signed, "targets"), 1, "targets")
    pub.snapshot.signed.meta["targets.json"] = MetaFile(pub.targets.signed.version, len(tbytes),
                                                         {"sha256": hashlib.sha256(tbytes).hexdigest()})
    pub.snapshot.signed.version += 1
    sbytes = tuf_publish._signed(pub.snapshot, keys.for_role(pub.root.signed, "snapshot"), 1, "snapshot")
    fleet.put(f"tuf/metadata/{pub.targets.signed.version}.targets.json", tbytes)
    fleet.put(f"tuf/metadata/{pub.snapshot.signed.version}.snapshot.json", sbytes)
    tuf_publish._write_timestamp(objects, keys, pub, pub.snapshot.signed.version, sbytes)
    _refused(caplog, fleet.device(), conv_model, "tier_untrusted")
    # The publisher, keys back, will not build on what the attacker wrote (it would re-sign it).
    shutil.move(moved, key_file)
    from ctxcache._store import Store

    with pytest.raises(ctxcache.errors.TierError, match="not signed by this publisher's keys"):
        tier.push(Store(cache.root).lookup(r.key), overwrite=True)  # type: ignore[arg-type]


def test_unreachable_store_costs_one_timeout(tmp_path: Path, keys: dict[str, Any], conv_model: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """No server at all: the TUF refresh fails fast as tier_unreachable and the load compiles."""
    (tmp_path / "k").mkdir()
    store = tmp_path / "store"
    store.mkdir()
    root = tuf_publish.init(RemoteTier(store.as_uri()).tuf_objects(), tmp_path / "k", store.as_uri())
    tier = RemoteTier("s3://nobucket/x", endpoint_url="http://127.0.0.1:9", tuf_root=root, timeout=0.5)
    device = ctxcache.ContextCache(tmp_path / "device", tiers=[tier], trusted_keys=[keys["a"].public_key])
    _refused(caplog, device, conv_model, "tier_unreachable")


def test_a_batch_of_pushes_is_one_publication(fleet: Fleet, conv_model: Path, conv_model_b: Path) -> None:
    """A farm's run: entries pushed inside tuf_batch() appear together, in one new targets version."""
    local = ctxcache.ContextCache(fleet.tmp / "farm")
    built = [local.load(m, providers=P) for m in (conv_model, conv_model_b)]
    tier = fleet.tier(signing_key=fleet.build_key.path, tuf_keys=fleet.keys_dir)
    from ctxcache._store import Store

    store = Store(local.root)
    with tier.tuf_batch():
        for r in built:
            assert tier.push(store.lookup(r.key))  # type: ignore[arg-type]
        # Uploaded, not yet published: a TUF device does not see them.
        assert json.loads(fleet.get("tuf/metadata/timestamp.json"))["signed"]["version"] == 1
    assert json.loads(fleet.get("tuf/metadata/timestamp.json"))["signed"]["version"] == 2
    listed = json.loads(fleet.get("tuf/metadata/2.targets.json"))["signed"]["targets"]
    assert sorted(listed) == sorted(f"{r.key}/record.json" for r in built)
    device = fleet.device()
    assert [device.load(m, providers=P).tier for m in (conv_model, conv_model_b)] == ["remote", "remote"]


def test_an_installed_entry_the_store_revoked_is_not_served_at_the_next_hit(tmp_path: Path, keys: dict[str, Any],
                                                                             conv_model: Path) -> None:
    (tmp_path / "store").mkdir()
    url = (tmp_path / "store").as_uri()
    root = RemoteTier(url).tuf_init(tmp_path / "tuf-keys")
    fleet = Fleet(url, None, tmp_path / "tuf-keys", Path(root), keys["a"], tmp_path)
    built = _build(fleet, conv_model)
    device = fleet.device()
    assert device.load(conv_model, providers=P).tier == "remote"
    RemoteTier(url).tuf_remove(fleet.keys_dir, [built.key])  # type: ignore[list-item]
    assert device.tiers[0].tuf_refresh() == 3  # type: ignore[attr-defined]
    r = device.load(conv_model, providers=P)
    assert r.outcome != "hit", r  # the revoked entry is quarantined; the model compiles here
    assert first_outputs(r) == jit_outputs(conv_model)


PUBLISHER = """
import json, sys
from ctxcache import RemoteTier, _tuf_publish
url, endpoint, keys, who = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
tier = RemoteTier(url, endpoint_url=endpoint)
for i in range(3):
    key = f"{who:016x}{i:016x}"
    _tuf_publish.publish(tier.tuf_objects(), _tuf_publish.load_keys(keys), url, add={key: json.dumps([who, i]).encode()})
"""


def test_publishers_in_several_processes_lose_no_entry(fleet: Fleet) -> None:
    """Four build processes publishing at once (a farm's workers): every entry ends up listed, and the
    store's metadata verifies for a device."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, fleet.url, fleet.endpoint or "", str(fleet.keys_dir), str(w)])
             for w in range(4)]
    assert [p.wait(300) for p in procs] == [0, 0, 0, 0]
    tier = fleet.tier(tuf_root=fleet.root)
    (fleet.tmp / "device").mkdir(mode=0o700)
    tier.attach(fleet.tmp / "device")
    tier.tuf_refresh()
    listed = json.loads((tufmod.state_folder(fleet.tmp / "device", fleet.url) / "targets.json").read_text())["signed"]["targets"]
    assert sorted(listed) == sorted(f"{w:016x}{i:016x}/record.json" for w in range(4) for i in range(3))


def test_hostile_files_in_the_device_tuf_state_never_block_a_load(tmp_path: Path, keys: dict[str, Any],
                                                                   conv_model: Path) -> None:
    """FIFOs, a link and junk where the device keeps its TUF state: read through the guarded helpers (no
    blocking open, no link followed), treated as absent, replaced by verified metadata."""
    import os

    (tmp_path / "store").mkdir()
    url = (tmp_path / "store").as_uri()
    root = RemoteTier(url).tuf_init(tmp_path / "tuf-keys")
    fleet = Fleet(url, None, tmp_path / "tuf-keys", Path(root), keys["a"], tmp_path)
    _build(fleet, conv_model)
    device = fleet.device()
    state = tufmod.state_folder(device.root, url)
    state.mkdir(parents=True, mode=0o700)
    os.chmod(state.parent, 0o700)
    os.mkfifo(state / "timestamp.json")
    os.mkfifo(state / "targets.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", state / "snapshot.json")
    (state / "root.2.json").write_bytes(b"\\x00junk")
    start = time.monotonic()
    r = device.load(conv_model, providers=P)
    assert time.monotonic() - start < 60
    assert (r.outcome, r.tier) == ("hit", "remote")
    assert (tmp_path / "elsewhere.json").read_text() == "{}"  # the link was replaced, never written through
    origin = json.loads((r.entry_path / "manifest.json").read_text())["origin"]  # type: ignore[operator]
    assert tufmod.still_trusted(origin, device.root) is None
