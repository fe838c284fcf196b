"""The fleet build end to end, all real: a Dask distributed LocalCluster (worker processes) on 127.0.0.1,
an S3 server (moto's server mode), the QNN compiler. 3 models x 2 device classes are planned and run; a
worker is SIGKILLed in the middle of a compile; the store has no trace of that cell; a rerun compiles
only what is missing; then a fresh "device" process per class loads every model from the store (no
compile) with outputs equal to plain ONNX Runtime's. A push cut before its record (the last object) is
no entry: devices and the planner both see the cell as missing, and a rerun completes it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed", reason="the farm's Dask engine tests need the 'farm' extra: pip install -e '.[farm,test]'")
pytest.importorskip("boto3", reason="the farm publishes to the remote tier: pip install -e '.[remote,test]'")
pytest.importorskip("moto.server", reason="a local S3 server needs moto[server] (in the 'test' extra)")

from conftest import QNN, run_python
from test_tiers_remote import CREDS, S3Server

import ctxcache
from ctxcache import farm, models

CLASSES = {"sd-60-73": ("60", "73"), "sd-69-75": ("69", "75")}


def opts(soc: str, arch: str) -> dict[str, str]:
    return dict(models.qnn_htp_options(), soc_model=soc, htp_arch=arch)


@pytest.fixture(autouse=True)
def _creds(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """2 Dask worker processes on 127.0.0.1 with the credentials; a worker that dies fails its task at once
    (allowed-failures 0: the farm's own retries decide), and their temporary folders in a place we watch."""
    import dask
    from distributed import LocalCluster

    work_tmp = tmp_path / "worker-tmp"
    work_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(work_tmp))  # read by the spawned workers' tempfile
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None)
        c.work_tmp = work_tmp
        try:
            yield c
        finally:
            c.close()


def _store_objects(s3: S3Server, bucket: str, key: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"ctx/v1/{key}/")
    return [o["Key"] for o in resp.get("Contents", [])]


def _kill_when_compiling(cluster: Any, key: str, killed: dict[str, Any]) -> None:
    """SIGKILL the worker process compiling ``key``: its private cache's staging folder is named
    ``<key>.<pid>.<random>`` while the compile runs (before the entry exists, so before any upload)."""
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as client:
        worker_pids = set(client.run(os.getpid).values())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "pid" not in killed:
        for staging in cluster.work_tmp.glob(f"ctxcache-farm-cell-*/v1/staging/{key}.*"):
            pid = int(staging.name.split(".")[1])
            if pid in worker_pids:
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
        time.sleep(0.005)


DEVICE = """
import ctxcache
from _report import report
from ctxcache import models, RemoteTier
opts = dict(models.qnn_htp_options(), soc_model={soc!r}, htp_arch={arch!r})
cache = ctxcache.ContextCache({cache!r}, trusted_keys={trusted!r},
                              tiers=[RemoteTier({url!r}, endpoint_url={endpoint!r}, match="portable")])
out = {{}}
for m in {models_!r}:
    r = cache.load(m, providers=[("QNNExecutionProvider", opts)])
    again = cache.load(m, providers=[("QNNExecutionProvider", opts)])
    y = again.session.run(None, models.random_input(again.session, seed=7))[0]
    out[m] = {{"outcome": r.outcome, "tier": r.tier, "key": r.key, "compile": r.timings.compile,
              "again": again.outcome, "out": y.ravel()[:64].tolist()}}
report(out)
"""


def _plain(model: Path, soc: str, arch: str) -> list[float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = models.plain_qnn_session(model, so, opts(soc, arch))
    return [float(x) for x in sess.run(None, models.random_input(sess, seed=7))[0].ravel()[:64]]


def test_plan_run_kill_a_worker_rerun_then_devices_hit(tmp_path: Path, s3: S3Server, cluster: Any,
                                                       keys: dict[str, Any]) -> None:
    s3.client().create_bucket(Bucket="fleet-builds")
    url = "s3://fleet-builds/ctx"
    d = tmp_path / "models"
    fleet = [models.conv_net(d / "conv.onnx", layers=4, channels=16, seed=41),
             models.mobilenet_like(d / "mobile.onnx", seed=42),
             models.transformer_block(d / "block.onnx", d_model=512, d_ff=2048, seq=64, seed=43)]
    classes = [farm.this_device(name, QNN, opts(*so)) for name, so in CLASSES.items()]
    remote = ctxcache.RemoteTier(url, endpoint_url=s3.url, match="portable")
    plan = farm.plan(fleet, classes, remote=remote)
    assert len(plan.todo) == 6

    # Run 1 on Dask; the worker compiling the transformer block for the first class is killed mid-compile.
    target = next(c for c in plan.cells if c.model_name == "block.onnx" and c.device_class == "sd-60-73")
    killed: dict[str, Any] = {}
    killer = threading.Thread(target=_kill_when_compiling, args=(cluster, target.key, killed), daemon=True)
    killer.start()
    job = farm.Job(url, s3.url, str(keys["a"].path))
    engine = farm.DaskEngine(cluster.scheduler_address)
    seen: list[farm.Progress] = []
    try:
        first = farm.run(plan.cells, job, engine=engine, retries=0, progress=seen.append)
    finally:
        engine.close()
    killer.join(5)
    assert killed.get("pid"), "the compile of the target cell was never seen running"
    status = {r.cell.id: r for r in first.cells}
    assert status[target.id].result.status == "failed" and "KilledWorker" in str(status[target.id].result.error)
    assert sorted(r.result.status for r in first.cells) == ["built"] * 5 + ["failed"]
    assert seen and seen[-1].done == 6 and seen[-1].failed == 1
    # The killed cell left nothing in the store: not a record, not a file.
    assert _store_objects(s3, "fleet-builds", target.key) == []

    # Plan again: only the killed cell is left; a rerun builds just that one.
    replan = farm.plan(fleet, classes, remote=remote)
    assert [c.id for c in replan.todo] == [target.id]
    engine = farm.DaskEngine(cluster.scheduler_address)
    try:
        second = farm.run(replan.cells, job, engine=engine, retries=1)
    finally:
        engine.close()
    assert {r.cell.id: (r.result.status, r.attempts) for r in second.cells} == {
        c.id: (("built", 1) if c.id == target.id else ("present", 0)) for c in replan.cells}
    assert farm.plan(fleet, classes, remote=remote).todo == ()

    # A fresh device process per class: every model comes from the store (no compile), outputs = plain ORT.
    for name, (soc, arch) in CLASSES.items():
        code = DEVICE.format(soc=soc, arch=arch, cache=str(tmp_path / f"device-{name}"), trusted=[keys["a"].public_key],
                             url=url, endpoint=s3.url, models_=[str(m) for m in fleet])
        got = run_python(code, env=CREDS).result
        for m in fleet:
            cell = next(c for c in plan.cells if c.model == str(m) and c.device_class == name)
            r = got[str(m)]
            assert (r["outcome"], r["tier"], r["key"], r["compile"], r["again"]) == ("hit", "remote", cell.key, 0.0, "hit"), r
            assert r["out"] == _plain(m, soc, arch), (name, m.name)


def test_a_push_cut_before_its_record_is_no_entry(tmp_path: Path, s3: S3Server, keys: dict[str, Any]) -> None:
    s3.client().create_bucket(Bucket="fleet-cut")
    url = "s3://fleet-cut/ctx"
    model = models.conv_net(tmp_path / "net.onnx", layers=3, channels=16, seed=44)
    a = farm.this_device("a", QNN, opts("60", "73"))
    remote = ctxcache.RemoteTier(url, endpoint_url=s3.url, match="portable")
    job = farm.Job(url, s3.url, str(keys["a"].path))
    engine = farm.LocalEngine(jobs=1)
    try:
        (built,) = farm.run(farm.plan([model], [a]).cells, job, engine=engine).cells
        assert built.result.status == "built"
        # What a worker killed between its uploads and the record leaves: files and signatures, no record
        # (and no portable pointer, which the push writes after the record).
        s3.client().delete_object(Bucket="fleet-cut", Key=f"ctx/v1/{built.cell.key}/record.json")
        s3.client().delete_object(Bucket="fleet-cut", Key=f"ctx/v1/portable/{built.cell.portable_key}/{built.cell.key}")
        assert len(_store_objects(s3, "fleet-cut", built.cell.key)) >= 3
        assert farm.plan([model], [a], remote=remote).todo[0].key == built.cell.key
        code = DEVICE.format(soc="60", arch="73", cache=str(tmp_path / "device"), trusted=[keys["a"].public_key],
                             url=url, endpoint=s3.url, models_=[str(model)])
        r = run_python(code, env=CREDS).result[str(model)]
        assert (r["outcome"], r["tier"]) == ("miss", None)  # compiled on the device: the half push was not served
        (again,) = farm.run(farm.plan([model], [a], remote=remote).cells, job, engine=engine).cells
    finally:
        engine.close()
    assert again.result.status == "built" and remote.has(built.cell.key)


def test_the_command_line_runs_a_plan_on_the_dask_scheduler(tmp_path: Path, s3: S3Server, cluster: Any,
                                                            keys: dict[str, Any]) -> None:
    import json

    from test_farm_plan import _cli

    s3.client().create_bucket(Bucket="fleet-cli")
    model = models.conv_net(tmp_path / "net.onnx", layers=3, channels=16, seed=45)
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps(farm.devices_document([farm.this_device(n, QNN, opts(*so)) for n, so in CLASSES.items()])))
    plan = tmp_path / "plan.json"
    common = ["--endpoint-url", s3.url]
    p = _cli("farm", "plan", str(model), "--devices", str(devices), "--store", "s3://fleet-cli/ctx", "--out", str(plan), *common)
    assert p.returncode == 0, p.stderr
    r = _cli("farm", "run", str(plan), "--signing-key-file", str(keys["a"].path), "--engine", "dask",
             "--scheduler", cluster.scheduler_address, *common)
    assert r.returncode == 0, r.stderr
    assert "2 built, 0 already in the store, 0 failed" in r.stdout and " on dask" in r.stdout
    local = _cli("farm", "run", str(plan), "--signing-key-file", str(keys["a"].path), "--scheduler",
                 cluster.scheduler_address, *common)
    assert local.returncode == 2 and "--scheduler is for --engine dask" in local.stderr
