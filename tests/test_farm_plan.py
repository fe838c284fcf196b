"""The farm's plan and device side, with the real QNN compiler and a ``file://`` store: a device class
written on a device (a fresh process here) gives the key that device computes; cells are idempotent by
key; a cell this host cannot build for fails with its reason after bounded tries; a device report
carries key parts only and turns a version seen in the field into a new class and cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN, ROOT, run_python
from test_architecture import _imports, _modules

import ctxcache
from ctxcache import farm, models

pytest.importorskip("fsspec", reason="the farm's store tests use the remote tier on a file:// URL (fsspec)")


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The console command in a fresh process, as a user's shell runs it (no PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "ctxcache", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600, check=False)


def opts(soc: str, arch: str) -> dict[str, str]:
    return dict(models.qnn_htp_options(), soc_model=soc, htp_arch=arch)


@pytest.fixture(scope="module")
def fleet_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("farm-models")
    return [models.conv_net(d / f"net{i}.onnx", layers=3, channels=16, seed=30 + i) for i in range(2)]


def test_the_farm_uses_only_the_public_api_and_the_key_function() -> None:
    allowed = {"ctxcache", "ctxcache.errors", "ctxcache.models", "ctxcache.providers", "ctxcache._key",
               "ctxcache._fingerprint"}
    for m, targets in _imports(_modules()).items():
        if m.startswith("ctxcache.farm"):
            other = {t for t in targets if not t.startswith("ctxcache.farm") and t not in allowed}
            assert not other, (m, other)


def test_a_device_class_written_on_the_device_gives_the_key_that_device_computes(tmp_path: Path,
                                                                                   fleet_models: list[Path]) -> None:
    # The "device": a fresh process on this machine writes its class with the CLI, and loads the model.
    devices = tmp_path / "devices.json"
    for name, soc, arch in (("a", "60", "73"), ("b", "69", "75")):
        proc = _cli("farm", "device", "--name", name, "--preset", "qnn-htp", "-o", f"soc_model={soc}", "-o",
                    f"htp_arch={arch}", "--out", str(devices), "--append", "--cache-dir", str(tmp_path / "dev"))
        assert proc.returncode == 0, proc.stderr
    classes = farm.load_devices([devices])
    assert [c.name for c in classes] == ["a", "b"]
    plan = farm.plan(fleet_models, classes)
    assert len(plan.cells) == 4 and all(c.state == "todo" for c in plan.cells)
    code = """
    import ctxcache
    from _report import report
    from ctxcache import models
    cache = ctxcache.ContextCache({d!r})
    out = {{}}
    for m in {ms!r}:
        for name, soc, arch in (("a", "60", "73"), ("b", "69", "75")):
            o = dict(models.qnn_htp_options(), soc_model=soc, htp_arch=arch)
            out[m + "@" + name] = cache.load(m, providers=[("QNNExecutionProvider", o)]).key
    report(out)
    """
    device_keys = run_python(code.format(d=str(tmp_path / "dev2"), ms=[str(m) for m in fleet_models])).result
    assert {f"{c.model}@{c.device_class}": c.key for c in plan.cells} == device_keys
    # doctor's JSON from the device is a device file too: the same key.
    doctor = _cli("doctor", "--format", "json", "--preset", "qnn-htp", "-o", "soc_model=69", "-o", "htp_arch=75",
                  "--cache-dir", str(tmp_path / "dev"))
    (tmp_path / "doctor.json").write_text(doctor.stdout)
    (dc,) = farm.load_devices([tmp_path / "doctor.json"])
    (cell,) = farm.plan(fleet_models[:1], [dc]).cells
    assert cell.key == device_keys[f"{fleet_models[0]}@b"]


def test_a_hand_edited_plan_or_device_file_is_refused_by_name(tmp_path: Path, fleet_models: list[Path]) -> None:
    dc = farm.this_device("a", QNN, opts("60", "73"))
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(farm.plan(fleet_models[:1], [dc]).as_dict()))
    doc = json.loads(p.read_text())
    doc["cells"][0]["options"]["soc_model"] = "69"
    doc["cells"][0]["parts"][3][1]["soc_model"] = "69"  # ep_options, without recomputing the key
    p.write_text(json.dumps(doc))
    with pytest.raises(farm.FarmError, match="do not hash to its key") as e:
        farm.read_plan(p)
    assert e.value.path == str(p)
    bad = tmp_path / "devices.json"
    entry = dc.as_dict()
    del entry["env"]["ep_versions"]
    bad.write_text(json.dumps({"classes": [entry]}))
    with pytest.raises(farm.FarmError, match="lacks ep_versions") as e2:
        farm.load_devices([bad])
    assert str(bad) in str(e2.value)
    proc = _cli("farm", "plan", str(fleet_models[0]), "--devices", str(bad))
    assert proc.returncode == 2 and "lacks ep_versions" in proc.stderr


def _run(cells: Any, store: str, key: Path, retries: int = 1) -> farm.RunResult:
    engine = farm.LocalEngine(jobs=2)
    try:
        return farm.run(cells, farm.Job(store, signing_key=str(key)), engine=engine, retries=retries)
    finally:
        engine.close()


def test_cells_are_idempotent_by_key_and_a_failing_cell_is_tried_a_bounded_number_of_times(
        tmp_path: Path, fleet_models: list[Path], keys: dict[str, Any]) -> None:
    store = (tmp_path / "store").as_uri()
    a = farm.this_device("a", QNN, opts("60", "73"))
    gone = tmp_path / "gone.onnx"
    gone.write_bytes(fleet_models[1].read_bytes())
    plan = farm.plan([fleet_models[0], gone], [a])
    gone.unlink()  # the model vanishes between plan and run: that cell fails, every try, with its reason
    res = _run(plan.cells, store, keys["a"].path, retries=2)
    by_model = {r.cell.model_name: r for r in res.cells}
    assert by_model["net0.onnx"].result.status == "built" and by_model["net0.onnx"].attempts == 1
    failed = by_model["gone.onnx"]
    assert failed.result.status == "failed" and failed.attempts == 3 and len(failed.errors) == 3
    assert "not found" in str(failed.result.error) and not res.ok
    # A rerun: the built cell is in the store (asked again, no worker), nothing compiles.
    again = _run(plan.cells[:1], store, keys["a"].path)
    assert [(r.result.status, r.attempts) for r in again.cells] == [("present", 0)]
    remote = ctxcache.RemoteTier(store, match="portable")
    assert farm.plan(fleet_models[:1], [a], remote=remote).todo == ()


def test_a_version_seen_in_the_field_becomes_a_class_and_a_cell_this_host_refuses_to_fake(
        tmp_path: Path, fleet_models: list[Path], keys: dict[str, Any]) -> None:
    a = farm.this_device("a", QNN, opts("60", "73"))
    # A device compiled net0 itself (the store had nothing for it): its cache has an entry of its own.
    dev = ctxcache.ContextCache(tmp_path / "device")
    assert dev.load(fleet_models[0], providers=[(QNN, opts("60", "73"))]).outcome == "miss"
    report_path = tmp_path / "report.json"
    proc = _cli("farm", "report", "--out", str(report_path), "--cache-dir", str(tmp_path / "device"))
    assert proc.returncode == 0, proc.stderr
    text = report_path.read_text()
    report = json.loads(text)
    assert len(report["items"]) == 1
    # Key parts only: no model name, no path of the model, the cache or the EP libraries.
    for leak in ("net0", str(tmp_path), os.path.dirname(ctxcache.__file__), "onnxruntime_qnn/"):
        assert leak not in text, leak
    # The same device as class a: nothing new to plan.
    same = farm.plan(fleet_models[:1], [a], reports=farm.read_reports([str(report_path)]))
    assert [c.name for c in same.classes] == ["a"]
    # That device after an SDK update (the report edited as a newer device would write it).
    report["items"][0]["env"]["ep_versions"]["qnn_sdk"] = "2.52.0"
    report_path.write_text(json.dumps(report))
    proc = _cli("farm", "plan", str(fleet_models[0]), "--reports", str(report_path), "--out", str(tmp_path / "plan.json"),
                "--devices", str(_write_devices(tmp_path, [a])))
    assert proc.returncode == 0, proc.stderr
    assert "differs from class a in: ep_versions.qnn_sdk 2.51.0 -> 2.52.0" in proc.stdout
    plan = farm.read_plan(tmp_path / "plan.json")
    assert len(plan.classes) == 2 and len(plan.cells) == 2
    field_cell = next(c for c in plan.cells if c.device_class != "a")
    res = _run([field_cell], (tmp_path / "store").as_uri(), keys["a"].path, retries=0)
    (r,) = res.cells
    # This host runs QNN SDK 2.51.0: building it here would publish a context its devices do not key on.
    assert r.result.status == "failed" and "ep_versions.qnn_sdk 2.51.0 -> 2.52.0" in str(r.result.error)
    assert r.result.compile_seconds == 0.0 and r.result.built_key is None  # refused before spending a compile
    assert ctxcache.RemoteTier((tmp_path / "store").as_uri()).keys() == []


def _write_devices(tmp_path: Path, classes: list[farm.DeviceClass]) -> Path:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(farm.devices_document(classes)))
    return path


def test_a_class_of_another_host_is_built_here_and_held_portably_while_its_record_is(
        tmp_path: Path, fleet_models: list[Path], keys: dict[str, Any]) -> None:
    here = farm.this_device("x86", QNN, opts("60", "73"))
    # An ARM device of the same SDK: only the parts that describe the machine a context is compiled ON differ.
    env = dict(here.env, host="linux-aarch64", ep_libraries={"libQnnHtp.so": "0" * 32}, devices=[{"type": "NPU"}])
    arm = farm.DeviceClass("arm", here.provider, here.options, env)
    (cell,) = farm.plan(fleet_models[:1], [arm]).cells
    store = (tmp_path / "store").as_uri()
    (built,) = _run([cell], store, keys["a"].path).cells
    assert built.result.status == "built" and built.result.built_key != cell.key  # published under this host's key
    remote = ctxcache.RemoteTier(store, match="portable")
    (held,) = farm.plan(fleet_models[:1], [arm], remote=remote).cells
    assert (held.state, held.held) == ("done", "portable")
    # The record removed from the store by hand: its portable pointer stays, but the cell is not held.
    (tmp_path / "store" / "v1" / str(built.result.built_key) / "record.json").unlink()
    (again,) = farm.plan(fleet_models[:1], [arm], remote=remote).cells
    assert (again.state, again.held) == ("todo", None)


@pytest.mark.parametrize("option", [{"op_packages": "Relu:/tmp/evil.so:Iface"}, {"backend_path": "/tmp/evil.so"},
                                    {"qnn_saver_path": "saver"}, {"soc_model": "../../60"}, {"json_qnn_graph_dir": "x"},
                                    {"htp_arch": "73\n"}])
def test_a_field_report_cannot_make_build_hosts_load_or_write_files(tmp_path: Path, fleet_models: list[Path],
                                                                     option: dict[str, str]) -> None:
    a = farm.this_device("a", QNN, opts("60", "73"))
    item = {"key": "0" * 32, "model_digest": "x", "provider": QNN, "options": dict(a.options, **option),
            "env": dict(a.env, ep_versions={"qnn_sdk": "9.9.9"}), "settings": {}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"format": 1, "kind": "ctxcache-farm-report", "items": [item]}))
    items = farm.read_reports([str(path)])
    digest = ctxcache.ContextCache(tmp_path / "c").key(fleet_models[0], providers=[(QNN, opts("60", "73"))])
    assert digest is not None
    items[0]["model_digest"] = digest.get("model")
    with pytest.raises(farm.FarmError, match="not a plain value") as e:
        farm.plan(fleet_models[:1], [a], reports=items)
    assert e.value.path == str(path)
