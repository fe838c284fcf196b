"""Any file name the OS accepts caches; what shows it escapes it (reliability guarantee 18).

Model file names with an ideographic space, a no-break space, a zero-width joiner, a tab or a newline
failed the manifest's "printable" check at publish: every launch compiled and fell back. End to end with
the real QNN provider: miss, then hit (a fresh process), then listed, explained, bundled and imported;
the log lines, ``ls`` and ``explain`` show the name escaped, on one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import output_digest, run_python

import ctxcache
from ctxcache import models
from ctxcache.cli import main

NAMES = {
    "ideographic_space": "model\u3000v2.onnx",
    "no_break_space": "model\u00a0v2.onnx",
    "zero_width_joiner": "mo\u200ddel.onnx",
    "tab": "model\tv2.onnx",
    "newline": "model\nv2.onnx",
}
ESCAPED = {"model\u3000v2.onnx": "model\\u3000v2.onnx", "model\u00a0v2.onnx": "model\\xa0v2.onnx",
           "mo\u200ddel.onnx": "mo\\u200ddel.onnx", "model\tv2.onnx": "model\\tv2.onnx",
           "model\nv2.onnx": "model\\nv2.onnx"}

LAUNCH = """
import sys, ctxcache
from _report import report
from ctxcache import models
r = ctxcache.ContextCache(sys.argv[1]).load(sys.argv[2], providers=[("QNNExecutionProvider", models.qnn_htp_options())])
report({"outcome": r.outcome, "reason": str(r.reason) if r.reason else None})
"""


@pytest.mark.parametrize("case", sorted(NAMES))
def test_a_legal_file_name_caches_miss_then_hit(case: str, tmp_path: Path, qnn_providers: list[Any],
                                               caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    name = NAMES[case]
    model = models.conv_net(tmp_path / "models" / name, layers=3, channels=8, seed=len(case))
    cache_dir = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="ctxcache"):
        first = ctxcache.ContextCache(cache_dir).load(model, providers=qnn_providers)
    assert (first.outcome, first.reason) == ("miss", None), first.reason
    reference = output_digest(first)
    # Log lines name the model escaped, each on one line.
    mine = [r.getMessage() for r in caplog.records if "miss" in r.getMessage() or "compiled" in r.getMessage()]
    assert mine and all(ESCAPED[name] in m and "\n" not in m and "\t" not in m for m in mine), mine
    # The next launch, a fresh process: a hit with the same outputs.
    assert run_python(LAUNCH, str(cache_dir), str(model)).result == {"outcome": "hit", "reason": None}
    again = ctxcache.ContextCache(cache_dir).load(model, providers=qnn_providers)
    assert again.outcome == "hit" and output_digest(again) == reference
    assert [e.model_name for e in ctxcache.ContextCache(cache_dir).entries()] == [name]
    assert all(r.ok for r in ctxcache.ContextCache(cache_dir).verify_entries())
    # ls and explain show it escaped, on one line; --format json keeps the real name.
    capsys.readouterr()
    assert main(["ls", "--cache-dir", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    assert ESCAPED[name] in text and name not in text
    assert main(["explain", str(model), "--cache-dir", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    assert ESCAPED[name] in text and name not in text and "hit" in text
    assert main(["ls", "--cache-dir", str(cache_dir), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"][0]["model"] == name


def test_legal_names_travel_through_a_bundle(tmp_path: Path, qnn_providers: list[Any]) -> None:
    src = ctxcache.ContextCache(tmp_path / "src")
    paths = [models.conv_net(tmp_path / "m" / n, layers=2, channels=8, seed=i) for i, n in enumerate(NAMES.values())]
    for p in paths:
        assert src.load(p, providers=qnn_providers).outcome == "miss"
    bundle = ctxcache.export_bundle(src, tmp_path / "app" / "bundle").path
    dev = ctxcache.ContextCache(tmp_path / "dev", tiers=[bundle], trusted_dirs=[tmp_path / "app"])
    for p in paths:
        r = dev.load(p, providers=qnn_providers)
        assert (r.outcome, r.tier) == ("hit", "bundle"), (p.name, r.reason)
    assert sorted(e.model_name for e in dev.entries()) == sorted(NAMES.values())
