"""The command line, in-process (``main([...])``) and as the installed console script, against the real
QNN compiler: warm-up across worker processes followed by app launches that must all hit, exit codes,
management commands on real damaged and foreign entries, and the README's ``ctxcache demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from conftest import QNN, ROOT, layout, run_python

from ctxcache import ContextCache, models
from ctxcache.cli import main

COMMANDS = ["demo", "warm", "ls", "explain", "verify", "prune", "clear", "stats", "doctor"]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, err = run_main(capsys, *argv, "--format", "json")
    try:
        return code, json.loads(out)
    except ValueError:
        raise AssertionError(f"stdout is not JSON (exit {code}):\n{out}\nstderr:\n{err}") from None


def cli(*argv: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script in a fresh process (falls back to ``python -m ctxcache`` if not installed)."""
    script = Path(sys.executable).parent / "ctxcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 | 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def warm_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three different models, one with external data, one in a subfolder."""
    d = tmp_path_factory.mktemp("warm-models")
    models.conv_net(d / "a.onnx", layers=3, channels=16, seed=11)
    models.conv_net(d / "b.onnx", layers=4, channels=8, seed=12)
    models.conv_net(d / "sub" / "c.onnx", layers=3, channels=32, seed=13, external_data=True)
    return d


# -- help, usage --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert "example:" in out and f"ctxcache {command}" in out.split("example:", 1)[1]


def test_top_level_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for c in COMMANDS:
        assert f"\n    {c} " in out
    assert "exit codes:" in out and "130" in out


def test_no_command_and_unknown_flag_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, )[0] == 2
    assert run_main(capsys, "ls", "--no-such-flag")[0] == 2
    assert run_main(capsys, "frobnicate")[0] == 2


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["warm", "{missing}"], "model not found"),
        (["warm", "{models}/*.nothing"], "no file matches"),
        (["warm", "{models}", "--provider", "qnnn"], "unknown execution provider 'qnnn'; did you mean qnn"),
        (["warm", "{models}", "--preset", "qnn-htp", "-o", "soc_modell=60"], "did you mean 'soc_model'"),
        (["warm", "{models}", "-o", "soc_modell=60"], "did you mean 'soc_model'"),  # -o alone: the default preset's
        (["warm", "{models}", "--provider", "cpu"], "compiles no context"),
        (["warm"], "nothing to warm"),
        (["warm", "--plan", "{missing}"], "cannot read plan"),
        (["prune", "--max-size", "lots"], "cannot read size"),
        (["prune", "--older-than", "30"], "cannot read duration"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_touches_no_cache(
    argv: list[str], needle: str, warm_models: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(models=warm_models, missing=tmp_path / "missing.onnx") for a in argv]
    code, out, err = run_main(capsys, *args, "--cache-dir", str(cache_dir))
    assert code == 2, (out, err)
    assert needle in err
    assert "Traceback" not in err
    assert not cache_dir.exists()


def test_errors_show_a_traceback_only_with_ctxcache_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.onnx")
    plain = cli("explain", missing)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and "model file not found" in plain.stderr
    debug = cli("explain", missing, env={"CTXCACHE_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr


# -- warm ---------------------------------------------------------------------------------------------
LAUNCH_ALL = """
import json, ctxcache
from _report import report
from ctxcache import models
cache = ctxcache.ContextCache({cache_dir!r})
out = {{}}
for m in {models!r}:
    r = cache.load(m, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
    r.session.run(None, models.random_input(r.session))
    out[m] = [r.outcome, r.providers[0]]
report(out)
"""


def test_warm_multi_model_multi_job_then_every_app_launch_hits(
    warm_models: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, summary = run_json(capsys, "warm", str(warm_models), "--jobs", "2", "--cache-dir", str(cache_dir))
    assert code == 0, summary
    assert (summary["total"], summary["compiled"], summary["cached"], summary["failed"]) == (3, 3, 0, 0)
    # Compiled in worker processes, not in this one (its QNN plugin was never asked to compile).
    assert {r["status"] for r in summary["results"]} == {"compiled"}
    paths = sorted(r["model"] for r in summary["results"])
    assert [Path(p).name for p in paths] == ["a.onnx", "b.onnx", "c.onnx"]

    # The application, in a fresh process, with its own ordinary call: a hit for every model.
    proc = run_python(LAUNCH_ALL.format(cache_dir=str(cache_dir), models=paths))
    launched = proc.result
    assert launched == {p: ["hit", QNN] for p in paths}
    # Counted across the worker processes and the app's process, into one log.
    code, st = run_json(capsys, "stats", "--cache-dir", str(cache_dir))
    assert (st["misses"], st["hits"], st["fallbacks"], st["bypasses"]) == (3, 3, 0, 0)
    assert st["saved_seconds"] > 0

    # Idempotent: a second warm compiles nothing.
    code, again = run_json(capsys, "warm", str(warm_models), "--jobs", "2", "--cache-dir", str(cache_dir))
    assert code == 0
    assert (again["compiled"], again["cached"]) == (0, 3)
    assert len(ContextCache(cache_dir).entries()) == 3


def test_warm_console_script_json_is_clean_and_failure_exit_code(warm_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    shutil.copytree(warm_models, folder)
    (folder / "broken.onnx").write_bytes(b"this is not an onnx model at all")
    cache = tmp_path / "c"
    proc = cli("warm", str(folder), "-j", "2", "--cache-dir", str(cache), "--format", "json")
    summary = json.loads(proc.stdout)  # native libraries' chatter must not reach stdout
    # A file that is not a model is bad input (exit 2, as `explain` says of it), not a failed compile (1).
    assert proc.returncode == 2, proc.stderr
    assert (summary["compiled"], summary["failed"], summary["exit_code"]) == (3, 1, 2)
    failed = [r for r in summary["results"] if r["status"] == "failed"]
    assert Path(failed[0]["model"]).name == "broken.onnx" and "InvalidModelError" in failed[0]["reason"]
    # The others are cached regardless, and plain output says so line by line.
    plain = cli("warm", str(folder), "--cache-dir", str(cache))
    assert plain.returncode == 2
    lines = plain.stdout.strip().splitlines()
    assert sum(line.startswith("cached ") for line in lines) == 3
    assert sum(line.startswith("failed ") for line in lines) == 1
    assert lines[-1].startswith("warmed 3 of 4: 0 compiled, 3 already cached, 1 failed")


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_warm_plan_models_x_providers_x_options(
    fmt: str, warm_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "toml":
        pytest.importorskip("tomllib")
        text = (
            'models = ["m/*.onnx"]\ncache_dir = "plan-cache"\njobs = 2\n'
            '[[providers]]\npreset = "qnn-htp"\n'
            'options = [{soc_model = 60, htp_arch = 73}, {soc_model = 69, htp_arch = 79}]\n'
        )
    else:
        text = json.dumps({
            "targets": [{"models": ["m/a.onnx", "m/b.onnx"], "providers": [
                {"preset": "qnn-htp", "options": [{"soc_model": 60, "htp_arch": 73}, {"soc_model": 69, "htp_arch": 79}]}
            ]}],
            "cache_dir": "plan-cache",
        })
    (tmp_path / "m").mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(warm_models / name, tmp_path / "m" / name)
    plan = tmp_path / f"warm.{fmt}"
    plan.write_text(text)
    code, summary = run_json(capsys, "warm", "--plan", str(plan))
    assert code == 0, summary
    assert summary["cache_dir"] == str(tmp_path / "plan-cache")
    assert (summary["total"], summary["compiled"]) == (4, 4)
    entries = ContextCache(tmp_path / "plan-cache").entries()
    socs = sorted((e.model_name, e.parts["ep_options"]["soc_model"]) for e in entries)
    assert socs == [("a.onnx", "60"), ("a.onnx", "69"), ("b.onnx", "60"), ("b.onnx", "69")]
    # An app on a soc 69 / v79 device hits the entry warmed for it.
    ex = ContextCache(tmp_path / "plan-cache").explain(
        tmp_path / "m" / "a.onnx", providers=[(QNN, {**models.qnn_htp_options(), "soc_model": "69", "htp_arch": "79"})]
    )
    assert ex.verdict == "hit"


def test_warm_ctrl_c_exits_130_and_leaves_no_half_entry(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    for i in range(4):
        models.mobilenet_like(folder / f"m{i}.onnx", seed=i)
    cache = tmp_path / "c"
    script = Path(sys.executable).parent / "ctxcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
    proc = subprocess.Popen([*cmd, "warm", str(folder), "--cache-dir", str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    staging = cache / "v1" / "staging"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.01)
    assert staging.is_dir(), "no compile started"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    # Whole entries or none: every committed entry verifies, and no staging folder is left behind.
    results = ContextCache(cache).verify_entries()
    assert all(r.ok for r in results), [r.as_dict() for r in results]
    assert len(results) < 4
    assert list(staging.iterdir()) == []


# -- ls / explain / verify / prune / clear / stats on real entries ------------------------------------
def _foreign_copy(entry_path: Path, changes: dict[str, Any]) -> Path:
    """A copy of an entry as another machine / runtime would have written it (other key parts)."""
    manifest = json.loads((entry_path / "manifest.json").read_text())
    manifest["parts"] = [[label, changes.get(label, value)] for label, value in manifest["parts"]]
    key = "f" * 31 + str(len(changes))
    manifest["key"] = key
    dst = entry_path.parent / key
    shutil.copytree(entry_path, dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_management_commands_on_real_entries(
    warm_models: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = warm_models / "a.onnx", warm_models / "b.onnx"
    c = str(cache_dir)
    assert run_main(capsys, "warm", str(a), str(b), "--cache-dir", c)[0] == 0

    code, listing = run_json(capsys, "ls", "--cache-dir", c)
    assert code == 0 and sorted(e["model"] for e in listing["entries"]) == ["a.onnx", "b.onnx"]
    code, out, _ = run_main(capsys, "ls", "--cache-dir", c)
    assert "a.onnx" in out and "QNN" in out and "2 entries" in out

    # explain: a hit, then a changed option named part by part.
    code, out, _ = run_main(capsys, "explain", str(a), "--cache-dir", c)
    assert code == 0 and "verdict   hit" in out
    code, out, _ = run_main(capsys, "explain", str(a), "--cache-dir", c, "--preset", "qnn-htp",
                            "-o", "soc_model=69", "-o", "htp_arch=79")
    assert code == 1
    assert "ep_options.soc_model 60 -> 69" in out and "ep_options.htp_arch 73 -> 79" in out

    # An entry from another onnxruntime: explain names the version change, prune removes it first.
    entry_b = next(e for e in ContextCache(cache_dir).entries() if e.model_name == "b.onnx")
    foreign = _foreign_copy(entry_b.path, {"onnxruntime": "1.31.1"})
    shutil.rmtree(entry_b.path)
    code, ex = run_json(capsys, "explain", str(b), "--cache-dir", c)
    assert code == 1 and ex["verdict"] == "miss"
    assert [d["text"] for d in ex["nearest"][0]["differences"]] == [f"onnxruntime 1.31.1 -> {ort.__version__}"]
    code, plan = run_json(capsys, "prune", "--dry-run", "--cache-dir", c)
    assert code == 0 and [(i["key"], i["why"]) for i in plan["items"] if i["why"] != "junk"] == [(foreign.name, "other_environment")]
    assert foreign.is_dir()
    code, out, err = run_main(capsys, "prune", "--cache-dir", c)  # no terminal to confirm on, no --yes
    assert code == 2 and "--yes" in err and foreign.is_dir()
    code, done = run_json(capsys, "prune", "--yes", "--cache-dir", c)
    assert code == 0 and all(i["removed"] for i in done["items"]) and not foreign.exists()

    # verify: a flipped byte is found (exit 1), --fix quarantines it, then all is intact.
    assert run_main(capsys, "warm", str(b), "--cache-dir", c)[0] == 0
    entry_a = next(e for e in ContextCache(cache_dir).entries() if e.model_name == "a.onnx")
    flip_byte(next(entry_a.path.glob("*.bin")))
    code, report = run_json(capsys, "verify", "--cache-dir", c)
    assert code == 1 and report["damaged"] == 1
    bad = [e for e in report["entries"] if not e["ok"]]
    assert bad[0]["model"] == "a.onnx" and bad[0]["code"] == "artifact_digest" and not bad[0]["quarantined"]
    assert entry_a.path.is_dir()  # without --fix nothing changes
    code, report = run_json(capsys, "verify", "--fix", "--cache-dir", c)
    assert code == 1 and [e["quarantined"] for e in report["entries"] if not e["ok"]] == [True]
    assert not entry_a.path.exists()
    code, out, _ = run_main(capsys, "verify", "--cache-dir", c)
    assert code == 0 and "1 entry checked, all intact" in out

    # stats count what the loads did (warm-ups compile through ordinary loads).
    code, st = run_json(capsys, "stats", "--cache-dir", c)
    assert code == 0 and st["misses"] == 3 and st["loads"] >= 3
    code, st = run_json(capsys, "stats", "--reset", "--cache-dir", c)
    code, st = run_json(capsys, "stats", "--cache-dir", c)
    assert st["loads"] == 0

    # prune by size (LRU), clear.
    assert run_main(capsys, "warm", str(a), "--cache-dir", c)[0] == 0
    code, plan = run_json(capsys, "prune", "--max-size", "1", "--dry-run", "--cache-dir", c)
    assert [i["why"] for i in plan["items"] if i["why"] != "junk"] == ["over_size", "over_size"] and plan["size_after"] == 0
    code, _, err = run_main(capsys, "clear", "--cache-dir", c)
    assert code == 2 and len(ContextCache(cache_dir).entries()) == 2
    code, out, _ = run_main(capsys, "clear", "--yes", "--cache-dir", c)
    assert code == 0 and "removed 2 entries" in out
    assert ContextCache(cache_dir).entries() == []


def test_doctor_reports_versions_devices_cache_and_key_parts(cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "doctor", "--cache-dir", str(cache_dir))
    assert code == 0, data["problems"]
    assert data["onnxruntime"]["version"] == ort.__version__
    assert data["onnxruntime_qnn"]["qnn_sdk"]
    assert any(d["ep"] == QNN for d in data["ep_devices"])
    assert data["cache"]["dir"] == str(cache_dir) and data["cache"]["writable"]
    parts = data["key_parts"][0]["parts"]
    assert parts["onnxruntime"] == ort.__version__ and "libQnnHtp.so" in parts["ep_libraries"]
    code, out, _ = run_main(capsys, "doctor", "--cache-dir", str(cache_dir))
    assert code == 0 and "no problems found" in out


def test_doctor_flags_an_unwritable_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/ctxcache-cannot-exist")  # root can write anywhere else
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "cache"
    code, data = run_json(capsys, "doctor", "--cache-dir", str(target))
    assert code == 1 and any("not writable" in p for p in data["problems"])


# -- the README's main job ------------------------------------------------------------------------------
def test_readme_demo_command_runs_the_expected_sequence(tmp_path: Path) -> None:
    proc = cli("demo", "--dir", str(tmp_path / "demo"), "--format", "json")
    data = json.loads(proc.stdout)
    assert proc.returncode == 0, (data["problems"], proc.stderr[-2000:])
    assert data["outcomes"] == ["miss", "hit", "fallback", "miss", "hit"]
    assert data["launches"][2]["reason"] == "artifact_digest"
    assert all(r["providers"][0] == QNN for r in data["launches"] if r["outcome"] != "fallback")
    assert data["speedup"] > 1
    # Plain output is the table a new user reads.
    proc = cli("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "demo OK" in proc.stdout and "fallback  artifact_digest" in proc.stdout


def test_readme_main_job_command_is_ctxcache_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install -q -e '.[qnn]' && ctxcache demo" in readme


def test_warm_shows_live_progress_on_a_terminal_and_plain_lines_on_a_pipe(warm_models: Path, tmp_path: Path) -> None:
    import pty

    master, slave = pty.openpty()
    script = Path(sys.executable).parent / "ctxcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
    proc = subprocess.Popen([*cmd, "warm", str(warm_models), "-j", "2", "--cache-dir", str(tmp_path / "c")],
                            stdout=subprocess.PIPE, stderr=slave, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not data:
            break
        chunks.append(data)
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "compiling: " in terminal and "\x1b[2K" in terminal  # the live line, rewritten in place
    assert "\x1b" not in out  # stdout is a pipe: plain lines only
    assert sorted(line.split()[0] for line in out.strip().splitlines()[:-1]) == ["compiled"] * 3


def test_cli_attaches_its_log_handler_only_while_it_runs(warm_models: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    logger = logging.getLogger("ctxcache")
    before = list(logger.handlers)
    code, _, err = run_main(capsys, "explain", str(warm_models / "a.onnx"), "--cache-dir", str(cache_dir), "-vv")
    assert code == 1 and "key part" in err  # -vv: the key's parts, logged at DEBUG by the library
    assert logger.handlers == before


def test_python_dash_m_ctxcache_is_the_same_cli(cache_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ctxcache", "ls", "--cache-dir", str(cache_dir), "--format", "json"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cache_dir": str(cache_dir), "entries": []}
    proc = subprocess.run([sys.executable, "-m", "ctxcache", "verify", "--bogus"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_warm_retries_a_remembered_compile_failure(warm_models: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = warm_models / "a.onnx"
    cache = ContextCache(cache_dir)
    key = cache.key(model, providers=[(QNN, models.qnn_htp_options())]).key
    layout(cache).ensure()
    layout(cache).remember_failure(key, "not_compilable", "QNN compiled no node (remembered from an older SDK)")
    assert cache.explain(model, providers=[(QNN, models.qnn_htp_options())]).verdict == "bypass"
    code, summary = run_json(capsys, "warm", str(model), "--cache-dir", str(cache_dir))
    assert code == 0 and summary["results"][0]["status"] == "compiled"
    assert cache.explain(model, providers=[(QNN, models.qnn_htp_options())]).verdict == "hit"
