"""DirectML execution provider (Windows): a bypass, by decision.

DirectML compiles its operators into GPU shaders at session creation and leaves their reuse to the GPU
driver's own shader cache, which the driver keys, stores and invalidates itself (per driver version and
GPU); ONNX Runtime's DirectML EP writes no EP-context model and has no cache-folder option. There is
nothing for ctxcache to keep that the driver does not already keep, so DirectML loads are a ``bypass``.
The options are still checked, so a misspelt one is an error instead of being silently ignored.
"""

from __future__ import annotations

from typing import ClassVar

from ._base import ExecutionProvider

_CHOICES: dict[str, tuple[str, ...]] = {
    "performance_preference": ("default", "high_performance", "minimum_power"),
    "device_filter": ("gpu", "npu", "any"),
}


class DirectMLProvider(ExecutionProvider):
    name: ClassVar[str] = "DmlExecutionProvider"
    compiles: ClassVar[bool] = False
    known_options: ClassVar[frozenset[str] | None] = frozenset(
        {"device_id", *_CHOICES, "disable_metacommands", "enable_graph_capture"}
    )
    choice_options: ClassVar[dict[str, tuple[str, ...]]] = _CHOICES
    int_options: ClassVar[dict[str, tuple[int, int]]] = {"device_id": (0, 2**31 - 1)}
