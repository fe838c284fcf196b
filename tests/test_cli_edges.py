"""A new user's rough edges (issue 14), each as a user meets it: the console script in a fresh process,
against the real QNN compiler. Read-only caches are real read-only mounts (tests run as root, where
permission bits stop nothing): a bind mount remounted ``ro``, skipped with the reason where mounting is
not possible.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, launch, layout, read_only_bind, run_python
from test_cli import cli, flip_byte

import ctxcache
from ctxcache import models

EXIT_USAGE = 2


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("edges-models")
    return models.conv_net(d / "a.onnx", layers=3, channels=8, seed=21), models.conv_net(d / "b.onnx", layers=3, channels=8, seed=22)


def shim(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment in which ``import module`` fails, as if the package were not installed."""
    d = tmp_path / f"without-{module}"
    d.mkdir(exist_ok=True)
    (d / f"{module}.py").write_text(f"raise ImportError('{module} is hidden by the test (not installed)')\n")
    return {"PYTHONPATH": os.pathsep.join([str(d), str(ROOT)])}


def env_cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as ``python -m ctxcache`` with ``env``'s PYTHONPATH first (``cli`` puts ROOT alone there)."""
    return subprocess.run([sys.executable, "-m", "ctxcache", *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env), check=False)


# -- --cache-dir that is a file -----------------------------------------------------------------------
FILE_CACHE_COMMANDS = [
    ["ls"], ["verify"], ["verify", "--fix"], ["stats"], ["doctor"], ["clear", "--yes"], ["prune", "--yes"],
    ["warm", "{model}"], ["explain", "{model}"], ["export", "{tmp}/out.tar"], ["import", "{tmp}/in.tar"],
    ["push", "s3://bucket/prefix"], ["pull", "s3://bucket/prefix"],
]


@pytest.mark.parametrize("argv", FILE_CACHE_COMMANDS, ids=[" ".join(a) for a in FILE_CACHE_COMMANDS])
def test_a_cache_dir_that_is_a_file_is_one_line_and_exit_2(argv: list[str], two_models: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    args = [a.format(model=two_models[0], tmp=tmp_path) for a in argv]
    proc = cli(*args, "--cache-dir", str(afile))
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert proc.stderr.strip().count("\n") == 0 and "is a file, not a folder" in proc.stderr, proc.stderr
    assert "no entries" not in proc.stdout and afile.read_text() == "x"


def test_ctxcache_dir_that_is_a_file_is_the_same_error(tmp_path: Path) -> None:
    afile = tmp_path / "not-a-folder"
    afile.write_text("x")
    proc = cli("ls", env={"CTXCACHE_DIR": str(afile)})
    assert proc.returncode == EXIT_USAGE and "is a file, not a folder" in proc.stderr


# -- output piped into head ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["ls"], ["doctor"], ["stats"], ["--help"], ["warm", "--help"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv: list[str], tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ctxcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
    (tmp_path / "c").mkdir()  # an existing (empty) cache: a missing one is an error, on stderr
    args = [*argv, "--cache-dir", str(tmp_path / "c")] if argv[-1] != "--help" else argv
    # The read end is closed before the command writes: every write is EPIPE, as after `head` exits.
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert "BrokenPipe" not in stderr and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    # 141 (128 + SIGPIPE) as a tool killed by it reports, help included (argparse used to swallow the error,
    # and then, with a buffered stdout, Python's exit flush printed it and exited 120).
    assert code == 141, (code, stderr)


# -- provider names, -v, -o ---------------------------------------------------------------------------
def test_provider_names_match_in_any_case_and_near_misses_get_a_suggestion(two_models: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert cli("warm", str(two_models[0]), "--cache-dir", str(cache)).returncode == 0
    for name in ("QnnExecutionProvider", "QNN", "qnnexecutionprovider"):
        proc = cli("explain", str(two_models[0]), "--provider", name, "--cache-dir", str(cache), "--format", "json")
        assert proc.returncode in (0, 1), (name, proc.stderr)  # a verdict, not a usage error
        assert json.loads(proc.stdout)["providers"][0]["name"] == "QNNExecutionProvider"
    for typo, hint in (("qnnn", "did you mean qnn (QNNExecutionProvider)"), ("tensort", "did you mean tensorrt"),
                       ("QNNExecutionProvidr", "did you mean QNNExecutionProvider")):
        proc = cli("explain", str(two_models[0]), "--provider", typo, "--cache-dir", str(cache))
        assert proc.returncode == EXIT_USAGE and hint in proc.stderr, (typo, proc.stderr)


def test_the_library_suggests_the_right_case_too() -> None:
    import ctxcache

    with pytest.raises(ctxcache.errors.UnknownProviderError, match="did you mean 'QNNExecutionProvider'"):
        ctxcache.check_providers([("QnnExecutionProvider", {})])


def test_verbose_before_the_command(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    before = cli("-v", "warm", str(two_models[0]), "--cache-dir", str(tmp_path / "c1"))
    after = cli("warm", str(two_models[0]), "--cache-dir", str(tmp_path / "c2"), "-v")
    quiet = cli("warm", str(two_models[0]), "--cache-dir", str(tmp_path / "c3"))
    assert before.returncode == after.returncode == quiet.returncode == 0, before.stderr
    assert "a.onnx: miss in" in before.stderr and "a.onnx: miss in" in after.stderr  # the INFO line of the load
    assert "a.onnx: miss in" not in quiet.stderr


def test_an_option_without_a_provider_overrides_the_default_preset(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    proc = cli("explain", str(two_models[0]), "-o", "soc_model=69", "-o", "htp_arch=79", "--cache-dir", str(tmp_path / "c"),
               "--format", "json")
    assert proc.returncode == 1, proc.stderr  # nothing cached: a miss, not a usage error
    (provider,) = json.loads(proc.stdout)["providers"]
    assert provider["preset"] == "qnn-htp" and provider["name"] == "QNNExecutionProvider"
    opts = provider["options"]
    assert (opts["soc_model"], opts["htp_arch"], opts["enable_htp_fp16_precision"]) == ("69", "79", "1")
    assert opts["backend_path"].endswith("libQnnHtp.so")


# -- one exit code for bad input, errors as flags, help ------------------------------------------------
def test_bad_input_is_exit_2_in_every_command(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    cache = tmp_path / "c"
    for argv in (["warm", str(text)], ["explain", str(text)]):
        proc = cli(*argv, "--cache-dir", str(cache))
        assert proc.returncode == EXIT_USAGE and "is not a valid ONNX model" in proc.stdout + proc.stderr, (argv, proc)
    assert cli("warm", str(two_models[0]), "--cache-dir", str(cache)).returncode == 0
    bundle, package = tmp_path / "b.tar", tmp_path / "pkg"
    bundle.write_text("keep me")
    package.mkdir()
    proc = cli("export", str(bundle), "--cache-dir", str(cache))
    assert proc.returncode == EXIT_USAGE and "already exists" in proc.stderr and "(--overwrite)" in proc.stderr
    assert "overwrite=True" not in proc.stderr and bundle.read_text() == "keep me"
    assert cli("export", str(bundle), "--cache-dir", str(cache), "--overwrite").returncode == 0
    proc = cli("export", str(package), "--package", "--cache-dir", str(cache))
    assert proc.returncode == EXIT_USAGE and "remove it first" in proc.stderr and "=True" not in proc.stderr
    key = tmp_path / "k.pem"
    key.write_text("a key")
    proc = cli("keygen", str(key))
    assert proc.returncode == EXIT_USAGE and "--force" in proc.stderr and "overwrite=True" not in proc.stderr
    assert key.read_text() == "a key"


def test_exit_codes_are_listed_once_at_the_top() -> None:
    top = cli("--help").stdout
    assert "exit codes:" in top and "130" in top and "141" in top
    for command in ("demo", "warm", "ls", "explain", "verify", "prune", "clear", "stats", "doctor", "keygen", "export",
                    "import", "push", "pull"):
        text = cli(command, "--help").stdout
        assert "exit codes: see `ctxcache --help`" in text, command
        assert "130" not in text and "interrupted" not in text, command


# -- doctor: missing onnxruntime-qnn, missing boto3 ----------------------------------------------------
def test_doctor_reports_a_missing_onnxruntime_qnn_when_the_default_preset_needs_it(tmp_path: Path) -> None:
    proc = env_cli(shim(tmp_path, "onnxruntime_qnn"), "doctor", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "problem       the default preset (qnn-htp" in proc.stdout and "pip install 'ctxcache[qnn]'" in proc.stdout
    js = env_cli(shim(tmp_path, "onnxruntime_qnn"), "doctor", "--cache-dir", str(tmp_path / "c"), "--format", "json")
    assert js.returncode == 1 and any("ctxcache[qnn]" in p for p in json.loads(js.stdout)["problems"])
    # With a provider that does not need it, nothing is missing.
    cpu = env_cli(shim(tmp_path, "onnxruntime_qnn"), "doctor", "--provider", "cpu", "--cache-dir", str(tmp_path / "c"))
    assert "default preset" not in cpu.stdout


def test_a_missing_boto3_names_the_extra_in_the_log_the_cli_and_doctor(conv_model: Path, tmp_path: Path) -> None:
    env = shim(tmp_path, "boto3")
    code = f"""
import logging, ctxcache
from ctxcache import models
from _report import report
logging.basicConfig(level=logging.INFO)
c = ctxcache.ContextCache({str(tmp_path / 'c')!r}, tiers=["s3://bucket/prefix"])
r = c.load({str(conv_model)!r}, providers=[("QNNExecutionProvider", models.qnn_htp_options())])
report(r.outcome)
"""
    proc = run_python(code, env=env)
    assert proc.result == "miss", proc.stderr
    assert "needs boto3 for s3:// URLs: pip install 'ctxcache[remote]'" in proc.stderr
    pull = env_cli(env, "pull", "s3://bucket/prefix", "--cache-dir", str(tmp_path / "c"))
    assert pull.returncode == 1 and "pip install 'ctxcache[remote]'" in pull.stderr, pull.stderr
    doctor = env_cli(env, "doctor", "--tier", "s3://bucket/prefix", "--cache-dir", str(tmp_path / "c"))
    assert doctor.returncode == 1 and "needs boto3, which is not installed: pip install 'ctxcache[remote]'" in doctor.stdout


# -- stats ------------------------------------------------------------------------------------------
def test_stats_separates_warm_up_compiles_from_app_loads(two_models: tuple[Path, Path], tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert cli("warm", *map(str, two_models), "--cache-dir", str(cache)).returncode == 0
    assert launch(cache, two_models[0])["outcome"] == "hit"
    proc = cli("stats", "--cache-dir", str(cache), "--format", "json")
    st = json.loads(proc.stdout)
    assert (st["app_loads"], st["app_hits"], st["app_misses"], st["warm_compiles"]) == (1, 1, 0, 2), st
    table = cli("stats", "--cache-dir", str(cache)).stdout
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.splitlines() if "  " in line.strip())
    assert (rows["app loads"], rows["hits"], rows["misses (compiled)"], rows["warm-up loads"], rows["compiled"]) == \
        ("1", "1", "0", "2", "2"), table


# -- read-only caches ---------------------------------------------------------------------------------
@pytest.fixture
def read_only_cache(two_models: tuple[Path, Path], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A cache with two entries, the second model's damaged, then mounted read-only at another path.
    ``models[0]`` is the intact one: which entry was damaged is known by model, not by key order."""
    src = tmp_path / "src"
    lay = layout(src)
    for model in two_models:  # one at a time: the key that appears is this model's
        before = set(lay.keys())
        assert cli("warm", str(model), "--cache-dir", str(src)).returncode == 0
        (damaged,) = set(lay.keys()) - before
    flip_byte(next(p for p in lay.entry_path(damaged).iterdir() if p.suffix == ".bin"))
    with read_only_bind(src, tmp_path / "ro") as ro:
        yield {"dir": ro, "keys": lay.keys(), "damaged": damaged, "models": two_models}


def test_doctor_on_a_read_only_cache_says_hits_yes_compiles_no(read_only_cache: dict[str, Any]) -> None:
    ro = read_only_cache["dir"]
    proc = cli("doctor", "--cache-dir", str(ro))
    assert "every load would bypass" not in proc.stdout
    problem = next(line for line in proc.stdout.splitlines() if line.startswith("problem") and "read-only" in line)
    assert "hit" in problem and "cannot compile" in problem and "prune, clear, verify --fix" in problem
    # ... and it is true: the intact entry hits, a model with no entry bypasses with a working session.
    assert launch(ro, read_only_cache["models"][0])["outcome"] == "hit"
    other = models.conv_net(ro.parent / "other.onnx", layers=3, channels=8, seed=23)
    r = launch(ro, other)
    assert (r["outcome"], r["reason"]) == ("bypass", "cache_unwritable")
    # the library's own answer, which the CLI's messages use
    assert ctxcache.ContextCache(ro).read_only()
    assert not ctxcache.ContextCache(ro.parent / "src").read_only()
    assert not ctxcache.ContextCache(ro.parent / "not-made-yet").read_only()


def test_clear_prune_verify_fix_and_reset_on_a_read_only_cache_fail_and_say_so(read_only_cache: dict[str, Any]) -> None:
    ro, keys = read_only_cache["dir"], read_only_cache["keys"]
    clear = cli("clear", "--yes", "--cache-dir", str(ro))
    assert clear.returncode == 1, clear.stdout + clear.stderr
    assert "removed 0 entries (0 B)" in clear.stdout and "not removed: 2 entries (the cache folder is read-only)" in clear.stderr
    prune = cli("prune", "--max-size", "1", "--yes", "--cache-dir", str(ro))
    assert prune.returncode == 1 and "removed 0 entries, freed 0 B" in prune.stdout
    assert prune.stderr.count("the cache folder is read-only") == 2
    verify = cli("verify", "--fix", "--cache-dir", str(ro))
    assert verify.returncode == 1 and "NOT quarantined" in verify.stdout and "0 quarantined, 1 NOT" in verify.stdout, verify.stdout
    js = json.loads(cli("verify", "--fix", "--cache-dir", str(ro), "--format", "json").stdout)
    assert (js["damaged"], js["quarantined"], js["not_quarantined"]) == (1, 0, 1)
    launch(ro, read_only_cache["models"][0])  # not recorded (read-only), so the counters come from the warm-up
    reset = cli("stats", "--reset", "--cache-dir", str(ro))
    assert reset.returncode == 1 and "counters NOT reset" in reset.stderr and "counters reset" not in reset.stdout
    assert layout(ro).keys() == keys  # nothing changed, and nothing claimed otherwise
