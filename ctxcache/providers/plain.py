"""Providers that never produce an EP context (names: ``NO_CONTEXT``): a load on one of them is a silent ``bypass``.

CUDA, ROCm, XNNPACK, oneDNN, Azure, NNAPI, WebGPU and the like run the model as it is: ONNX Runtime
has no EP-context model for them to write, so there is nothing to compile, key or keep. A load with one
of them first in the list is exactly ``onnxruntime.InferenceSession`` with the caller's arguments: no
file written anywhere, ONNX Runtime's own warning when the name is not available in this build (a list
built for another platform) and its own fallback. CPU, DirectML and CoreML have modules of their own
(they check their options); every other name ONNX Runtime knows gets the generic, compiling provider.
"""

from __future__ import annotations

from typing import ClassVar

from ._base import ExecutionProvider


class PlainProvider(ExecutionProvider):
    """A provider ctxcache never compiles for (the names are ``ctxcache.providers.NO_CONTEXT``)."""

    compiles: ClassVar[bool] = False
