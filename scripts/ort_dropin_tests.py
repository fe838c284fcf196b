"""Run ONNX Runtime's own Python tests against ``ctxcache.InferenceSession`` (the drop-in promise, measured).

    python scripts/ort_dropin_tests.py PATH_TO_ORT_SRC [--files a.py b.py] [-k EXPR] [--json out.json]

``PATH_TO_ORT_SRC`` is a checkout (or an extract) of the onnxruntime repository holding
``onnxruntime/test/python/`` and ``onnxruntime/test/testdata/``; it stays outside this repository. Each
test file is run twice, in its own pytest subprocess, CPU only, from an empty working directory:

* ``plain``: as ONNX Runtime's CI runs it;
* ``dropin``: with ``onnxruntime.InferenceSession`` replaced by a forwarder to ``ctxcache.InferenceSession``
  on a temporary cache folder (sessions ctxcache itself creates get the real class, and
  ``isinstance(x, onnxruntime.InferenceSession)`` still holds for the sessions it returns).

Prints the counts side by side, every test that passes plainly but not through the drop-in (with the
first line of its failure), and what the drop-in run left in the cache folder and its working
directory. Exit status 1 when a test passes plainly and fails through the drop-in. Needs pytest and
``parameterized`` (ORT's float8 tests import it). Tests that need a GPU or a custom-op library skip
themselves in both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

DEFAULT_FILES = ("onnxruntime_test_python.py", "onnxruntime_test_float8.py")

# Imported by pytest (-p) in the drop-in run, before the test module. Kept small and obvious: what is
# measured is ctxcache.InferenceSession, not this forwarder.
SHIM = textwrap.dedent('''
    import atexit
    import os
    import threading

    import onnxruntime

    import ctxcache

    _real = onnxruntime.InferenceSession
    _inside = threading.local()
    _cache = ctxcache.ContextCache(os.environ["CTXCACHE_DROPIN_CACHE"])
    _calls = [0]


    @atexit.register
    def _count():  # proof that the tests went through the drop-in
        with open(os.environ["CTXCACHE_DROPIN_COUNT"], "w") as f:
            f.write(str(_calls[0]))


    class _Meta(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, _real)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, _real)


    class InferenceSession(metaclass=_Meta):
        """onnxruntime.InferenceSession -> ctxcache.InferenceSession (ctxcache's own sessions: the real class)."""

        def __new__(cls, *args, **kwargs):
            if getattr(_inside, "active", False):
                return _real(*args, **kwargs)
            _inside.active = True
            _calls[0] += 1
            try:
                return ctxcache.InferenceSession(*args, cache=_cache, **kwargs)
            finally:
                _inside.active = False


    onnxruntime.InferenceSession = InferenceSession
''')


def _outcomes(xml_path: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed / failed / skipped, first line of the message)."""
    out: dict[str, tuple[str, str]] = {}
    if not xml_path.exists():
        return out
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        state, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                state, message = "failed", (child.get("message") or child.text or "").strip()
                break
            if child.tag == "skipped":
                state, message = "skipped", (child.get("message") or "").strip()
        out[name] = (state, message.splitlines()[0][:240] if message else "")
    return out


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def run(test_dir: Path, test_file: str, mode: str, work: Path, extra: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """Run one file in one mode; returns its outcomes and the files it left (cwd, cache)."""
    cwd = work / f"{mode}-{Path(test_file).stem}-cwd"
    cwd.mkdir()
    cache = work / f"{mode}-{Path(test_file).stem}-cache"
    xml_path = work / f"{mode}-{Path(test_file).stem}.xml"
    env = dict(os.environ)
    env.pop("CTXCACHE_DIR", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, whatever the build
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}",
            "-o", "junit_family=xunit1", str(test_dir / test_file), *extra]
    if mode == "dropin":
        shim_dir = work / "shim"
        shim_dir.mkdir(exist_ok=True)
        (shim_dir / "_ctxcache_dropin_shim.py").write_text(SHIM)
        env["PYTHONPATH"] = os.pathsep.join([str(shim_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["CTXCACHE_DROPIN_CACHE"] = str(cache)
        env["CTXCACHE_DIR"] = str(cache)  # anything reaching the default cache lands there too
        env["CTXCACHE_DROPIN_COUNT"] = str(work / f"{mode}-{Path(test_file).stem}.count")
        args[3:3] = ["-p", "_ctxcache_dropin_shim"]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    (work / f"{mode}-{Path(test_file).stem}.log").write_text(proc.stdout + proc.stderr)
    outcomes = _outcomes(xml_path)
    if not outcomes:
        sys.stderr.write(f"{mode} {test_file}: pytest collected nothing (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}\n")
    left: dict[str, Any] = {"cwd": _files_under(cwd), "cache": _files_under(cache) if cache.exists() else []}
    count = work / f"{mode}-{Path(test_file).stem}.count"
    left["dropin_sessions"] = int(count.read_text()) if count.exists() else 0
    return outcomes, left


def _count(outcomes: dict[str, tuple[str, str]]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for state, _ in outcomes.values():
        counts[state] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ort_src", type=Path, help="onnxruntime source tree (holds onnxruntime/test/python)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files to run")
    parser.add_argument("-k", default=None, help="pytest -k expression (both runs)")
    parser.add_argument("--json", type=Path, default=None, help="write the per-test outcomes here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, junit xml, what was left)")
    ns = parser.parse_args(argv)

    test_dir = ns.ort_src / "onnxruntime" / "test" / "python"
    if not test_dir.is_dir():
        parser.error(f"{test_dir} not found: pass the root of an onnxruntime source tree")
    import onnxruntime

    import ctxcache

    extra = ["-k", ns.k] if ns.k else []
    work = Path(tempfile.mkdtemp(prefix="ort-dropin-"))
    report: dict[str, object] = {"onnxruntime": onnxruntime.__version__, "ctxcache": ctxcache.__version__,
                                 "ort_src": str(ns.ort_src), "files": {}}
    regressions = 0
    print(f"onnxruntime {onnxruntime.__version__}, ctxcache {ctxcache.__version__}, tests from {ns.ort_src}")
    print(f"{'file':34} {'plain pass/fail/skip':>22} {'drop-in pass/fail/skip':>24} {'regressions':>12} "
          f"{'drop-in sessions':>17}")
    details: list[str] = []
    for name in ns.files:
        plain, plain_left = run(test_dir, name, "plain", work, extra)
        dropin, dropin_left = run(test_dir, name, "dropin", work, extra)
        lost = sorted(t for t, (state, _) in plain.items() if state == "passed" and dropin.get(t, ("missing", ""))[0] != "passed")
        regressions += len(lost)
        p, d = _count(plain), _count(dropin)
        print(f"{name:34} {p['passed']:>10}/{p['failed']}/{p['skipped']:<9} {d['passed']:>12}/{d['failed']}/{d['skipped']:<9} "
              f"{len(lost):>6} {dropin_left['dropin_sessions']:>16}")
        if not dropin_left["dropin_sessions"] and dropin:
            details.append(f"  {name}: no session went through the drop-in: the forwarder was not used")
            regressions += 1
        for t in lost:
            details.append(f"  {name} {t}: {dropin.get(t, ('missing', ''))[1]}")
        new_cwd = sorted(set(dropin_left["cwd"]) - set(plain_left["cwd"]))
        if new_cwd:
            details.append(f"  {name}: the drop-in run left files in its working directory that plain ORT did not: {new_cwd}")
        if dropin_left["cache"]:
            details.append(f"  {name}: the drop-in run wrote {len(dropin_left['cache'])} file(s) under its cache folder: "
                           f"{dropin_left['cache'][:8]}")
        report["files"][name] = {"plain": p, "dropin": d, "regressions": lost,  # type: ignore[index]
                                 "dropin_left": dropin_left, "plain_left": plain_left,
                                 "outcomes": {t: {"plain": plain[t][0], "dropin": dropin.get(t, ("missing", ""))[0]}
                                              for t in plain}}
    if details:
        print("\nPass plainly, not through the drop-in / left behind:")
        print("\n".join(details))
    else:
        print("\nEvery test that passes on plain ONNX Runtime passes through the drop-in; nothing left in the "
              "cache folder or the working directory.")
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2))
    if ns.keep:
        print(f"\nwork folder kept: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
