"""README runs as written: every ```python block in a fresh interpreter against the real QNN provider,
in an empty folder of its own, with the repository on ``PYTHONPATH`` and ``CTXCACHE_DIR`` a fresh folder.

A block names the files it needs in a comment, ``# needs: model.onnx``, and gets exactly those (small
models made by ``ctxcache.models``), nothing else. A need the test cannot provide (a server, the
installer's bundle) skips that block with the need as the reason. The blocks' own scratch folder,
``/tmp/ctxcache-readme``, is mapped to the test's temporary folder. Also: README's links work on a
package index page, its commands are the ones CI runs, and its reason-code table is the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from ctxcache import models

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
SCRATCH = "/tmp/ctxcache-readme"


def needs(block: str) -> list[str]:
    """``# needs: a.onnx, b.onnx (note)`` -> ``["a.onnx", "b.onnx"]`` (the parenthesised note is for readers)."""
    found: list[str] = []
    for line in re.findall(r"^#\s*needs:\s*(.*)$", block, flags=re.M):
        line = re.sub(r"\([^)]*\)", "", line)
        found += [n.strip() for n in line.split(",") if n.strip()]
    return found


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 5, "README lost its examples"


def test_few_examples_are_skipped() -> None:
    skipped = [b for b in BLOCKS if any(not n.endswith(".onnx") for n in needs(b))]
    assert len(skipped) <= 1, skipped


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs_as_written(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index]
    other = [n for n in needs(block) if not n.endswith(".onnx")]
    if other:
        pytest.skip(f"README block {index} needs {', '.join(other)}: not available to the tests")
    work = tmp_path / "work"
    work.mkdir()
    for name in needs(block):
        models.conv_net(work / name, layers=3, channels=16, seed=len(name))
    code = block.replace(SCRATCH, str(tmp_path / "scratch"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), CTXCACHE_DIR=str(tmp_path / "default-cache"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"README block {index} failed:\n{block}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    # Each shows its outcome: a print, or ctxcache's own log lines.
    assert proc.stdout.replace("# LIBNATIVE", "").strip() or "ctxcache" in proc.stderr, f"block {index} shows nothing"


def test_the_first_example_shows_the_outcome() -> None:
    block = BLOCKS[0]
    assert needs(block) == ["model.onnx"]
    assert "logging.basicConfig(level=logging.INFO)" in block or "print(" in block


def _run_with_stdout(kind: str, code: str, cwd: Path, env: dict[str, str]) -> tuple[str, str]:
    """Run ``code`` with its stdout a pipe, a regular file or a terminal (a pty); its (stdout, stderr)."""
    argv = [sys.executable, "-c", code]
    if kind == "pipe":
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=300, check=True)
        return proc.stdout, proc.stderr
    if kind == "file":
        with open(cwd / "stdout.txt", "w+") as f:
            proc = subprocess.run(argv, cwd=cwd, stdout=f, stderr=subprocess.PIPE, text=True, env=env, timeout=300,
                                  check=True)
            f.seek(0)
            return f.read(), proc.stderr
    import pty

    master, slave = pty.openpty()
    child = subprocess.Popen(argv, cwd=cwd, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal's other side
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode(errors="replace")[-3000:]
    return b"".join(chunks).decode().replace("\r\n", "\n"), err.decode(errors="replace")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["plain-shell", "PYTHONUNBUFFERED"])
def test_the_quiet_example_leaves_one_line_on_stdout_and_no_ort_warning(tmp_path: Path, unbuffered: bool) -> None:
    """README, "Native log noise": what it promises an app, checked on the real provider, with stdout a pipe
    (miss, then hit), a file and a terminal, in a plain shell and in one that sets PYTHONUNBUFFERED."""
    (block,) = [b for b in BLOCKS if "quiet_native_stdout" in b]
    models.conv_net(tmp_path / "model.onnx", layers=3, channels=16, seed=5)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CTXCACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    for kind, outcome in (("pipe", "miss"), ("pipe", "hit"), ("file", "hit"), ("pty", "hit")):
        out, err = _run_with_stdout(kind, block, tmp_path, env)
        assert out == f'{{"outcome": "{outcome}"}}\n', (kind, out)
        assert "W:onnxruntime" not in err, err
        # The native line was printed, and went to stderr: the block had something to keep off stdout.
        assert "# LIBNATIVE" in err, (kind, err)


def test_links_work_on_a_package_index_page() -> None:
    """PyPI renders README without the repository around it: a relative link to a file is a dead link
    there. Links are absolute (http...) or in-page anchors."""
    links = re.findall(r"\]\(([^)]+)\)", README)
    relative = [link for link in links if not link.startswith(("http://", "https://", "#"))]
    assert not relative, relative


def test_readme_test_command_is_what_ci_runs_and_says_how_long_and_how_to_see_skips() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pip install --quiet -e '.[test]' && python -m pytest -q"
    assert command in ci
    # ... in a user's shell: without the two variables development machines set, before anything runs.
    unset = ci.index("unset PYTHONUNBUFFERED PYTHONDONTWRITEBYTECODE\n")
    assert unset < ci.index("python3 -m venv") and unset < ci.index(command)
    assert "pip install -q -e '.[test]' && python -m pytest -q" in README
    section = README.split("**Tests**", 1)[1].split("## Installing", 1)[0]
    assert re.search(r"the tests \d+-\d+ minutes", section) and "-rs" in section


def test_installing_says_what_works_before_a_release() -> None:
    section = README.split("## Installing", 1)[1].split("\n## ", 1)[0]
    assert "pip install ctxcache" in section and "not on PyPI yet" in section
    assert "pip install '.[qnn]'" in section and "git+" in section


def test_readme_reason_table_is_the_code() -> None:
    import ctxcache

    block = README.split("<!-- reasons:begin -->")[1].split("<!-- reasons:end -->")[0]
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([a-z_]+)` \| ([a-z]+) \| (.*) \|$", block, re.M)}
    assert rows == {k: (o, t) for k, (o, t) in ctxcache.REASONS.items()}


def test_classifiers_claim_only_what_ci_runs_and_readme_says_so() -> None:
    """pyproject's classifiers list the platforms and Python versions README says are tested, no more
    (Windows, macOS and Android are handled in code but run nowhere)."""
    import tomllib

    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    systems = [c for c in classifiers if c.startswith("Operating System ::")]
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert systems == ["Operating System :: POSIX :: Linux"], systems
    section = README.split("**What is tested where.**", 1)[1].split("\n\n", 1)[0]
    assert "Linux x86_64" in section and [f"CPython {v}" for v in versions] == re.findall(r"CPython 3\.\d+", section)
