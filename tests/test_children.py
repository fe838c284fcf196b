"""Child processes never import another user's code (reliability guarantee 17).

Every child ctxcache starts (the crash-marker probe, the background worker, ``warm --detach`` /
``ctxcache.warm_detached``, the ``warm --jobs`` workers) starts isolated: nothing from the working
directory of the app, and nothing from a folder another user can write, is importable. Each test plants
modules that the child would import first (``json.py``, ``ctxcache/``, ``multiprocessing/``,
``onnxruntime.py``...) in the working directory, each writing a marker file when imported, and runs the
real child from there with the real QNN provider.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import QNN, ROOT

import ctxcache
from ctxcache import _probe, _spawn, models

PLANTED = ("json.py", "runpy.py", "onnxruntime.py", "ctxcache/__init__.py", "ctxcache/__main__.py",
           "multiprocessing/__init__.py", "numpy.py", "sitecustomize.py", "usercustomize.py")


def _plant(folder: Path, marker: Path) -> None:
    for rel in PLANTED:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"open({str(marker)!r}, 'a').write({rel!r} + '\\n')\n")


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A working directory full of planted modules, made the current one; returns (folder, marker)."""
    folder = tmp_path / "hostile-cwd"
    marker = tmp_path / "IMPORTED"
    _plant(folder, marker)
    monkeypatch.chdir(folder)
    return folder, marker


def _console(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "ctxcache"
    assert script.exists(), "the ctxcache console script of this venv"
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_probe_imports_nothing_from_the_working_directory(planted: tuple[Path, Path], tmp_path: Path,
                                                             conv_model: Path, qnn_providers: list[Any]) -> None:
    _folder, marker = planted
    r = ctxcache.ContextCache(tmp_path / "cache").load(conv_model, providers=qnn_providers)
    assert r.outcome == "miss"
    verdict, detail = _probe.probe(Path(r.session._model_path), QNN, dict(qnn_providers[0][1]))  # type: ignore[attr-defined]
    assert verdict == "loads", detail
    assert not marker.exists(), marker.read_text()


def test_the_background_worker_imports_nothing_from_the_working_directory(
        planted: tuple[Path, Path], tmp_path: Path, rel_models: list[Path], qnn_providers: list[Any]) -> None:
    _folder, marker = planted
    cache = ctxcache.ContextCache(tmp_path / "cache", on_miss="background")
    r = cache.load(rel_models[0], providers=qnn_providers)
    assert r.outcome == "pending", r.reason
    assert r.ready(120), "the worker published nothing"
    assert cache.load(rel_models[0], providers=qnn_providers).outcome == "hit"
    assert not marker.exists(), marker.read_text()


def test_warm_detached_imports_nothing_from_the_working_directory(
        planted: tuple[Path, Path], tmp_path: Path, conv_model: Path, qnn_providers: list[Any]) -> None:
    _folder, marker = planted
    proc = ctxcache.warm_detached(conv_model, qnn_providers, cache_dir=tmp_path / "cache", log=tmp_path / "warm.log")
    assert proc.pid > 0 and proc.log == tmp_path / "warm.log"
    assert proc.wait(300) == 0, proc.log.read_text()[-3000:]
    summary = proc.result()
    assert summary is not None and summary["compiled"] == 1, proc.log.read_text()[-3000:]
    assert ctxcache.ContextCache(tmp_path / "cache").load(conv_model, providers=qnn_providers).outcome == "hit"
    assert not marker.exists(), marker.read_text()


def test_cli_warm_detach_and_jobs_import_nothing_from_the_working_directory(
        planted: tuple[Path, Path], tmp_path: Path) -> None:
    folder, marker = planted
    a = models.conv_net(tmp_path / "m" / "a.onnx", layers=2, channels=8, seed=11)
    b = models.conv_net(tmp_path / "m" / "b.onnx", layers=2, channels=8, seed=12)
    # --jobs 2: one isolated child per model (a multiprocessing spawn pool imported multiprocessing from here).
    proc = _console("warm", "../m", "--jobs", "2", "--cache-dir", "../jobs-cache", "--format", "json", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["compiled"] == 2, summary
    # --detach: relative paths are resolved by the caller, the child runs elsewhere.
    log = tmp_path / "detach.log"
    proc = _console("warm", "../m/a.onnx", "--detach", "--cache-dir", "../detach-cache", "--log", str(log),
                    "--format", "json", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid = json.loads(proc.stdout)["pid"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and '"exit_code"' not in log.read_text():
        time.sleep(0.1)
    assert '"compiled": 1' in log.read_text(), log.read_text()[-3000:]
    assert pid > 0
    for model, where in ((a, "jobs-cache"), (b, "jobs-cache"), (a, "detach-cache")):
        r = ctxcache.ContextCache(tmp_path / where).load(model, providers=[(QNN, models.qnn_htp_options())])
        assert r.outcome == "hit", (model, where)
    assert not marker.exists(), marker.read_text()


def test_a_path_folder_another_user_can_write_is_not_passed_to_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's own sys.path travels to the child explicitly (venvs, editable installs, embedded
    runtimes with a custom path keep working), minus the working directory and minus any folder
    another user could change."""
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    (own / "appmod.py").write_text("VALUE = 42\n")
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    below = open_to_all / "sub"
    below.mkdir(mode=0o755)  # ours, but inside a folder others can write: they can swap it
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", ["", str(cwd), str(own), str(open_to_all), str(theirs), str(below), *sys.path])
    paths = _spawn.import_path()
    assert str(own) in paths
    for bad in ("", str(cwd), str(open_to_all), str(theirs), str(below)):
        assert bad not in paths, bad
    # And the child really imports from the explicit path (a custom sys.path, as an embedded runtime has).
    cmd = _spawn.python_command()
    assert cmd is not None
    out = subprocess.run([*cmd, "-c", "import appmod, sys; print(appmod.VALUE, sys.argv[1:])", "x"], capture_output=True,
                         text=True, env=_spawn.child_env(), cwd=_spawn.child_cwd(), timeout=60)
    assert out.returncode == 0 and out.stdout.split()[0] == "42", out.stderr


def test_a_frozen_app_says_why_it_cannot_detach(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, conv_model: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    with pytest.raises(ctxcache.errors.DetachError) as e:
        ctxcache.warm_detached(conv_model, cache_dir=tmp_path / "cache")
    assert "frozen" in e.value.reason and "warm in this process" in str(e.value)
    assert not (tmp_path / "cache").exists()
    from ctxcache.cli import main

    assert main(["warm", str(conv_model), "--detach", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert not (tmp_path / "cache").exists()
    # --jobs: no worker process either; the models are warmed in this process, and it says so.
    b = models.conv_net(tmp_path / "b.onnx", layers=2, channels=8, seed=21)
    assert main(["warm", str(conv_model), str(b), "--jobs", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "serially" in err and "frozen" in err, err
    assert len(ctxcache.ContextCache(tmp_path / "cache").entries()) == 2


def test_child_bootstrap_keeps_module_and_code_arguments(tmp_path: Path) -> None:
    cmd = _spawn.python_command()
    assert cmd is not None
    proc = subprocess.run([*cmd, "-m", "ctxcache", "--version"], capture_output=True, text=True, timeout=120,
                          cwd=_spawn.child_cwd(), env=_spawn.child_env())
    assert proc.returncode == 0 and proc.stdout.startswith("ctxcache "), proc.stderr
    assert str(ROOT) in _spawn.import_path() or any(Path(p, "ctxcache").is_dir() for p in _spawn.import_path())


def test_an_embedded_runtime_with_pythonhome_still_starts_isolated_children(
        planted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """-I would ignore $PYTHONHOME, which an embedded runtime may need to find its standard library."""
    _folder, marker = planted
    monkeypatch.setenv("PYTHONHOME", f"{sys.base_prefix}{os.pathsep}{sys.base_exec_prefix}")
    monkeypatch.setenv("PYTHONPATH", str(_folder))  # the app's own setting: not a way in for the child
    cmd = _spawn.python_command()
    assert cmd is not None and "-I" not in cmd[:3]
    proc = subprocess.run([*cmd, "-c", "import json, ctxcache, sys; print(json.dumps(sys.argv[1:]))", "a"],
                          capture_output=True, text=True, env=_spawn.child_env(), cwd=_spawn.child_cwd(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == '["a"]'
    assert not marker.exists(), marker.read_text()
