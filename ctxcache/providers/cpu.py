"""CPU execution provider: it compiles nothing, so a CPU-only load is a ``bypass``."""

from __future__ import annotations

from typing import ClassVar

from ._base import ExecutionProvider


class CPUProvider(ExecutionProvider):
    name: ClassVar[str] = "CPUExecutionProvider"
    compiles: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        return None
