"""README's Python examples run as written (the ones that build their own model with ctxcache.models)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, run_python

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "ctxcache.models" in b or "from ctxcache import models" in b]


def test_readme_has_runnable_examples() -> None:
    assert RUNNABLE, "README lost its runnable examples"


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_readme_example_runs(block: str, tmp_path: Path) -> None:
    code = block.replace("/tmp/ctxcache-readme", str(tmp_path))
    run_python(code)  # raises with the example's output when it fails


def test_readme_reason_table_is_the_code() -> None:
    import re

    import ctxcache

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- reasons:begin -->")[1].split("<!-- reasons:end -->")[0]
    rows = {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([a-z_]+)` \| ([a-z]+) \| (.*) \|$", block, re.M)}
    assert rows == {k: (o, t) for k, (o, t) in ctxcache.REASONS.items()}
