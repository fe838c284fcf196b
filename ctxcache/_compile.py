"""Drives ONNX Runtime's compile API: original model in, EP-context model + binaries out."""

from __future__ import annotations

import stat
import time
from collections.abc import Mapping
from pathlib import Path

import onnxruntime as ort

from . import _fs
from ._manifest import CONTEXT, MANIFEST
from ._store import context_problem
from .providers import ExecutionProvider


class NothingCompiled(Exception):
    """The provider took no node of the model: caching would only save a CPU graph (outcome bypass)."""


class CompileFailed(Exception):
    """The provider failed to compile a model it claimed; the message says why."""


def compile_into(
    staging: Path,
    source: str | bytes,
    provider: ExecutionProvider,
    options: dict[str, str],
    level: ort.GraphOptimizationLevel,
    embed: bool,
    log_severity: int,
    config: Mapping[str, str] | None = None,
) -> float:
    """Compile ``source`` for ``provider`` into ``staging/ctx.onnx`` (+ binaries); returns seconds.
    ``config``: the app's session-config entries that may change the result (they are in the key too)."""
    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    start = time.perf_counter()
    try:
        # Providers that SessionOptions.add_provider does not take write the context their own way.
        if not provider.compile_context(so, source, staging / CONTEXT, options, level, embed):
            provider.configure(so, options)
            start = time.perf_counter()
            # ORT_ENABLE_ALL matters: ModelCompiler defaults to DISABLE_ALL, which leaves constant subgraphs
            # unfolded: measured 83 s instead of 0.26 s for light_squeezenet, and an unloadable context.
            compiler = ort.ModelCompiler(
                so,
                source,
                embed_compiled_data_into_model=embed,
                graph_optimization_level=level,
                flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED,
            )
            compiler.compile_to_file(str(staging / CONTEXT))
    except Exception as e:  # ORT's exceptions derive from Exception only
        text = str(e)
        if "Unable to compile any nodes" in text:
            raise NothingCompiled(text) from e
        raise CompileFailed(f"{type(e).__name__}: {text}") from e
    seconds = time.perf_counter() - start
    check_output(staging)
    return seconds


def check_output(folder: Path) -> None:
    """The compiled (or fetched) model must be a context model whose binaries stay inside its folder."""
    files = {name for name, st in _fs.iter_children(folder) if stat.S_ISREG(st.st_mode)} - {MANIFEST}
    if CONTEXT not in files:
        raise CompileFailed(f"the compiler wrote no {CONTEXT}")
    problem = context_problem(folder, files)
    if problem is not None:
        raise CompileFailed(problem.message)
