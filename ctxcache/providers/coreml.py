"""Apple CoreML execution provider: a bypass, by decision.

ONNX Runtime's CoreML EP (1.20-1.32) writes no EP-context model: there is no compiled artifact that
ctxcache could key, verify and load in place of the original. What it has is its own
``ModelCacheDirectory`` (ORT 1.21+), where it keeps the compiled ``.mlmodelc``. ORT keys that cache on the
model's ``COREML_CACHE_KEY`` metadata when present, else on a hash of the model's *path* (plus graph
input/output names): the same hazard as TensorRT's engine cache (onnxruntime issue 6455) - a model
updated in place, or two models at one path, reuse a stale compiled model.

Managing that folder inside a ctxcache entry would need an entry that is a directory tree written by
CoreML at session creation, with no context model to verify; it cannot be built or tested on this
project's Linux machines. So CoreML loads are a ``bypass`` and ctxcache leaves ``ModelCacheDirectory``
to the app, documented in the README with the safe use: give the model a ``COREML_CACHE_KEY`` that
changes with its content. What ctxcache does do here is check the options, so a misspelt one
(``ModelCacheDir``) is an error instead of being silently ignored by ORT.
"""

from __future__ import annotations

from typing import ClassVar

from ._base import ExecutionProvider

_CHOICES: dict[str, tuple[str, ...]] = {
    "ModelFormat": ("MLProgram", "NeuralNetwork"),
    "MLComputeUnits": ("CPUOnly", "CPUAndNeuralEngine", "CPUAndGPU", "ALL"),
    "SpecializationStrategy": ("Default", "FastPrediction"),
}
_BOOLS = ("RequireStaticInputShapes", "EnableOnSubgraphs", "ProfileComputePlan", "AllowLowPrecisionAccumulationOnGPU")


class CoreMLProvider(ExecutionProvider):
    name: ClassVar[str] = "CoreMLExecutionProvider"
    compiles: ClassVar[bool] = False
    known_options: ClassVar[frozenset[str] | None] = frozenset(
        {*_CHOICES, *_BOOLS, "ModelCacheDirectory", "coreml_flags"}
    )
    choice_options: ClassVar[dict[str, tuple[str, ...]]] = _CHOICES
    flag_options: ClassVar[frozenset[str]] = frozenset(_BOOLS)
