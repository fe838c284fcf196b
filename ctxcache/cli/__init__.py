"""ctxcache command line (placeholder until the CLI lands)."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    return 0
