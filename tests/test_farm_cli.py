"""``ctxcache farm`` as a user's shell runs it (fresh processes, no PYTHONUNBUFFERED), on the real QNN
compiler and a ``file://`` store: device -> plan -> run -> rerun, the progress line on stderr, the
summary, exit codes, and what is refused before any work starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_farm_plan import _cli

from ctxcache import models

pytest.importorskip("fsspec", reason="the farm's store tests use the remote tier on a file:// URL (fsspec)")


def test_device_plan_run_rerun_from_the_command_line(tmp_path: Path, keys: dict[str, Any]) -> None:
    m = [models.conv_net(tmp_path / f"m{i}.onnx", layers=3, channels=16, seed=60 + i) for i in range(2)]
    store = (tmp_path / "store").as_uri()
    devices, plan = tmp_path / "devices.json", tmp_path / "plan.json"
    for name, soc, arch in (("a", "60", "73"), ("b", "69", "75")):
        assert _cli("farm", "device", "--name", name, "-o", f"soc_model={soc}", "-o", f"htp_arch={arch}", "--out",
                    str(devices), "--append", "--cache-dir", str(tmp_path / "c")).returncode == 0
    p = _cli("farm", "plan", *map(str, m), "--devices", str(devices), "--store", store, "--out", str(plan))
    assert p.returncode == 0, p.stderr
    assert "4 of 4 cells to build" in p.stdout

    no_key = _cli("farm", "run", str(plan))
    assert no_key.returncode == 2 and "must be signed" in no_key.stderr

    r = _cli("farm", "run", str(plan), "--signing-key-file", str(keys["a"].path), "-j", "2")
    assert r.returncode == 0, r.stderr
    progress = [line for line in r.stderr.splitlines() if line.startswith("farm: ")]
    assert progress and progress[-1].startswith("farm: 4/4 cells  built 4  present 0  failed 0  left 0")
    assert r.stdout.count(" built ") == 4 and "4 built, 0 already in the store, 0 failed" in r.stdout

    again = _cli("farm", "run", str(plan), "--signing-key-file", str(keys["a"].path), "--format", "json")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["counts"] == {"built": 0, "present": 4, "failed": 0}
    assert all(c["attempts"] == 0 for c in doc["cells"])  # answered by the store, no worker started
    replan = _cli("farm", "plan", *map(str, m), "--devices", str(devices), "--store", store)
    assert "0 of 4 cells to build (the store holds 4)" in replan.stdout


def test_a_failing_cell_makes_exit_1_with_its_reason_and_a_bare_farm_is_usage(tmp_path: Path, keys: dict[str, Any]) -> None:
    m = models.conv_net(tmp_path / "m.onnx", layers=3, channels=16, seed=70)
    devices, plan = tmp_path / "devices.json", tmp_path / "plan.json"
    assert _cli("farm", "device", "--name", "a", "--out", str(devices), "--cache-dir", str(tmp_path / "c")).returncode == 0
    assert _cli("farm", "plan", str(m), "--devices", str(devices), "--out", str(plan)).returncode == 0
    shutil.move(m, tmp_path / "moved.onnx")
    r = _cli("farm", "run", str(plan), "--store", (tmp_path / "store").as_uri(), "--signing-key-file",
             str(keys["a"].path), "--retries", "1")
    assert r.returncode == 1
    row = next(line for line in r.stdout.splitlines() if line.startswith("m.onnx"))
    assert " failed " in row and " 2 " in row and "not found" in row
    assert _cli("farm").returncode == 2
    bad = _cli("farm", "run", str(plan), "--store", "builds/ctx", "--signing-key-file", str(keys["a"].path))
    assert bad.returncode == 2 and "a store is a URL" in bad.stderr
