"""The CLI's last gaps (issue 21, items 4 and 5), each through the console script in a fresh process, against
the real QNN compiler: export / import / push / pull as a working pair by default, rm, ls filters, a cache
folder that does not exist, progress, help into a closed pipe, one exit code for bad input, stats that
add up, keys made and read twice, and the provider suggestion the library shares with the CLI.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, launch
from test_cli import cli, flip_byte

import ctxcache
from ctxcache import models

EXIT_FAILED, EXIT_USAGE = 1, 2


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A build cache with two models' entries (b larger than a), and a signing key."""
    d = tmp_path_factory.mktemp("gaps")
    a = models.conv_net(d / "a.onnx", layers=3, channels=8, seed=31)
    b = models.conv_net(d / "b.onnx", layers=4, channels=32, seed=32)
    cache = d / "build"
    assert cli("warm", str(a), str(b), "--cache-dir", str(cache)).returncode == 0
    keyfile = d / "k.pem"
    assert cli("keygen", str(keyfile)).returncode == 0
    pub = cli("pubkey", str(keyfile)).stdout.strip()
    infos = {e.model_name: e for e in ctxcache.ContextCache(cache).entries()}
    return {"dir": d, "a": a, "b": b, "cache": cache, "keyfile": keyfile, "pub": pub,
            "key_a": infos["a.onnx"].key, "key_b": infos["b.onnx"].key}


def copy_cache(built: dict[str, Any], dest: Path) -> Path:
    shutil.copytree(built["cache"], dest)
    return dest


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


# -- item 4: export / import / push / pull agree by default ---------------------------------------------------
def test_a_signed_export_imports_where_its_key_is_trusted(built: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    exp = cli("export", str(bundle), "--cache-dir", str(built["cache"]), "--signing-key-file", str(built["keyfile"]))
    assert exp.returncode == 0 and "signed by" in exp.stdout and "note:" not in exp.stderr, (exp.stdout, exp.stderr)
    # A device that trusts the public key (what `ctxcache pubkey` printed), and the build host itself (its own key).
    dev = cli("import", str(bundle), "--cache-dir", str(tmp_path / "dev"), "--trusted-key", built["pub"])
    assert dev.returncode == 0 and "2 installed" in dev.stdout, (dev.stdout, dev.stderr)
    host = cli("import", str(bundle), "--cache-dir", str(tmp_path / "host"), "--signing-key-file", str(built["keyfile"]))
    assert host.returncode == 0 and "2 installed" in host.stdout, host.stderr
    # The same key from the environment signs too (the key material, never a file name on the command line).
    env_bundle = tmp_path / "env.tar"
    env = {"CTXCACHE_SIGNING_KEY": built["keyfile"].read_text()}
    assert "signed by" in cli("export", str(env_bundle), "--cache-dir", str(built["cache"]), env=env).stdout
    trusted = cli("import", str(env_bundle), "--cache-dir", str(tmp_path / "dev2"), env={"CTXCACHE_TRUSTED_KEYS": built["pub"]})
    assert trusted.returncode == 0, trusted.stderr


def test_an_unsigned_export_says_so_once_and_its_refusal_is_one_short_message(built: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "u.tar"
    exp = cli("export", str(bundle), "--cache-dir", str(built["cache"]))
    assert exp.returncode == 0 and "(unsigned)" in exp.stdout
    (note,) = stderr_lines(exp)
    assert note.startswith("note: the bundle is unsigned") and "--signing-key-file" in note and len(note) <= 130, note
    imp = cli("import", str(bundle), "--cache-dir", str(tmp_path / "dev"))
    assert imp.returncode == EXIT_FAILED
    # One line for the two refused entries (one reason: the index is not signed), one line of what to do; no
    # log line repeating it, no 250-character lines.
    why, fix = stderr_lines(imp)
    assert why.startswith("refused 2 entries") and why.endswith("not signed"), why
    assert "--trusted-key" in fix and "--allow-unsigned" in fix and "--signing-key-file" in fix, fix
    assert all(len(ln) <= 130 for ln in [*imp.stdout.splitlines(), why, fix]), imp.stdout
    assert imp.stdout.count("refused (tier_untrusted)") == 2
    vouched = cli("import", str(bundle), "--cache-dir", str(tmp_path / "dev"), "--allow-unsigned")
    assert vouched.returncode == 0 and "2 installed" in vouched.stdout and not vouched.stderr.strip(), vouched.stderr


def test_push_unsigned_says_so_and_a_later_push_with_a_key_signs_what_is_there(built: dict[str, Any], tmp_path: Path) -> None:
    url = (tmp_path / "remote").as_uri()
    cache = str(built["cache"])
    first = cli("push", url, "--cache-dir", cache)
    assert first.returncode == 0 and first.stdout.count("pushed") >= 2, first.stdout
    (note,) = stderr_lines(first)
    assert note.startswith("note: pushed unsigned") and "push again with --signing-key-file" in note and len(note) <= 130
    refused = cli("pull", url, "--cache-dir", str(tmp_path / "dev"), "--trusted-key", built["pub"])
    assert refused.returncode == EXIT_FAILED and len(stderr_lines(refused)) == 2, refused.stderr  # reason + fix, once
    # The key now configured: the entries already there get its signature (nothing re-uploaded)...
    signed = cli("push", url, "--cache-dir", cache, "--signing-key-file", str(built["keyfile"]), "--format", "json")
    assert signed.returncode == 0 and set(json.loads(signed.stdout).values()) == {"signed"}, signed.stdout
    again = cli("push", url, "--cache-dir", cache, "--signing-key-file", str(built["keyfile"]), "--format", "json")
    assert set(json.loads(again.stdout).values()) == {"present"}, again.stdout
    # ...and a device that trusts the key pulls them, verified, and hits.
    pulled = cli("pull", url, "--cache-dir", str(tmp_path / "dev"), "--trusted-key", built["pub"])
    assert pulled.returncode == 0 and "2 installed" in pulled.stdout, pulled.stderr
    assert launch(tmp_path / "dev", built["a"])["outcome"] == "hit"


def test_push_never_signs_a_remote_record_it_did_not_verify(built: dict[str, Any], tmp_path: Path, keys: dict[str, Any]) -> None:
    """The remote's record differs from what this entry would upload (edited, or another build): signing it
    would vouch for bytes never checked here. It stays unsigned, the push says so (exit 1), and a device
    that trusts the key still refuses it."""
    url = (tmp_path / "remote").as_uri()
    assert cli("push", url, "--cache-dir", str(built["cache"]), "--key", built["key_a"][:8]).returncode == 0
    record = tmp_path / "remote" / "v1" / built["key_a"] / "record.json"
    record.write_bytes(record.read_bytes().replace(b'"format"', b'"format" ', 1))  # same meaning, other bytes
    proc = cli("push", url, "--cache-dir", str(built["cache"]), "--key", built["key_a"][:8],
               "--signing-key-file", str(keys["a"].path))
    assert proc.returncode == EXIT_FAILED and "differs" in proc.stdout, proc.stdout
    sig = tmp_path / "remote" / "v1" / built["key_a"] / "record.json.ed25519"
    assert keys["a"].key_id not in sig.read_text()
    pull = cli("pull", url, "--cache-dir", str(tmp_path / "dev"), "--trusted-key", keys["a"].public_key)
    assert pull.returncode == EXIT_FAILED and "not signed" in pull.stderr


# -- item 5: the commands a cache user expects ---------------------------------------------------------------
def test_rm_removes_a_models_entries_or_a_key_after_a_plan(built: dict[str, Any], tmp_path: Path) -> None:
    cache = copy_cache(built, tmp_path / "c")
    dry = cli("rm", str(built["a"]), "--cache-dir", str(cache), "--dry-run")
    assert dry.returncode == 0 and "would remove 1 entry" in dry.stdout and len(ctxcache.ContextCache(cache).entries()) == 2
    no_tty = cli("rm", "a.onnx", "--cache-dir", str(cache))
    assert no_tty.returncode == EXIT_USAGE and "--yes" in no_tty.stderr
    by_name = cli("rm", "a.onnx", "--cache-dir", str(cache), "--yes")  # the name `ls` shows, file not here
    assert by_name.returncode == 0 and "removed 1 entry" in by_name.stdout, by_name.stdout
    assert [e.model_name for e in ctxcache.ContextCache(cache).entries()] == ["b.onnx"]
    by_key = cli("rm", built["key_b"][:8], "--cache-dir", str(cache), "--yes")
    assert by_key.returncode == 0 and not ctxcache.ContextCache(cache).entries()
    assert not any(built["key_b"] in str(p) for p in cache.rglob("*") if p.is_dir() and "entries" in p.parts), \
        sorted(cache.rglob("*"))
    # Nothing left to match: the command ran and found nothing (1); a target that is nothing at all: bad input (2).
    assert cli("rm", built["key_b"][:8], "--cache-dir", str(cache), "--yes").returncode == EXIT_FAILED
    missing = cli("rm", "nosuch/model.onnx", "--cache-dir", str(cache), "--yes")
    assert missing.returncode == EXIT_USAGE and "does not exist" in missing.stderr
    assert cli("rm", "ab", "--cache-dir", str(cache), "--yes").returncode == EXIT_USAGE  # too short for a key


def test_ls_filters_sorts_and_limits(built: dict[str, Any]) -> None:
    cache = str(built["cache"])

    def models_of(*argv: str) -> list[str]:
        proc = cli("ls", "--cache-dir", cache, "--format", "json", *argv)
        assert proc.returncode == 0, proc.stderr
        return [e["model"] for e in json.loads(proc.stdout)["entries"]]

    assert models_of("--sort", "size") == ["b.onnx", "a.onnx"]
    assert models_of("--sort", "size", "--reverse") == ["a.onnx", "b.onnx"]
    assert models_of("--sort", "name") == ["a.onnx", "b.onnx"]
    assert models_of("--sort", "size", "--limit", "1") == ["b.onnx"]
    assert models_of("--model", str(built["a"])) == ["a.onnx"]  # by content
    assert models_of("--model", "b.onnx") == ["b.onnx"]  # by the name ls shows
    assert models_of("--key", built["key_a"][:6]) == ["a.onnx"]
    assert sorted(models_of("--provider", "qnn")) == ["a.onnx", "b.onnx"]
    assert models_of("--provider", "QNNExecutionProvider", "--model", "a.onnx") == ["a.onnx"]
    assert models_of("--provider", "cpu") == []
    table = cli("ls", "--cache-dir", cache, "--sort", "size", "-n", "1").stdout
    assert "1 of 2 matching entry" in table and "b.onnx" in table and "a.onnx" not in table, table
    assert cli("ls", "--cache-dir", cache, "--limit", "0").returncode == EXIT_USAGE
    assert cli("ls", "--cache-dir", cache, "--provider", "qnnn").returncode == EXIT_USAGE  # did you mean qnn


READERS = [["ls"], ["verify"], ["stats"], ["prune", "--yes"], ["clear", "--yes"], ["rm", "a.onnx", "--yes"],
           ["export", "{tmp}/out.tar"], ["push", "{remote}"]]


@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_a_cache_folder_that_does_not_exist_is_bad_input(argv: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-cache"
    args = [a.format(tmp=tmp_path, remote=(tmp_path / "r").as_uri()) for a in argv]
    proc = cli(*args, "--cache-dir", str(missing))
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert f"the cache folder {missing} (--cache-dir) does not exist" in proc.stderr and not proc.stdout
    assert not missing.exists()
    env = cli(*args, env={"CTXCACHE_DIR": str(missing)})
    assert env.returncode == EXIT_USAGE and "($CTXCACHE_DIR) does not exist" in env.stderr


def test_prune_yes_says_removed_even_when_nothing_goes(built: dict[str, Any], tmp_path: Path) -> None:
    cache = copy_cache(built, tmp_path / "c")
    proc = cli("prune", "--yes", "--cache-dir", str(cache))
    assert proc.returncode == 0 and proc.stdout.startswith("removed ") and "would" not in proc.stdout, proc.stdout
    assert cli("prune", "--dry-run", "--cache-dir", str(cache)).stdout.startswith("would remove 0 entries")


@pytest.mark.parametrize("argv", [["--help"], ["ls", "--help"], ["rm", "--help"]])
def test_help_into_a_closed_pipe_is_quiet_141_in_a_plain_shell(argv: list[str]) -> None:
    """`ctxcache --help | true` in a user's shell: stdout buffered (no PYTHONUNBUFFERED)."""
    script = Path(sys.executable).parent / "ctxcache"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and not stderr.strip(), stderr


def test_import_of_a_model_or_a_missing_path_is_bad_input(built: dict[str, Any], tmp_path: Path) -> None:
    model = cli("import", str(built["a"]), "--cache-dir", str(tmp_path / "c"))
    assert model.returncode == EXIT_USAGE, model.stderr
    assert "is an ONNX model, not a bundle" in model.stderr and "ctxcache warm" in model.stderr
    assert len(stderr_lines(model)) == 1
    text = tmp_path / "notes.txt"
    text.write_text("x")
    assert cli("import", str(text), "--cache-dir", str(tmp_path / "c")).returncode == EXIT_USAGE
    missing = cli("import", str(tmp_path / "nope.tar"), "--cache-dir", str(tmp_path / "c"))
    assert missing.returncode == EXIT_USAGE and "does not exist" in missing.stderr


@pytest.mark.parametrize("name", ["out.zip", "out.tar.xz", "out.7z"])
def test_export_to_an_archive_it_cannot_write_is_refused(built: dict[str, Any], tmp_path: Path, name: str) -> None:
    proc = cli("export", str(tmp_path / name), "--cache-dir", str(built["cache"]))
    assert proc.returncode == EXIT_USAGE and "does not write" in proc.stderr and ".tar" in proc.stderr, proc.stderr
    assert not (tmp_path / name).exists() and not list(tmp_path.iterdir())
    with pytest.raises(ctxcache.errors.BundleError) as info:
        ctxcache.export_bundle(ctxcache.ContextCache(built["cache"]), tmp_path / name)
    assert info.value.code == "bad_destination"


def test_stats_rows_add_up(built: dict[str, Any], tmp_path: Path) -> None:
    cache = copy_cache(built, tmp_path / "c")
    assert launch(cache, built["a"])["outcome"] == "hit"
    (info,) = [e for e in ctxcache.ContextCache(cache).entries() if e.key == built["key_b"]]
    entry = next(p for p in info.path.iterdir() if p.suffix == ".bin")
    flip_byte(entry)
    assert launch(cache, built["b"])["outcome"] == "fallback"
    st = json.loads(cli("stats", "--cache-dir", str(cache), "--format", "json").stdout)
    assert (st["app_loads"], st["app_hits"], st["app_fallbacks"], st["warm_loads"], st["fallbacks"]) == (2, 1, 1, 2, 1), st
    top: dict[str, int] = {}
    parts: dict[str, int] = {}
    current = None
    for ln in cli("stats", "--cache-dir", str(cache)).stdout.splitlines():
        indent = len(ln) - len(ln.lstrip())
        label, *value = re.split(r"\s{2,}", ln.strip(), maxsplit=1)
        if not value or not value[0].isdigit():
            continue
        if indent == 0:
            current = label
            top[label] = int(value[0])
        elif indent == 2 and current is not None:  # 4: a detail of a detail (fetched from a tier)
            parts[current] = parts.get(current, 0) + int(value[0])
    assert top["app loads"] == parts["app loads"] == 2 and top["warm-up loads"] == parts["warm-up loads"] == 2, (top, parts)


def test_keygen_runs_twice_with_exist_ok_and_pubkey_reads_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    first = cli("keygen", str(key), "--format", "json")
    assert first.returncode == 0
    made = json.loads(first.stdout)
    assert cli("keygen", str(key)).returncode == EXIT_USAGE  # never replaced by accident
    again = cli("keygen", str(key), "--exist-ok", "--format", "json")
    assert again.returncode == 0 and json.loads(again.stdout)["public_key"] == made["public_key"]
    assert json.loads(again.stdout)["created"] is False
    pub = cli("pubkey", str(key))
    assert pub.returncode == 0 and pub.stdout == made["public_key"] + "\n" and made["key_id"] in pub.stderr
    assert ctxcache.signing_key_info(key).public_key == made["public_key"]
    secret = tmp_path / "hmac.txt"
    secret.write_text("a shared secret")
    for bad in (secret, tmp_path / "missing.pem"):
        proc = cli("pubkey", str(bad))
        assert proc.returncode == EXIT_USAGE and len(stderr_lines(proc)) == 1, proc.stderr


def test_the_readme_signing_blocks_run_twice(tmp_path: Path) -> None:
    """README "Bundles" (bash) and "Signatures and trust" (python), each pasted twice in the same folder."""
    readme = (ROOT / "README.md").read_text()
    (bash,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "keygen build/ctx-signing.pem" in b]
    (py,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if 'work / "release.pem"' in b]
    models.conv_net(tmp_path / "app" / "models" / "net.onnx", layers=3, channels=8, seed=33)
    script = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{script}{os.pathsep}{os.environ['PATH']}")
    for run in (1, 2):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=tmp_path, capture_output=True, text=True,
                              env=env, timeout=600, check=False)
        assert proc.returncode == 0, f"run {run}:\n{proc.stdout}\n{proc.stderr}"
        code = py.replace("/tmp/ctxcache-readme", str(tmp_path / "scratch"))
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600, check=False)
        assert proc.returncode == 0, f"run {run}:\n{proc.stdout}\n{proc.stderr[-3000:]}"


# -- progress ------------------------------------------------------------------------------------------------
def test_export_and_import_show_progress_on_a_terminal(built: dict[str, Any], tmp_path: Path) -> None:
    import pty

    def on_a_tty(*argv: str) -> tuple[int, str]:
        master, slave = pty.openpty()
        script = Path(sys.executable).parent / "ctxcache"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ctxcache"]
        proc = subprocess.Popen([*cmd, *argv], stdout=subprocess.PIPE, stderr=slave, text=True,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        os.close(slave)
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed its end
                    return
                if not data:
                    return
                chunks.append(data)

        t = threading.Thread(target=drain)
        t.start()
        proc.communicate(timeout=300)
        t.join(timeout=30)
        os.close(master)
        return proc.returncode, b"".join(chunks).decode()

    bundle = tmp_path / "b.tar.gz"
    code, err = on_a_tty("export", str(bundle), "--cache-dir", str(built["cache"]), "--signing-key-file", str(built["keyfile"]))
    assert code == 0 and "\rctxcache export: writing" in err and "(100%)" in err, err
    assert err.rstrip().endswith("\x1b[K"), err  # the live line is erased before the command's own output
    code, err = on_a_tty("import", str(bundle), "--cache-dir", str(tmp_path / "dev"), "--trusted-key", built["pub"])
    assert code == 0 and "\rctxcache import: importing" in err and "(100%)" in err, err


def test_progress_without_a_terminal_is_a_plain_line_now_and_then() -> None:
    from ctxcache.cli._progress import ProgressLine

    now = [0.0]
    stream = io.StringIO()
    line = ProgressLine("import", stream=stream, interval=5.0, clock=lambda: now[0])
    for t, done in ((1.0, 10 << 20), (4.0, 50 << 20), (6.0, 100 << 20), (8.0, 150 << 20), (11.5, 217 << 20)):
        now[0] = t
        line("import", done, 217 << 20)
    line.close()
    assert stream.getvalue().splitlines() == ["ctxcache import: importing 100.0 MiB of 217.0 MiB (46%)",
                                              "ctxcache import: importing 217.0 MiB of 217.0 MiB (100%)"]


def test_the_library_reports_bytes_to_a_progress_callback(built: dict[str, Any], tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    cache = ctxcache.ContextCache(built["cache"])
    ctxcache.export_bundle(cache, tmp_path / "b.tar", progress=lambda *a: seen.append(a))
    total = sum(e.size for e in cache.entries())
    assert seen[-1] == ("write", 2 * total, 2 * total) and ("verify", total, total) in seen
    assert all(d <= t for _, d, t in seen) and [d for p, d, _ in seen if p == "write"] == sorted(d for p, d, _ in seen if p == "write")
    got: list[tuple[str, int, int]] = []
    ctxcache.import_bundle(ctxcache.ContextCache(tmp_path / "dev"), tmp_path / "b.tar", require_signature=False,
                           progress=lambda *a: got.append(a))
    assert got[-1][1] == got[-1][2] > 0 and len(got) > 2, got


# -- one rule for provider names ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "suggestion"), [("cpu", "CPUExecutionProvider"), ("qnn", "QNNExecutionProvider"),
                                                  ("QnnExecutionProvider", "QNNExecutionProvider"),
                                                  ("QNNExecutionProvidr", "QNNExecutionProvider")])
def test_the_api_suggests_the_provider_name_as_the_cli_does(name: str, suggestion: str, tmp_path: Path) -> None:
    with pytest.raises(ctxcache.errors.UnknownProviderError, match=f"did you mean '{suggestion}'"):
        ctxcache.ContextCache(tmp_path / "c").load(models.conv_net(tmp_path / "m.onnx", layers=2, channels=4),
                                                   providers=[name])
    assert ctxcache.nearest_provider(name)[0] == suggestion  # type: ignore[index]
    proc = cli("explain", str(tmp_path / "m.onnx"), "--provider", name + "x" if len(name) > 4 else name + "n",
               "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == EXIT_USAGE and "did you mean" in proc.stderr and suggestion in proc.stderr, proc.stderr


# -- one exit code for bad input ------------------------------------------------------------------------------
BAD_INPUT = [
    ["pull", "{remote}", "--cache-dir", "{cache}", "--signing-key-file", "{tmp}/missing.pem"],  # was 0: key never read
    ["push", "{remote}", "--cache-dir", "{cache}", "--signing-key-file", "{tmp}/missing.pem"],
    ["export", "{tmp}/x.tar", "--cache-dir", "{cache}", "--signing-key-file", "{tmp}/missing.pem"],
    ["import", "{tmp}/notes.txt", "--cache-dir", "{cache}"],
    ["demo", "--dir", "{tmp}/notes.txt"],  # was 1, a FileExistsError line
    ["ls", "--cache-dir", "{cache}", "--model", "{tmp}/notes.txt"],
    ["rm", "{tmp}/missing.onnx", "--cache-dir", "{cache}", "--yes"],
    ["pubkey", "{tmp}/notes.txt"],
]


@pytest.mark.parametrize("argv", BAD_INPUT, ids=[" ".join(a[:2]) + (" " + a[-2] if len(a) > 4 else "") for a in BAD_INPUT])
def test_bad_input_is_exit_2_with_one_line(argv: list[str], built: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model, a bundle or a key\n")
    cache = copy_cache(built, tmp_path / "c")
    args = [a.format(tmp=tmp_path, cache=cache, remote=(tmp_path / "r").as_uri()) for a in argv]
    if argv[0] == "pull":  # a remote with entries this cache already has: nothing would need the key
        assert cli("push", (tmp_path / "r").as_uri(), "--cache-dir", str(cache)).returncode == 0
    proc = cli(*args)
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert len(stderr_lines(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr
