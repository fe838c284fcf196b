"""The hit path imports only what a hit needs (issue: launch cost). ``import ctxcache`` and a hit, each in a
fresh interpreter, must not load the CLI, tiers, trust parsing beyond the policy, management, the compile
API, the probe, the background worker machinery, nor the standard-library modules only they need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import QNN, run_python

import ctxcache
from ctxcache import models

#: Every ctxcache module that ``import ctxcache`` plus a hit may load. A new module on the hit path is a
#: conscious decision: add it here, and measure it (benchmarks/, question 11).
HIT_PATH = {
    "ctxcache", "ctxcache._cache", "ctxcache._config", "ctxcache._events", "ctxcache._fingerprint", "ctxcache._fs",
    "ctxcache._hashing", "ctxcache._inputs", "ctxcache._key", "ctxcache._loader", "ctxcache._log", "ctxcache._manifest", "ctxcache._record",
    "ctxcache._markers", "ctxcache._negative", "ctxcache._onnxproto", "ctxcache._plan", "ctxcache._seams",
    "ctxcache._servable", "ctxcache._sessopts", "ctxcache._store", "ctxcache._storebase", "ctxcache._removal",
    "ctxcache._housekeeping", "ctxcache._trace", "ctxcache._trust",
    "ctxcache._types", "ctxcache._version", "ctxcache.errors", "ctxcache.providers", "ctxcache.providers._base",
    "ctxcache.providers.qnn",
}
#: Standard-library and third-party modules that only the miss, management or tiers need.
NOT_ON_THE_HIT_PATH = ("logging", "threading", "dataclasses", "base64", "subprocess", "tarfile", "hmac", "hashlib", "difflib", "shutil", "tempfile", "filelock",
                       "platformdirs", "cryptography", "boto3", "fsspec", "argparse", "multiprocessing", "zipfile")

CODE = """
import json, sys
import onnxruntime, onnxruntime_qnn
before = set(sys.modules)
import ctxcache
after_import = set(sys.modules)
cache = ctxcache.ContextCache({root!r})
r = cache.load({model!r}, providers=[("QNNExecutionProvider", {options!r})])
from _report import report
report({{"outcome": r.outcome, "import": sorted(after_import - before),
        "hit": sorted(set(sys.modules) - after_import)}})
"""


def test_import_and_a_hit_load_only_the_hit_path(tmp_path: Path, conv_model: Path, qnn_options: dict[str, str]) -> None:
    root = tmp_path / "c"
    assert ctxcache.ContextCache(root).load(conv_model, providers=[(QNN, qnn_options)]).outcome == "miss"
    out: dict[str, Any] = run_python(CODE.format(root=str(root), model=str(conv_model), options=qnn_options)).result
    assert out["outcome"] == "hit"
    loaded = set(out["import"]) | set(out["hit"])
    ours = {m for m in loaded if m.split(".")[0] == "ctxcache"}
    assert ours <= HIT_PATH, sorted(ours - HIT_PATH)
    others = {m.split(".")[0] for m in loaded}
    assert not others & set(NOT_ON_THE_HIT_PATH), sorted(others & set(NOT_ON_THE_HIT_PATH))


def test_the_drop_ins_no_cache_path_imports_and_writes_nothing_more(tmp_path: Path, conv_model: Path) -> None:
    code = f"""
import json, os, sys
import onnxruntime
before = set(sys.modules)
import ctxcache
s = ctxcache.InferenceSession({str(conv_model)!r}, providers=["CPUExecutionProvider"])
from _report import report
report({{"new": sorted(m for m in set(sys.modules) - before if not m.startswith("ctxcache")),
        "default_cache_made": os.path.exists(os.environ["CTXCACHE_DIR"])}})
"""
    out = run_python(code, env={"CTXCACHE_DIR": str(tmp_path / "never")}).result
    assert not out["default_cache_made"]
    assert "platformdirs" not in out["new"] and "filelock" not in out["new"], out


def test_models_helper_is_not_imported_by_ctxcache() -> None:
    code = "import json, sys, ctxcache; from _report import report; report({'models': 'ctxcache.models' in sys.modules})"
    assert run_python(code).result == {"models": False}
    assert models.qnn_htp_options()  # the helper itself works when asked for
