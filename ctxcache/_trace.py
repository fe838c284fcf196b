"""What one load learns while it is carried out: its timings, the tier that served it, a note."""

from __future__ import annotations

import time
from typing import Any

from ._types import Reason, Timings


class Trace:
    """What one load learns while it is carried out (timings, the tier that served, a note)."""

    __slots__ = ("digest", "early", "key", "note", "started", "tier", "times")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.tier: str | None = None
        self.key: str | None = None
        self.digest: str | None = None
        #: why a load that ends as a plain hit or miss took another way on the way
        self.note: Reason | None = None
        #: on_miss="background", a model new to this cache: the meanwhile session, already being created
        self.early: Any = None

    def timings(self) -> Timings:
        return Timings(**self.times, total=time.perf_counter() - self.started)
