"""DirectML execution provider (Windows): a bypass, by decision.

DirectML compiles its operators into GPU shaders at session creation and leaves their reuse to the GPU
driver's own shader cache, which the driver keys, stores and invalidates itself (per driver version and
GPU); ONNX Runtime's DirectML EP writes no EP-context model and has no cache-folder option. There is
nothing for ctxcache to keep that the driver does not already keep, so DirectML loads are a ``bypass``.
The options are still checked, so a misspelt one is an error instead of being silently ignored.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import ProviderOptionError
from ._base import ExecutionProvider

_CHOICES = {
    "performance_preference": ("default", "high_performance", "minimum_power"),
    "device_filter": ("gpu", "npu", "any"),
}


class DirectMLProvider(ExecutionProvider):
    name: ClassVar[str] = "DmlExecutionProvider"
    compiles: ClassVar[bool] = False
    known_options: ClassVar[frozenset[str] | None] = frozenset(
        {"device_id", *_CHOICES, "disable_metacommands", "enable_graph_capture"}
    )

    def validate_options(self, options: dict[str, str]) -> None:
        if "device_id" in options and not options["device_id"].isdigit():
            raise ProviderOptionError(
                f"DirectML option 'device_id' must be a non-negative integer, got {options['device_id']!r}.",
                provider=self.name,
                option="device_id",
            )
        for key, allowed in _CHOICES.items():
            if key in options and options[key] not in allowed:
                raise ProviderOptionError(
                    f"DirectML option {key!r} must be one of {', '.join(allowed)}, got {options[key]!r}.",
                    provider=self.name,
                    option=key,
                )
